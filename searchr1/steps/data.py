"""Data stage: QA data and the base policy (downloaded at full scale), and the slime-ready splits."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from searchr1 import provenance
from searchr1.fsutil import publish_file
from searchr1.steps.settings import StepSettings

log = logging.getLogger("searchr1.steps.data")


def lock_path(cfg: StepSettings) -> Path:
    """Every download records its resolved commit and sha256 in one lock file under data_dir."""
    return Path(cfg["data_dir"]) / "download-lock.json"


def download_qa(cfg: StepSettings, *, outputs, **_: Any) -> None:
    from searchr1.data import download_files

    data = cfg["data"]
    dest = Path(outputs["train"]).parent
    files = download_files(
        data["repo"],
        [data["train_file"], data["test_file"]],
        dest_dir=dest,
        revision=data["revision"],
        sha256=dict(data["sha256"]) or None,
        lock_path=lock_path(cfg),
    )
    for key, name in (("train", data["train_file"]), ("test", data["test_file"])):
        if Path(files[name]).resolve() != Path(outputs[key]).resolve():
            publish_file(files[name], outputs[key])


def download_policy(cfg: StepSettings, *, outputs, **_: Any) -> None:
    from searchr1.data import download_snapshot

    policy = cfg["policy"]
    out = Path(outputs["_list"][0])
    download_snapshot(policy["repo"], dest_dir=out, revision=policy["revision"])
    provenance.write_model_record(out, cfg.record())


def download_model(cfg: StepSettings, *, outputs, **_: Any) -> None:
    """A named model of eval.models given as an HF repo (its rule declares only that model's entry)."""
    from searchr1.data import download_model as download

    ((name, spec),) = cfg["eval"]["models"].items()
    out = Path(outputs["_list"][0])
    download(spec["repo"], dest_dir=out, revision=spec["revision"], lock_path=lock_path(cfg))
    provenance.write_model_record(out, cfg.record())
    log.info("model %s: %s@%s in %s", name, spec["repo"], spec["revision"], out)


def prepare_data(cfg: StepSettings, *, inputs, outputs, **_: Any) -> None:
    import pandas as pd

    from searchr1.data import fetch_flashrag
    from searchr1.data import prepare_data as prepare

    splits = {name: cfg["data"]["splits"][name] for name in cfg["eval"]["splits"]}
    split_outputs = {name: Path(f"{Path(outputs['train']).parent}/{name}.parquet") for name in splits}
    # A selected split the test file lacks is built from FlashRAG, as Search-R1's qa_search_test_merge.py does.
    held = set(pd.read_parquet(inputs["test"], columns=["data_source"])["data_source"])
    flashrag = cfg["data"]["flashrag"]
    extra: dict[str, Any] = {}
    built: dict[str, Any] = {}
    for source in dict.fromkeys(spec["data_source"] for spec in splits.values()):
        if source in held:
            continue
        found = fetch_flashrag(
            source,
            repo_id=flashrag["repo"],
            revision=flashrag["revision"],
            dest_dir=Path(cfg["data_dir"]) / "qa" / "flashrag",
            lock_path=lock_path(cfg),
        )
        if found is not None:
            extra[source], split = found
            built[source] = {"repo": flashrag["repo"], "revision": flashrag["revision"], "split": split}
            log.info("%s: built from %s (%s split, %d rows)", source, flashrag["repo"], split, len(extra[source]))
    record = cfg.record(
        inputs={"test": provenance.of_parquet(inputs["test"]), **({"flashrag": built} if built else {})}
    )
    counts = prepare(
        inputs["train"],
        inputs["test"],
        out_train=outputs["train"],
        split_outputs=split_outputs,
        splits=splits,
        provenance=record,
        extra_sources=extra,
    )
    log.info("rows: %s", counts)
