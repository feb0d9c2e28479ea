"""The `searchr1` command: the project's command-line tools under one name.

    searchr1 retrieval serve|build-index|download-corpus|...   the retriever (python -m searchr1.retrieval)
    searchr1 toy world|tokenizer|model|warmstart               the toy world by hand (python -m searchr1.toy)
    searchr1 config [FILE ...]                                 validate config.yaml (+ FILEs on top), print it
    searchr1 plan [FILE ...]                                   the run's budget: disk per artifact, GPUs/time per job
    searchr1 provenance PATH                                   what made a result (settings, code, inputs)

The workflow itself runs with `snakemake` (see the README); these are for running or inspecting its parts.
"""

from __future__ import annotations

import json
import sys


def _load(argv: list[str]) -> dict | None:
    """config.yaml (the packaged one) with the files of ``argv`` on top, validated with every experiment's
    merged config, as the workflow checks them; None (the problems printed) if invalid."""
    from searchr1.config import ConfigError, default_config, validate_experiments

    try:
        cfg = default_config(*argv)
        validate_experiments(cfg)
        return cfg
    except ConfigError as err:
        print(err, file=sys.stderr)
        return None


def _config(argv: list[str]) -> int:
    import yaml

    cfg = _load(argv)
    if cfg is None:
        return 2
    print(yaml.safe_dump(cfg, sort_keys=False), end="")
    return 0


def _plan(argv: list[str]) -> int:
    from searchr1.budget import format_plan
    from searchr1.retrieval.placement import plan_check

    cfg = _load(argv)
    if cfg is None:
        return 2
    print(format_plan(cfg))
    problems = plan_check(cfg)
    if problems:
        print("retriever placement:\n  - " + "\n  - ".join(problems), file=sys.stderr)
        return 2
    return 0


def _provenance(argv: list[str]) -> int:
    from searchr1 import provenance

    if len(argv) != 1:
        print("usage: searchr1 provenance PATH (a result file or model directory)", file=sys.stderr)
        return 2
    record = provenance.of_path(argv[0])
    if record is None:
        print(f"{argv[0]}: no provenance recorded", file=sys.stderr)
        return 1
    print(json.dumps(record, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "retrieval":
        from searchr1.retrieval.__main__ import main as retrieval_main

        return retrieval_main(rest)
    if command == "toy":
        from searchr1.toy.__main__ import main as toy_main

        toy_main(rest)
        return 0
    if command == "config":
        return _config(rest)
    if command == "provenance":
        return _provenance(rest)
    if command == "plan":
        return _plan(rest)
    print(f"searchr1: unknown command {command!r}\n\n{__doc__.strip()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
