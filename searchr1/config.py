"""Load and validate the workflow configuration.

The JSON schema (``searchr1/schema/config.schema.yaml``) checks keys, types and ranges; the checks below it
catch what a schema cannot express (relations between values, e.g. a global batch that does not divide the
rollout). Every error names the key path and the offending value, and all problems are reported at once.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import jsonschema
import yaml

from searchr1.experiments import Run, is_run_model_name, override_problems, runs, train_seeds

SCHEMA_PATH = Path(__file__).parent / "schema" / "config.schema.yaml"
# The recipe's defaults shipped with the package (package data, see pyproject.toml). In a checkout these are
# symbolic links to the root config.yaml and config.toy.yaml, the files the Snakefile reads and users edit:
# one source of truth, which a build copies into the wheel, so an installed package never reads a checkout.
DEFAULTS_DIR = Path(__file__).parent / "defaults"


class ConfigError(ValueError):
    """The configuration is invalid; the message lists every problem with its key path."""


@lru_cache(maxsize=1)
def cached_schema() -> dict[str, Any]:
    """The schema, read once per process; shared and read-only (``load_schema`` gives a copy to change)."""
    with open(SCHEMA_PATH, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def load_schema() -> dict[str, Any]:
    return copy.deepcopy(cached_schema())


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge ``override`` onto ``base`` (what Snakemake does with several config files)."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _key_path(path: Any) -> str:
    return ".".join(str(p) for p in path) or "<root>"


def _schema_problems(config: Mapping[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(cached_schema())
    problems = []
    for err in sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path))):
        where = _key_path(err.absolute_path)
        if err.validator == "additionalProperties":
            allowed = sorted(err.schema.get("properties", {}))
            extra = sorted(set(err.instance) - set(allowed)) if isinstance(err.instance, dict) else []
            for key in extra:
                full = f"{where}.{key}" if where != "<root>" else key
                hint = f" (allowed here: {', '.join(allowed)})" if allowed else ""
                problems.append(f"config key '{full}': unknown key{hint}")
            if extra:
                continue
        if err.validator == "required":
            problems.append(f"config key '{where}': {err.message}")
            continue
        problems.append(f"config key '{where}': {err.message} (got {err.instance!r})")
    return problems


def _relation_problems(cfg: Mapping[str, Any]) -> list[str]:
    problems: list[str] = []
    train, ret, ev = cfg["train"], cfg["retriever"], cfg["eval"]
    samples = train["rollout_batch_size"] * train["n_samples_per_prompt"]
    if samples % train["global_batch_size"]:
        problems.append(
            f"config key 'train.global_batch_size': {train['global_batch_size']} does not divide the "
            f"{samples} samples of a rollout (rollout_batch_size {train['rollout_batch_size']} x "
            f"n_samples_per_prompt {train['n_samples_per_prompt']})"
        )
    if train["global_batch_size"] % train["n_samples_per_prompt"]:
        problems.append(
            f"config key 'train.global_batch_size': {train['global_batch_size']} is not a multiple of "
            f"n_samples_per_prompt {train['n_samples_per_prompt']} (GRPO groups would be split)"
        )
    if train["eps_clip_high"] < train["eps_clip"]:
        problems.append(
            f"config key 'train.eps_clip_high': {train['eps_clip_high']} is below eps_clip {train['eps_clip']}"
        )
    if ret["topk"] > ret["topk_max"]:
        problems.append(f"config key 'retriever.topk': {ret['topk']} exceeds retriever.topk_max {ret['topk_max']}")
    if ret["index"]["source"] == "download" and not ret["index"].get("parts"):
        problems.append("config key 'retriever.index.parts': required when retriever.index.source is 'download'")
    for split in ev["splits"]:
        if split not in cfg["data"]["splits"]:
            problems.append(
                f"config key 'eval.splits': split {split!r} is not defined in data.splits "
                f"({', '.join(cfg['data']['splits'])})"
            )
    for name in ev["models"]:
        if name == "base" or is_run_model_name(name):
            problems.append(
                f"config key 'eval.models': {name!r} is reserved (the base policy and the runs' RL checkpoints: "
                "rl, rl-<experiment>-s<seed>)"
            )
    if train["seed"] is not None and train["seed"] not in train_seeds(cfg):
        problems.append(
            f"config key 'train.seed': {train['seed']} is set per run from train.seeds (here "
            f"{train_seeds(cfg)}); list the seeds in train.seeds instead"
        )
    problems += override_problems(cfg)
    known = list(dict.fromkeys(["base", "rl", *ev["models"]]))
    for name in ev["compare"]:
        if name not in known:
            problems.append(f"config key 'eval.compare': model {name!r} is not one of {', '.join(known)}")
    if len(set(ev["compare"])) != len(ev["compare"]):
        problems.append(f"config key 'eval.compare': needs two different models, got {list(ev['compare'])}")
    for name in cfg["published"]:
        if name not in known:
            problems.append(f"config key 'published': model {name!r} is not one of {', '.join(known)}")
    slime = train["slime"]
    if train["backend"] == "slime":
        gpus = slime["nodes"] * slime["gpus_per_node"]
        tp = (
            slime["tensor_model_parallel_size"] * slime["pipeline_model_parallel_size"] * slime["context_parallel_size"]
        )
        if gpus % tp:
            problems.append(
                f"config key 'train.slime.tensor_model_parallel_size': model parallel size {tp} does not divide "
                f"the {gpus} training GPUs"
            )
        rollout_gpus = slime["rollout_num_gpus"]
        if rollout_gpus is None and slime["colocate"]:
            rollout_gpus = gpus  # resolve_derived fills it in
        if rollout_gpus is None:
            problems.append(
                "config key 'train.slime.rollout_num_gpus': required when train.slime.colocate is false (the "
                "SGLang GPUs beside the nodes x gpus_per_node training GPUs; slime has no default for it then)"
            )
        elif slime["colocate"] and rollout_gpus != gpus:
            problems.append(
                f"config key 'train.slime.rollout_num_gpus': {rollout_gpus} colocated rollout GPUs, but training "
                f"has {gpus} (nodes {slime['nodes']} x gpus_per_node {slime['gpus_per_node']}) and colocated "
                "rollouts share exactly those GPUs; set it to null (derived) or to that number"
            )
        elif rollout_gpus % slime["rollout_num_gpus_per_engine"]:
            problems.append(
                f"config key 'train.slime.rollout_num_gpus_per_engine': {slime['rollout_num_gpus_per_engine']} "
                f"does not divide rollout_num_gpus {rollout_gpus}"
            )
        if slime["container_runtime"] == "docker" and slime["nodes"] > 1:
            problems.append(
                f"config key 'train.slime.container_runtime': docker cannot run the {slime['nodes']}-node launch: "
                "a worker node's container belongs to its docker daemon, not to the SLURM step, so the step can "
                "neither confine it to the step's GPUs nor stop it when the job ends; use apptainer for multi-node"
            )
    if cfg["scale"] == "toy" and "toy" not in cfg:
        problems.append("config key 'toy': required when scale is 'toy'")
    problems += _placement_problems(cfg)
    if train["save_hf_interval"] is not None and train["save_hf_interval"] % train["save_interval"]:
        problems.append(
            f"config key 'train.save_hf_interval': {train['save_hf_interval']} is not a multiple of "
            f"train.save_interval {train['save_interval']} (an HF export is written only at a checkpoint)"
        )
    return problems


def _placement_problems(cfg: Mapping[str, Any]) -> list[str]:
    """``retriever.placement`` against ``retriever.gpus``, the backend and the scale (docs/placement.md); whether a
    shared retriever fits beside SGLang is the plan's check (searchr1.retrieval.placement.plan_check)."""
    ret = cfg["retriever"]
    if ret["url"]:
        return []  # the jobs start no retriever
    where, gpus, backend = ret["placement"], ret["gpus"], ret["backend"]
    problems = []
    if where == "dedicated" and gpus < 1:
        problems.append("config key 'retriever.gpus': placement 'dedicated' needs at least 1 GPU for the retriever")
    if where != "dedicated" and gpus:
        problems.append(
            f"config key 'retriever.gpus': {gpus} GPU(s) only apply to placement 'dedicated', but placement is "
            f"{where!r} (set it to 0, or placement: dedicated)"
        )
    if where == "cpu" and backend == "faiss_gpu":
        problems.append("config key 'retriever.backend': 'faiss_gpu' cannot run under retriever.placement 'cpu'")
    if where == "shared" and backend not in ("auto", "torch"):
        problems.append(
            f"config key 'retriever.backend': placement 'shared' runs the torch backend (the fp16 layout whose "
            f"memory it checks), not {backend!r}; set backend: auto or torch"
        )
    if where == "shared":
        train = cfg["train"]
        own = train["slime"]["gpus_per_node"] if train["backend"] == "slime" else train["resources"]["gpus"]
        if own < 1:
            problems.append(
                "config key 'retriever.placement': 'shared' shards the index over the training GPUs, and "
                f"train.backend {train['backend']!r} has none (train.resources.gpus 0)"
            )
        if cfg["eval"]["resources"]["gpus"] < 1:
            problems.append(
                "config key 'retriever.placement': 'shared' shards the index over each job's GPUs, and the "
                "evaluation has none (eval.resources.gpus 0)"
            )
    if cfg["scale"] == "toy" and where != "cpu":
        problems.append(f"config key 'retriever.placement': the toy world runs on the CPU, got {where!r}")
    return problems


def resolve_derived(cfg: dict[str, Any]) -> dict[str, Any]:
    """Fill the keys whose null means "derived from another key": ``work_dir`` null = ``<data_dir>/work``;
    ``train.slime.rollout_num_gpus`` null = ``nodes x gpus_per_node`` under colocate.

    Done once here, so every rule declares (and every step reads) the directory actually used.
    """
    if cfg.get("work_dir") is None and "data_dir" in cfg:
        cfg["work_dir"] = f"{cfg['data_dir'].rstrip('/')}/work"
    slime = cfg.get("train", {}).get("slime")
    if slime and slime.get("rollout_num_gpus") is None and slime.get("colocate"):
        slime["rollout_num_gpus"] = slime["nodes"] * slime["gpus_per_node"]
    if cfg["train"]["seed"] is None:  # the first run's seed (each run's config sets its own: searchr1.experiments)
        cfg["train"] = {**cfg["train"], "seed": train_seeds(cfg)[0]}
    return cfg


def _resolve(schema: Mapping[str, Any], root: Mapping[str, Any]) -> Mapping[str, Any]:
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        return {**root["$defs"][ref.rsplit("/", 1)[1]], **{k: v for k, v in schema.items() if k != "$ref"}}
    return schema


def complete(config: Mapping[str, Any], schema: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], list[str]]:
    """Fill the schema's ``default:`` values in; list the keys that are missing and have none.

    config.yaml holds every key of the recipe (one home for each value); the schema's defaults are for keys
    that config.yaml leaves out on purpose. A key marked ``x-optional: true`` (the toy section at full
    scale) may be absent. So code reads ``cfg[key]``, never ``cfg.get(key, <a second default>)``.
    """
    root = schema or cached_schema()
    out = copy.deepcopy(dict(config))
    missing: list[str] = []

    def walk(node: dict[str, Any], sch: Mapping[str, Any], path: str) -> None:
        sch = _resolve(sch, root)
        for key, sub in (sch.get("properties") or {}).items():
            sub = _resolve(sub, root)
            where = f"{path}.{key}" if path else key
            if key not in node:
                if "default" not in sub:
                    if not sub.get("x-optional"):
                        missing.append(where)
                    continue
                node[key] = copy.deepcopy(sub["default"])
            if isinstance(node[key], dict):
                walk(node[key], sub, where)
        extra = sch.get("additionalProperties")
        if isinstance(extra, Mapping):
            for key, value in node.items():
                if key not in (sch.get("properties") or {}) and isinstance(value, dict):
                    walk(value, extra, f"{path}.{key}" if path else key)

    walk(out, root, "")
    return out, missing


def validate_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``config``; return it, with the schema's defaults filled in, or raise :class:`ConfigError`
    listing every problem."""
    problems = _schema_problems(config)
    if not problems:
        config, missing = complete(config)
        problems = [f"config key '{key}': missing (config.yaml holds every key; see the schema)" for key in missing]
    if not problems:
        problems = _relation_problems(config)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return resolve_derived(dict(config))


def load_config(*paths: str | Path, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Load YAML files in order (later ones override earlier ones), apply ``overrides``, validate."""
    if not paths:
        raise ConfigError("load_config needs at least one config file")
    merged: dict[str, Any] = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        with open(path, encoding="utf-8") as fh:
            loaded = yaml.safe_load(fh) or {}
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"config file {path} must hold a mapping at top level, got {type(loaded).__name__}")
        merged = deep_merge(merged, loaded)
    if overrides:
        merged = deep_merge(merged, overrides)
    return validate_config(merged)


def default_config_paths(*, toy: bool = False) -> list[Path]:
    """The packaged config.yaml, plus config.toy.yaml on top with ``toy``."""
    return [DEFAULTS_DIR / "config.yaml", *([DEFAULTS_DIR / "config.toy.yaml"] if toy else [])]


def default_config(*paths: str | Path, toy: bool = False) -> dict[str, Any]:
    """The packaged recipe (the toy's with ``toy``), the files of ``paths`` on top, validated: the defaults of
    the command-line tools, so a command run by hand and a job of the workflow agree."""
    return load_config(*default_config_paths(toy=toy), *paths)


def config_value(cfg: Mapping[str, Any], key: str) -> Any:
    """The value of the dotted ``key`` (``train.torch.device``) in ``cfg``."""
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    return node


def settings_from_config(cls: type, cfg: Mapping[str, Any], **extra: Any) -> Any:
    """Build the settings dataclass ``cls`` from its ``CONFIG_KEYS`` (field -> dotted config key) and ``extra``.

    The one way a component reads its settings from the config: the config (through the schema) is the only
    home of those values, so such fields carry no default of their own (tests/test_settings.py checks it).
    """
    values = {name: config_value(cfg, key) for name, key in cls.CONFIG_KEYS.items()}
    values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items()}
    return cls(**values, **extra)


class FromConfig:
    """Base of a settings dataclass: ``from_config(cfg, **extra)`` reads the fields named in ``CONFIG_KEYS``
    (field -> dotted config key) from the config, through :func:`settings_from_config`."""

    CONFIG_KEYS: ClassVar[dict[str, str]] = {}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], **extra: Any) -> Any:
        return settings_from_config(cls, cfg, **extra)


# ----------------------------------------------------------------------------------------------
# The runs (experiments x train.seeds, searchr1.experiments): each run's effective config
# ----------------------------------------------------------------------------------------------


def run_config(cfg: Mapping[str, Any], run: Run) -> dict[str, Any]:
    """The effective config of ``run``: ``cfg`` merged with its experiment's overrides, validated, with
    ``train.seed`` = the run's seed and, with several runs, its own work directory."""
    overrides = cfg["experiments"][run.experiment]
    merged = deep_merge(cfg, overrides)
    merged["train"]["seed"] = run.seed
    try:
        merged = validate_config(merged)
    except ConfigError as err:
        raise ConfigError(f"experiment {run.experiment!r} (seed {run.seed}): {err}") from None
    if not run.single:
        merged["work_dir"] = f"{cfg['work_dir']}/runs/{run.experiment}/seed{run.seed}"
    return merged


def validate_experiments(cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Check every experiment's overrides and its merged config; return the runs' effective configs."""
    problems = override_problems(cfg)
    if problems:
        raise ConfigError("invalid experiments:\n  - " + "\n  - ".join(problems))
    return [run_config(cfg, run) for run in runs(cfg)]
