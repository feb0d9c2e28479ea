"""Full scale (issue 18): checkpoint retention, the work directory, the disk budget and its refusal, the container
image step, absolute paths and binds in every container command, evaluation sampling equal to slime's, schema
choices slime accepts, flag order, profiles by bare name, and the one-GPU smoke config."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import ROOT, config, entrypoint_argv, snakemake

from searchr1 import budget
from searchr1.config import load_config
from searchr1.container import ContainerError, check_absolute, fetch_image, image_file, pull_command
from searchr1.retention import TRACKER, RetentionWatcher, prune
from searchr1.slime_launch import build_plan, recipe_flags, wrap_in_container

SMOKE = ROOT / "config.smoke.yaml"


def smoke_config(**overrides):
    return load_config(ROOT / "config.yaml", SMOKE, overrides=overrides or None)


# --- retention -----------------------------------------------------------------------------------------------


def _megatron_save(save_dir: Path, rollout_id: int, hf_dir: Path, *, finish: bool = True) -> None:
    """What one slime save leaves: iter_<7 digits>/ (then the tracker, when complete), then the HF copy."""
    (save_dir / f"iter_{rollout_id:07d}").mkdir(parents=True)
    (save_dir / f"iter_{rollout_id:07d}" / "shard.distcp").write_bytes(b"x" * 10)
    if finish:
        (save_dir / TRACKER).write_text(str(rollout_id))
        (hf_dir / f"iter_{rollout_id}").mkdir(parents=True)
        (hf_dir / f"iter_{rollout_id}" / "config.json").write_text("{}")


def _iters(d: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in d.iterdir() if p.name.startswith("iter_")) if d.exists() else []


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_retention_keeps_exactly_the_newest_k_complete_through_saves_and_a_kill(tmp_path, keep):
    save, hf = tmp_path / "ckpt", tmp_path / "hf"
    save.mkdir()
    saved = []
    for rollout_id in range(19, 200, 20):  # slime saves after rollout r when (r + 1) % 20 == 0
        _megatron_save(save, rollout_id, hf)
        saved.append(rollout_id)
        if rollout_id == 99:
            continue  # killed between this save and its prune: the next prune catches up
        prune(save, hf, keep=keep, hf_interval=60)
        assert _iters(save) == saved[-keep:]
        # HF: (r + 1) a multiple of 60, plus the newest
        assert _iters(hf) == sorted({r for r in saved if (r + 1) % 60 == 0} | {saved[-1]})
    # a save in progress (above the tracker) is never touched, and the tracker's checkpoint is always kept
    _megatron_save(save, 219, hf, finish=False)
    result = prune(save, hf, keep=keep, hf_interval=60)
    assert _iters(save) == saved[-keep:] + [219]
    assert 199 in result.kept and 219 not in result.deleted_checkpoints


def test_retention_after_a_kill_before_the_first_prune_and_without_tracker(tmp_path):
    save, hf = tmp_path / "ckpt", tmp_path / "hf"
    save.mkdir()
    _megatron_save(save, 19, hf, finish=False)  # killed mid-save of the very first checkpoint
    assert prune(save, hf, keep=1, hf_interval=None).deleted_checkpoints == []
    assert _iters(save) == [19]
    for r in (19, 39, 59):  # resumed: re-saves 19 (over the partial), then more
        if r != 19:
            _megatron_save(save, r, hf)
        else:
            (save / TRACKER).write_text("19")
            (hf / "iter_19").mkdir(parents=True)
    with RetentionWatcher(save, hf, keep=1, hf_interval=None, interval_s=3600):  # prunes on entry and exit
        assert _iters(save) == [59]
        assert _iters(hf) == [59]  # hf_interval null: the final (newest) only


def test_torch_backend_follows_the_same_retention_keys():
    from searchr1.grpo.settings import GRPOSettings

    cfg = config(toy=True, train={"save_interval": 5, "keep_checkpoints": 3, "save_hf_interval": 10})
    s = GRPOSettings.from_config(cfg)
    assert (s.checkpoint_interval, s.keep_checkpoints, s.save_hf_interval) == (5, 3, 10)


def test_save_hf_interval_must_be_a_multiple_of_save_interval():
    from searchr1.config import ConfigError

    with pytest.raises(ConfigError, match="train.save_hf_interval"):
        config(train={"save_hf_interval": 30})


# --- work directory ------------------------------------------------------------------------------------------


def test_work_dir_default_and_override(tmp_path):
    assert config()["work_dir"] == "data/work"
    assert config(toy=True)["work_dir"] == "data/toy/work"
    assert config(data_dir="/scratch/me")["work_dir"] == "/scratch/me/work"
    assert config(work_dir="/big/work")["work_dir"] == "/big/work"
    from searchr1.steps.settings import StepSettings, declare
    from searchr1.steps.train import slime_paths, train_work

    cfg = StepSettings.from_params(declare(config(work_dir=str(tmp_path / "w")), "work_dir"), step="t")
    assert train_work(cfg) == tmp_path / "w" / "train"
    paths = slime_paths(cfg, base_model="m", train_parquet="t.parquet", retriever_url="u")
    for key in ("save_dir", "save_hf_dir", "metrics_path", "custom_config_path"):
        assert str(paths[key]).startswith(str(tmp_path / "w" / "train")), key


def test_eval_partials_live_in_the_given_directory(tmp_path):
    from searchr1.evaluate import partial_path

    assert partial_path("results/eval/rl/nq_test.jsonl") == Path("results/eval/rl/nq_test.partial.jsonl")
    assert (
        partial_path("results/eval/rl/nq_test.jsonl", tmp_path / "eval/rl")
        == tmp_path / "eval/rl/nq_test.partial.jsonl"
    )


def test_nothing_large_is_inside_the_checkout_by_default():
    """Working files and downloads live under data_dir/work_dir; of the declared results only the final RL policy
    (results/models/rl, one HF copy) is large."""
    for cfg in (config(), smoke_config()):
        for art in budget.artifacts(cfg):
            if art.bytes > 5e9 and art.step != "export_rl":
                assert art.where.startswith((cfg["data_dir"], cfg["work_dir"])), art


# --- budget --------------------------------------------------------------------------------------------------


def test_param_count_from_the_architecture():
    # Qwen2.5-3B: 3.09B, Qwen2.5-0.5B: 0.49B, Qwen2.5-7B (untied embeddings): 7.62B (their model cards)
    assert budget.policy_params(config()) == pytest.approx(3.09e9, rel=0.01)
    assert budget.policy_params(smoke_config()) == pytest.approx(0.494e9, rel=0.01)
    assert budget.policy_params(config(policy={"repo": "Qwen/Qwen2.5-7B"})) == pytest.approx(7.62e9, rel=0.01)


@pytest.mark.parametrize("which", ["full", "smoke"])
def test_budget_is_derived_from_model_size_retention_and_corpus(which):
    cfg = config() if which == "full" else smoke_config()
    b, t = cfg["budget"], cfg["train"]
    params = budget.policy_params(cfg)
    arts = {(a.step, a.what.split(":")[0]): a.bytes for a in budget.artifacts(cfg)}
    ckpt = params * b["checkpoint_bytes_per_param"]
    assert arts[("train", "checkpoints")] == pytest.approx((t["keep_checkpoints"] + 1) * ckpt)
    n_exports = (t["num_rollout"] // t["save_hf_interval"] if t["save_hf_interval"] else 1) + 1
    assert arts[("train", "HF exports")] == pytest.approx(n_exports * params * b["export_bytes_per_param"])
    index = b["corpus_passages"] * b["embedding_dim"] * 4
    assert arts[("download_index", f"Flat index {b['corpus_passages']:,} x {b['embedding_dim']} fp32")] == 2 * index
    # changing retention or the corpus changes the numbers
    more = (
        config(train={"keep_checkpoints": t["keep_checkpoints"] + 1})
        if which == "full"
        else smoke_config(train={"keep_checkpoints": t["keep_checkpoints"] + 1})
    )
    assert budget.need_bytes(more, "train") == pytest.approx(budget.need_bytes(cfg, "train") + ckpt * b["margin"])
    text = budget.format_plan(cfg)
    for step in ("download_index", "container_image", "train", "evaluate", "export_rl"):
        assert step in text
    assert f"{ckpt / 1e9:.3g} GB" in text and "GPU" in text


def test_full_budget_fits_the_issue_numbers():
    """Qwen2.5-3B with Adam: about 40 GB per checkpoint; the defaults keep the train dir to a few hundred GB
    instead of the several TB of keeping all 150 checkpoints and 150 HF copies."""
    cfg = config()
    t = budget.train_bytes(cfg)
    assert 38e9 < t["checkpoint"] < 48e9
    assert t["checkpoints"] + t["exports"] < 250e9
    keep_all = budget.saves(cfg) * (t["checkpoint"] + t["export"])
    assert keep_all > 5e12


def test_plan_command_prints_the_budget(capsys):
    from searchr1.cli import main

    assert main(["plan", str(SMOKE)]) == 0
    out = capsys.readouterr().out
    assert "Budget of this run" in out and "0.494B params" in out and "train" in out


# --- disk refusal --------------------------------------------------------------------------------------------


def test_train_and_index_refuse_to_start_without_the_disk(tmp_path):
    cfg = config()
    small = lambda _: SimpleNamespace(free=10e9)  # noqa: E731
    for step in ("train", "download_index", "build_index", "container_image"):
        with pytest.raises(budget.DiskBudgetError) as err:
            budget.require_free_disk(cfg, step, tmp_path / step, disk_usage=small)
        msg = str(err.value)
        assert str((tmp_path / step).resolve()) in msg and "10.0 GB are free" in msg
        assert f"{budget.need_bytes(cfg, step) / 1e9:,.1f} GB" in msg
    budget.require_free_disk(cfg, "train", tmp_path, disk_usage=lambda _: SimpleNamespace(free=1e15))
    off = config(budget={"check_free_disk": False})
    budget.require_free_disk(off, "train", tmp_path, disk_usage=small)


def test_a_resumed_job_needs_only_what_is_left(tmp_path):
    cfg = config(toy=True)
    need = budget.need_bytes(cfg, "train")
    (tmp_path / "ckpt.bin").write_bytes(b"\0" * int(need * 0.9))
    budget.require_free_disk(cfg, "train", tmp_path, disk_usage=lambda _: SimpleNamespace(free=need * 0.2))


# --- the container image step --------------------------------------------------------------------------------


def test_image_step_commands(tmp_path):
    sl = dict(config()["train"]["slime"])
    out = image_file(sl, tmp_path / "work")
    assert out == f"{tmp_path}/work/images/slimerl_slime_v0.3.1-cu129.sif"
    command, env = pull_command(sl, out)
    assert command == ["apptainer", "pull", "--force", out + ".partial", "docker://slimerl/slime:v0.3.1-cu129"]
    assert env["APPTAINER_CACHEDIR"] == f"{tmp_path}/work/images/apptainer-cache"  # layers survive a kill
    assert env["APPTAINER_TMPDIR"] == f"{tmp_path}/work/images/tmp"
    docker = {**sl, "container_runtime": "docker"}
    assert image_file(docker, "w").endswith("images/slimerl_slime_v0.3.1-cu129.docker-ref")
    assert pull_command(docker, "x")[0] == ["docker", "pull", "slimerl/slime:v0.3.1-cu129"]
    assert image_file({**sl, "container_runtime": "none"}, "w") is None


def test_image_step_publishes_only_a_complete_pull(tmp_path):
    sl = dict(config()["train"]["slime"])
    out = Path(image_file(sl, tmp_path))
    calls = []

    def run(command, **kwargs):
        calls.append(command)
        if command[:2] == ["apptainer", "pull"]:
            Path(command[3]).write_text("sif")
            return SimpleNamespace(returncode=1 if len(calls) == 1 else 0)
        # docker image inspect --format '{{json .RepoDigests}}'
        return SimpleNamespace(returncode=0, stdout='["slimerl/slime@sha256:abc"]\n', stderr="")

    with pytest.raises(ContainerError, match="resumes"):
        fetch_image(sl, out, run=run)
    assert not out.exists()
    fetch_image(sl, out, run=run)
    assert out.read_text() == "sif" and not Path(str(out) + ".partial").exists()
    docker = {**sl, "container_runtime": "docker"}
    marker = Path(image_file(docker, tmp_path))
    fetch_image(docker, marker, run=run)
    assert marker.read_text().strip() == "slimerl/slime@sha256:abc"  # pullable by any node, unlike an id


# --- container commands: absolute paths and binds ------------------------------------------------------------


def _plan(cfg, tmp_path, runtime, image_file=None):
    cfg = {**cfg, "train": {**cfg["train"], "slime": {**cfg["train"]["slime"], "container_runtime": runtime}}}
    paths = {
        "hf_checkpoint": "data/models/policy_base",
        "train_parquet": "results/data/train.parquet",
        "save_dir": "data/work/train/slime_ckpt",
        "save_hf_dir": "data/work/train/hf",
        "metrics_path": "data/work/train/metrics.jsonl",
        "eval_metrics_path": "data/work/train/eval_curve.jsonl",
        "custom_config_path": "data/work/train/search_config.yaml",
        "retriever_url": "http://127.0.0.1:8000/retrieve",
        "log_dir": "logs",
        "plugin_pythonpath": str(ROOT),
        "work_dir": "data/work",
        "image_file": image_file,
    }
    return build_plan(cfg, paths=paths, env={})


def _binds(command: list[str]) -> list[str]:
    if command[0] == "apptainer":
        spec = command[command.index("--bind") + 1]
        return [b.split(":")[0] for b in spec.split(",")]
    return [command[i + 1].split(":")[0] for i, a in enumerate(command) if a == "-v"]


@pytest.mark.parametrize("runtime", ["apptainer", "docker"])
def test_train_container_commands_use_absolute_paths_and_binds(runtime, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for rel in ("data/models/policy_base", "results/data", "data/work/train", "logs"):
        (tmp_path / rel).mkdir(parents=True, exist_ok=True)
    image = tmp_path / "data/work/images/x.sif"
    plan = _plan(config(), tmp_path, runtime, image_file=str(image) if runtime == "apptainer" else None)
    for command in (plan.head_start, plan.submit):
        binds = _binds(command)
        assert binds and all(os.path.isabs(b) for b in binds)
        assert str(tmp_path / "data/work") in binds or any(str(tmp_path).startswith(b) for b in binds)
        for arg in command:
            if "/" in arg and not arg.startswith(("-", "{", "http")) and os.path.exists(arg.split("@")[0]):
                assert os.path.isabs(arg), arg
    if runtime == "apptainer":
        assert str(image) in plan.submit  # runs the pulled file, not docker://
    assert "--rollout-num-gpus" in entrypoint_argv(plan.submit)


@pytest.mark.parametrize("runtime", ["apptainer", "docker"])
def test_eval_sglang_container_command_uses_absolute_paths_and_binds(runtime, tmp_path, monkeypatch):
    from searchr1.steps.evaluate import sglang_in_container
    from searchr1.steps.settings import StepSettings, declare

    monkeypatch.chdir(tmp_path)
    (tmp_path / "results/models/rl").mkdir(parents=True)
    cfg = config(train={"slime": {"container_runtime": runtime}})
    settings = StepSettings.from_params(
        declare(cfg, "train.slime.container_runtime", "train.slime.image", "train.slime.env"), step="e"
    )
    image = tmp_path / "img.docker-ref"
    image.write_text("slimerl/slime@sha256:feed\n")
    wrap = sglang_in_container(settings, "results/models/rl", str(image))
    model_abs = str(tmp_path / "results/models/rl")  # what sglang_server passes as --model-path
    command = wrap([sys.executable, "-m", "sglang.launch_server", "--model-path", model_abs, "--port", "1"])
    assert _binds(command) == [model_abs]
    assert command[command.index("--model-path") + 1] == model_abs
    assert (str(image) if runtime == "apptainer" else "slimerl/slime@sha256:feed") in command
    with pytest.raises(ContainerError, match="relative"):
        wrap([sys.executable, "-m", "sglang.launch_server", "--model-path", "results/models/rl"])


def test_sglang_server_passes_an_absolute_model_path(tmp_path, monkeypatch):
    """evaluate.sglang_server resolves --model-path before wrapping (checked through the wrap it is given)."""
    import searchr1.evaluate as ev

    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    seen = []

    def wrap(command):
        seen.append(command)
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        with ev.sglang_server("m", port=1, tp=1, mem_fraction=0.5, log_path=tmp_path / "l.log", wrap=wrap):
            pass
    assert seen[0][seen[0].index("--model-path") + 1] == str(tmp_path / "m")


def test_check_absolute_refuses_relative_binds():
    with pytest.raises(ContainerError, match="bind"):
        check_absolute(["x"], ["data/work"])
    with pytest.raises(ContainerError, match="bind"):
        wrap_in_container(["ray", "stop"], config()["train"]["slime"], ["rel/dir"])


# --- evaluation sampling equals slime's eval rollouts --------------------------------------------------------


def _slime_eval_sampling_params(args: SimpleNamespace) -> dict:
    """slime 624b824a ``eval_rollout_single_dataset`` (slime/rollout/sglang_rollout.py:543-558), for a dataset
    config that sets none of its own fields, so each falls back as slime/utils/eval_config.py:10-56 says."""
    return dict(
        temperature=args.eval_temperature if args.eval_temperature is not None else args.rollout_temperature,
        top_p=args.eval_top_p if args.eval_top_p is not None else args.rollout_top_p,
        top_k=args.eval_top_k if args.eval_top_k is not None else args.rollout_top_k,
        max_new_tokens=args.rollout_max_response_len,
        stop=args.rollout_stop,
        stop_token_ids=args.rollout_stop_token_ids,
        skip_special_tokens=args.rollout_skip_special_tokens,
        no_stop_trim=True,
        spaces_between_special_tokens=False,
    )


def _args_from_flags(flags: list[str]) -> SimpleNamespace:
    """The argparse values slime would parse from our flags (defaults from slime/utils/arguments.py:352,383-396
    and 830-832: rollout_top_k -1, rollout_stop/stop_token_ids None, skip_special_tokens False, eval_* None)."""

    def value(name, cast, default):
        return cast(flags[flags.index(name) + 1]) if name in flags else default

    return SimpleNamespace(
        rollout_temperature=value("--rollout-temperature", float, 1.0),
        rollout_top_p=value("--rollout-top-p", float, 1.0),
        rollout_top_k=value("--rollout-top-k", int, -1),
        rollout_max_response_len=value("--rollout-max-response-len", int, None),
        rollout_stop=None,
        rollout_stop_token_ids=None,
        rollout_skip_special_tokens="--rollout-skip-special-tokens" in flags,
        eval_temperature=value("--eval-temperature", float, None),
        eval_top_p=value("--eval-top-p", float, None),
        eval_top_k=value("--eval-top-k", int, None),
    )


@pytest.mark.parametrize("skip", [False, True])
def test_eval_sampling_params_equal_slimes_eval_rollouts(skip, tmp_path):
    from searchr1.agent import STOP_STRINGS
    from searchr1.engines import GenerationRequest, SGLangEngine
    from searchr1.evaluate import eval_agent_config
    from searchr1.slime_plugin import SlimePostEngine

    cfg = config(eval={"interval": 20}, agent={"skip_special_tokens": skip})
    paths = {
        **{
            k: str(tmp_path / k)
            for k in (
                "hf_checkpoint",
                "train_parquet",
                "save_dir",
                "save_hf_dir",
                "metrics_path",
                "eval_metrics_path",
                "custom_config_path",
                "log_dir",
                "plugin_pythonpath",
            )
        },
        "retriever_url": "u",
        "eval_prompt_data": {"nq_test": str(tmp_path / "nq.parquet")},
    }
    slime_args = _args_from_flags(
        recipe_flags(cfg, __import__("searchr1.slime_launch").slime_launch.LaunchPaths.coerce(paths))
    )
    agent = eval_agent_config(cfg)
    request = GenerationRequest(
        input_ids=[1, 2],
        max_new_tokens=agent.max_new_tokens,
        temperature=agent.temperature,
        top_p=agent.top_p,
        top_k=agent.top_k,
        stop=list(STOP_STRINGS),
        text="ctx",
    )
    slime_payload = SlimePostEngine("u", _slime_eval_sampling_params(slime_args), post=None).payload(request)
    ours = SGLangEngine("http://x", skip_special_tokens=cfg["agent"]["skip_special_tokens"]).payload(request)
    assert ours == slime_payload
    assert ours["sampling_params"]["skip_special_tokens"] is skip
    assert ours["sampling_params"]["temperature"] == 0.0 and ours["sampling_params"]["no_stop_trim"] is True
    asyncio.run(asyncio.sleep(0))


# --- values slime accepts ------------------------------------------------------------------------------------

# The choices of every slime/Megatron flag our schema offers, at the pinned versions:
#   slime 624b824a slime/utils/arguments.py:936 (--kl-loss-type), :943-950 (--advantage-estimator);
#   Megatron-LM 1dcf0daf (the image's) megatron/training/arguments.py:2081-2082 (--optimizer),
#   megatron/training/training_config.py:124 (lr_decay_style), megatron/core/transformer/transformer_config.py:388
#   (recompute_granularity), :399 (recompute_method), megatron/core/transformer/enums.py:60-67 (AttnBackend).
ACCEPTED = {
    "kl_loss_type": {"k1", "k2", "k3", "low_var_kl"},
    "advantage_estimator": {"grpo", "gspo", "cispo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "ppo"},
    "optimizer": {"adam", "sgd", "muon", "dist_muon"},
    "lr_decay_style": {"constant", "linear", "cosine", "inverse-square-root", "WSD"},
    "slime.recompute_granularity": {"full", "selective"},
    "slime.recompute_method": {"uniform", "block"},
    "slime.attention_backend": {"flash", "fused", "unfused", "local", "auto"},
}


def test_every_schema_choice_for_a_slime_flag_is_accepted_by_slime():
    from searchr1.config import load_schema

    train = load_schema()["properties"]["train"]["properties"]
    for key, accepted in ACCEPTED.items():
        node = train
        for part in key.split("."):
            node = node[part] if part in node else node["properties"][part]
        assert "enum" in node, f"train.{key} should offer a closed set of choices"
        assert set(node["enum"]) <= accepted, f"train.{key}: {set(node['enum']) - accepted} rejected by slime"


@pytest.mark.parametrize("which", ["full", "smoke"])
def test_launch_flags_pass_the_checks(which, tmp_path):
    cfg = config() if which == "full" else smoke_config()
    plan = _plan(cfg, tmp_path, "none")
    flags = entrypoint_argv(plan.submit)
    # --rollout-num-gpus before --rollout-num-gpus-per-engine (slime's SGLang pre-parser reads the other order
    # as an abbreviation of the latter)
    assert flags.index("--rollout-num-gpus") < flags.index("--rollout-num-gpus-per-engine")
    for flag, key in (
        ("--kl-loss-type", "kl_loss_type"),
        ("--advantage-estimator", "advantage_estimator"),
        ("--optimizer", "optimizer"),
        ("--lr-decay-style", "lr_decay_style"),
        ("--recompute-granularity", "slime.recompute_granularity"),
        ("--attention-backend", "slime.attention_backend"),
    ):
        if flag in flags:
            assert flags[flags.index(flag) + 1] in ACCEPTED[key], flag
    gpus = cfg["train"]["slime"]["gpus_per_node"]
    assert flags[flags.index("--actor-num-gpus-per-node") + 1] == str(gpus)
    assert flags[flags.index("--tensor-model-parallel-size") + 1] == str(
        cfg["train"]["slime"]["tensor_model_parallel_size"]
    )
    if which == "smoke":
        assert gpus == 1 and "--colocate" in flags and "--sequence-parallel" not in flags
        assert budget.eval_questions(cfg) == 600


# --- profiles by name and path -------------------------------------------------------------------------------


def _resources(out: str) -> list[dict[str, str]]:
    """Every job's ``resources:`` line of a dry run, as dicts (key order differs between runs)."""
    rows = []
    for line in out.splitlines():
        if line.strip().startswith("resources:"):
            rows.append(dict(kv.split("=", 1) for kv in line.split(":", 1)[1].strip().split(", ")))
    return sorted(rows, key=lambda r: sorted(r.items()))


@pytest.mark.parametrize("name", ["slurm", "toy"])
def test_profile_by_bare_name_or_path(name):
    """`--profile slurm` (as the README writes it) and `--profile profiles/slurm` work from the checkout and ask
    for the same resources; likewise the toy profile."""
    outs = []
    for profile in (name, f"profiles/{name}"):
        proc = snakemake("--profile", profile, "-n", "results/headline.md")
        assert proc.returncode == 0, proc.stderr[-2000:]
        out = proc.stdout + proc.stderr
        assert f"Using profile {profile} " in out and "Budget of this run" in out
        outs.append(out)
    assert _resources(outs[0]) == _resources(outs[1]) and _resources(outs[0])
    if name == "slurm":
        # slime's 4 GPUs + the default dedicated retriever GPU (docs/placement.md)
        assert "GRPO training (slime) on 5 GPUs" in outs[0] and "slurm_partition" in outs[0]
    else:
        assert "scale toy" in outs[0]


def test_smoke_dry_run_lists_every_step_with_its_budget():
    proc = snakemake("-n", "results/headline.md", "--configfile", "config.yaml", "config.smoke.yaml")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert "0.494B params" in out and "container_image" in out
    assert "GRPO training (slime) on 1 GPUs" in out and "GB of disk under" in out
