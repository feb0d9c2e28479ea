"""Containers and the slime launch on cluster nodes: the image a compute node can pull, the GPUs of the job,
the cluster network's environment, the `ray job submit` entrypoint through a real shell, and the rollout GPUs
that follow the node count (issue #27)."""

from __future__ import annotations

import csv
import json
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import ROOT, config, entrypoint_argv, local_rules

from searchr1 import container, slime_launch
from searchr1.config import ConfigError, load_config
from searchr1.container import ContainerError, fetch_image, image_file
from searchr1.slime_launch import LaunchError, LaunchPaths, build_plan, recipe_flags, wrap_in_container


def paths(tmp: Path, **kw):
    base = dict(
        hf_checkpoint=tmp / "models" / "base",
        train_parquet=tmp / "data" / "train.parquet",
        save_dir=tmp / "train" / "ckpt",
        save_hf_dir=tmp / "train" / "hf",
        metrics_path=tmp / "train" / "metrics.jsonl",
        eval_metrics_path=tmp / "train" / "eval_metrics.jsonl",
        custom_config_path=tmp / "train" / "custom.yaml",
        retriever_url="http://127.0.0.1:8000/retrieve",
        log_dir=tmp / "logs",
        plugin_pythonpath=ROOT,
    )
    base.update(kw)
    return base


def with_slime(runtime: str = "none", **slime):
    cfg = config()
    cfg["train"]["slime"].update(container_runtime=runtime, **slime)
    return cfg


def flag(argv, name):
    return argv[argv.index(name) + 1]


# --- 3. the ray job submit entrypoint through a real shell ---------------------------------------------------

# The two ways Ray's `ray job submit` has joined its entrypoint words before the job supervisor runs the string
# with Popen(shell=True): subprocess.list2cmdline (Ray <= 2.5x, python/ray/dashboard/modules/job/cli.py) and
# shlex.join (POSIX, since ray-project/ray#63797).
JOINERS = {"list2cmdline": subprocess.list2cmdline, "shlex.join": shlex.join}


def _run_like_ray(words: list[str], joiner, cwd: Path, bindir: Path) -> list[str]:
    """What a program started by Ray's job supervisor receives as argv[1:] (python3 replaced by a printer)."""
    printer = bindir / "python3"
    printer.write_text(
        f"#!/bin/sh\nexec {sys.executable} -c 'import json, sys; print(json.dumps(sys.argv[1:]))' \"$@\"\n"
    )
    printer.chmod(0o755)
    out = subprocess.run(
        joiner(words), shell=True, cwd=cwd, capture_output=True, text=True, env={"PATH": f"{bindir}:/usr/bin:/bin"}
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.parametrize("joiner", JOINERS)
def test_entrypoint_reaches_slime_verbatim_through_rays_shell(joiner, tmp_path):
    """The learning curve's `<path>@[0:N]` is a glob to sh, and a path with blanks is two words: both must reach
    slime's train.py unchanged, whichever way the Ray in the image joins the entrypoint."""
    data = tmp_path / "eval data's"  # a blank and a quote in the directory
    data.mkdir()
    plain = tmp_path / "plain"
    plain.mkdir()
    # A file the bare glob `.../hq.parquet@[0:500]` matches: unquoted, sh would pass this name instead.
    (plain / "hq.parquet@0").write_text("")
    cfg = with_slime()
    cfg["eval"]["interval"] = 5
    p = paths(tmp_path, eval_prompt_data={"nq_test": data / "nq.parquet", "hotpotqa_test": plain / "hq.parquet"})
    plan = build_plan(cfg, paths=p, env={})
    s = plan.submit
    words = s[s.index("--") + 1 :]
    bindir = tmp_path / "bin"
    bindir.mkdir()
    got = _run_like_ray(words, JOINERS[joiner], plain, bindir)
    subset = cfg["eval"]["curve_subset"]
    assert got == ["/root/slime/train.py", *recipe_flags(cfg, LaunchPaths.coerce(p))]
    i = got.index("--eval-prompt-data")
    assert got[i + 1 : i + 5] == [
        "hotpotqa_test",
        f"{plain}/hq.parquet@[0:{subset}]",
        "nq_test",
        f"{data}/nq.parquet@[0:{subset}]",
    ]


def test_entrypoint_refuses_what_a_double_quoted_word_would_expand(tmp_path):
    assert slime_launch.ray_entrypoint(["python3", "a b", "x@[0:5]", "it's"])[:2] == ["sh", "-c"]
    for bad in ("/data/$HOME/x", "/data/`id`", "C:\\data"):
        with pytest.raises(LaunchError, match="ray job submit"):
            slime_launch.ray_entrypoint(["python3", bad])
    with pytest.raises(LaunchError, match="ray job submit"):
        build_plan(with_slime(), paths=paths(tmp_path, save_dir=tmp_path / "$ckpt"), env={})


# --- 1. docker: the image by digest, the job's GPUs -------------------------------------------------------------


def test_docker_image_step_records_a_digest_any_node_can_pull(tmp_path):
    sl = dict(config()["train"]["slime"], container_runtime="docker")
    out = Path(image_file(sl, tmp_path))
    assert out.name == "slimerl_slime_v0.3.1-cu129.docker-ref"  # not the .docker-id of old, which held an id

    def run(command, **kwargs):
        if command[:2] == ["docker", "pull"]:
            return SimpleNamespace(returncode=0)
        assert command[:3] == ["docker", "image", "inspect"] and "{{json .RepoDigests}}" in command
        digests = ["mirror.example/slime@sha256:111", "slimerl/slime@sha256:222"]
        return SimpleNamespace(returncode=0, stdout=json.dumps(digests) + "\n", stderr="")

    fetch_image(sl, out, run=run)
    assert out.read_text().strip() == "slimerl/slime@sha256:222"  # the repository asked for, of several
    local_only = lambda command, **kw: SimpleNamespace(returncode=0, stdout="[]\n", stderr="")  # noqa: E731
    with pytest.raises(ContainerError, match="no registry digest.*apptainer"):
        container.docker_digest_ref("mine:latest", run=local_only)
    # the train and eval containers run what the file names, pulled when the node lacks it
    command = wrap_in_container(["ray", "status"], sl, [], image_file=str(out), process_env={})
    assert command[command.index("--pull") + 1] == "missing"
    assert command[-3:] == ["slimerl/slime@sha256:222", "ray", "status"]


def test_image_step_runs_where_its_runtime_runs(tmp_path):
    """apptainer pulls on the submit host (network; the .sif lands on the shared filesystem); docker's step is a
    job on a compute node, where the daemon that will run the image is."""
    assert "container_image" in local_rules("config.yaml")  # apptainer, the default
    docker = tmp_path / "docker.yaml"
    docker.write_text("train: {slime: {container_runtime: docker}}\n")
    assert "container_image" not in local_rules("config.yaml", str(docker))


def _gpus(command: list[str]) -> list[str]:
    """docker's reading of --gpus: a CSV record (github.com/docker/cli opts/gpus.go), here its fields."""
    return next(csv.reader([flag(command, "--gpus")]))


def test_docker_gets_the_jobs_gpus_not_all(tmp_path):
    sl = dict(config()["train"]["slime"], container_runtime="docker")
    wrap = lambda env: wrap_in_container(["nvidia-smi"], sl, [], process_env=env)  # noqa: E731
    assert _gpus(wrap({"CUDA_VISIBLE_DEVICES": "2,3", "SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "0,1,2,3"})) == [
        "device=2,3"  # the process's own view wins: a caller may narrow the job's GPUs (e.g. off the retriever's)
    ]
    assert _gpus(wrap({"SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "1"})) == ["device=1"]
    assert _gpus(wrap({"CUDA_VISIBLE_DEVICES": "GPU-8f2c1a9e-0000-1111-2222-333344445555"})) == [
        "device=GPU-8f2c1a9e-0000-1111-2222-333344445555"
    ]
    assert _gpus(wrap({})) == ["all"]  # no scheduler, no restriction: the machine's GPUs
    with pytest.raises(LaunchError, match="SLURM job 7.*no GPUs"):
        wrap({"SLURM_JOB_ID": "7"})
    with pytest.raises(LaunchError, match="CUDA_VISIBLE_DEVICES=''"):
        wrap({"CUDA_VISIBLE_DEVICES": ""})
    # the launch plan's containers follow the environment it is built in
    plan = build_plan(with_slime("docker"), paths=paths(tmp_path), env={"CUDA_VISIBLE_DEVICES": "1"})
    assert _gpus(plan.head_start) == ["device=1"] and _gpus(plan.submit) == ["device=1"]
    assert container.gpu_devices({"CUDA_VISIBLE_DEVICES": " 0, 1 "}) == "0,1"


def test_apptainer_keeps_the_jobs_gpus_through_cuda_visible_devices(tmp_path):
    plan = build_plan(with_slime("apptainer"), paths=paths(tmp_path), env={"CUDA_VISIBLE_DEVICES": "1"})
    h = plan.head_start
    assert h[:3] == ["apptainer", "exec", "--nv"]
    # no --cleanenv/--containall: apptainer passes the host's CUDA_VISIBLE_DEVICES, which --nv honours
    assert not {"--cleanenv", "-e", "--containall", "-C"} & set(h)


def test_docker_multi_node_is_refused_before_anything_runs():
    with pytest.raises(ConfigError, match="container_runtime': docker cannot run the 2-node launch.*apptainer"):
        config(train={"slime": {"container_runtime": "docker", "nodes": 2}})
    config(train={"slime": {"container_runtime": "apptainer", "nodes": 2}})  # apptainer can
    config(train={"slime": {"container_runtime": "docker", "nodes": 1}})


# --- 2. the cluster network's environment --------------------------------------------------------------------

NET = {
    "NCCL_SOCKET_IFNAME": "ib0",
    "GLOO_SOCKET_IFNAME": "ib0",
    "NCCL_IB_HCA": "mlx5_0,mlx5_1",
    "X_OPTS": 'a=b,"c"',
    "X_QUOTED": '"front',
}


def _pflag_string_to_string(value: str) -> dict[str, str]:
    """How apptainer reads one --env value (spf13/pflag string_to_string.go Set): one '=' is a single pair with
    surrounding double quotes trimmed; more are a CSV record of pairs."""
    fields = [value.strip('"')] if value.count("=") == 1 else next(csv.reader([value]))
    return dict(f.split("=", 1) for f in fields)


def test_cluster_env_reaches_the_runtime_env_and_every_container(tmp_path):
    cfg = with_slime("apptainer", env=dict(NET))
    plan = build_plan(cfg, paths=paths(tmp_path), env={})
    env_vars = json.loads(flag(plan.submit, "--runtime-env-json"))["env_vars"]
    assert {k: env_vars[k] for k in NET} == NET and env_vars["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    for command in (plan.head_start, plan.submit):
        passed: dict[str, str] = {}
        for i, a in enumerate(command[: command.index("docker://slimerl/slime:v0.3.1-cu129")]):
            if a == "--env":
                passed.update(_pflag_string_to_string(command[i + 1]))
        assert passed == NET
    cfg = with_slime("docker", env=dict(NET))
    plan = build_plan(cfg, paths=paths(tmp_path), env={})
    for command in (plan.head_start, plan.submit):
        pairs = [command[i + 1] for i, a in enumerate(command) if a == "-e"]
        assert dict(p.split("=", 1) for p in pairs) == NET  # docker splits -e at the first '='
    plan = build_plan(with_slime("none", env=dict(NET)), paths=paths(tmp_path), env={})  # already in the image
    for command in (plan.head_start, plan.submit):
        assert command[0] == "env" and dict(a.split("=", 1) for a in command[1 : 1 + len(NET)]) == NET
        assert command[1 + len(NET)] == "ray"
    with pytest.raises(LaunchError, match="X_END.*apptainer --env cannot"):
        build_plan(with_slime("apptainer", env={"X_END": 'back"'}), paths=paths(tmp_path), env={})
    with pytest.raises(LaunchError, match="PYTHONPATH.*sets itself"):
        build_plan(with_slime(env={"PYTHONPATH": "/x"}), paths=paths(tmp_path), env={})


def test_cluster_env_reaches_the_eval_sglang_container(tmp_path):
    from searchr1.steps.evaluate import sglang_in_container
    from searchr1.steps.settings import StepSettings, declare

    cfg = config(train={"slime": {"container_runtime": "docker", "env": {"NCCL_SOCKET_IFNAME": "eth1"}}})
    keys = ("train.slime.container_runtime", "train.slime.image", "train.slime.env")
    wrap = sglang_in_container(StepSettings.from_params(declare(cfg, *keys), step="e"), str(tmp_path))
    command = wrap([sys.executable, "-m", "sglang.launch_server"])
    assert flag(command, "-e") == "NCCL_SOCKET_IFNAME=eth1"


@pytest.mark.parametrize(
    "env, match",
    [
        ({"1NCCL": "x"}, "train.slime.env"),
        ({"NCCL-IFNAME": "x"}, "train.slime.env"),
        ({"NCCL_SOCKET_IFNAME": 0}, "train.slime.env.NCCL_SOCKET_IFNAME"),
        ({"NCCL_SOCKET_IFNAME": ["ib0"]}, "train.slime.env.NCCL_SOCKET_IFNAME"),
    ],
)
def test_cluster_env_is_validated(env, match):
    with pytest.raises(ConfigError, match=match):
        config(train={"slime": {"env": env}})
    with pytest.raises(ContainerError):
        container.env_args("docker", env)


def test_cluster_env_is_operational_and_documented():
    from searchr1.config import load_schema

    node = load_schema()["properties"]["train"]["properties"]["slime"]["properties"]["env"]
    assert node["x-operational"] is True and "NCCL_SOCKET_IFNAME" in node["description"]
    assert config()["train"]["slime"]["env"] == {}


# --- 4. rollout GPUs follow the nodes ---------------------------------------------------------------------------

SLURM_2 = {"SLURM_JOB_NODELIST": "n[1-2]"}
FAKE_HOSTS = {"expand_hostnames": lambda s: ["n1", "n2"], "resolve_ip": lambda h: "10.0.0.1"}


def test_rollout_gpus_follow_nodes_under_colocate(tmp_path):
    assert config()["train"]["slime"]["rollout_num_gpus"] == 4  # 1 node x 4
    two = config(train={"slime": {"nodes": 2, "container_runtime": "apptainer"}})
    assert two["train"]["slime"]["rollout_num_gpus"] == 8
    argv = entrypoint_argv(build_plan(two, paths=paths(tmp_path), env=SLURM_2, **FAKE_HOSTS).submit)
    assert flag(argv, "--rollout-num-gpus") == "8" and flag(argv, "--actor-num-nodes") == "2"
    smoke = load_config(ROOT / "config.yaml", ROOT / "config.smoke.yaml")
    assert smoke["train"]["slime"]["rollout_num_gpus"] == 1


@pytest.mark.parametrize(
    "slime, match",
    [
        ({"nodes": 2, "rollout_num_gpus": 4}, "4 colocated rollout GPUs, but training has 8 .*null"),
        ({"rollout_num_gpus": 6}, "6 colocated rollout GPUs, but training has 4"),
        ({"colocate": False}, "required when train.slime.colocate is false"),
        ({"colocate": False, "rollout_num_gpus": 3}, "does not divide rollout_num_gpus 3"),
    ],
)
def test_inconsistent_rollout_gpus_are_refused(slime, match):
    with pytest.raises(ConfigError, match=match):
        config(train={"slime": slime})


def test_rollout_gpus_explicit_without_colocate():
    assert (
        config(train={"slime": {"colocate": False, "rollout_num_gpus": 2}})["train"]["slime"]["rollout_num_gpus"] == 2
    )


def test_train_rule_declares_what_the_launch_reads_for_the_cluster(tmp_path):
    """Through the train rule's own declared params (what the job may read): the env map and the derived rollout
    GPUs reach the commands the job runs."""
    from helpers import rule_params

    from searchr1.steps.settings import StepSettings
    from searchr1.steps.train import slime_preview

    overlay = tmp_path / "cluster.yaml"
    overlay.write_text("train: {slime: {nodes: 2, env: {NCCL_SOCKET_IFNAME: ib0}}}\n")
    settings = StepSettings.from_params(rule_params("train", "config.yaml", str(overlay)), step="train")
    preview = slime_preview(settings, base_model="data/models/policy_base", train_parquet="results/data/train.parquet")
    submit = next(line for line in preview.splitlines() if " ray job submit " in line)
    argv = shlex.split(submit)
    assert argv[argv.index("--env") + 1] == "NCCL_SOCKET_IFNAME=ib0"
    assert json.loads(flag(argv, "--runtime-env-json"))["env_vars"]["NCCL_SOCKET_IFNAME"] == "ib0"
    train = entrypoint_argv(argv)
    assert flag(train, "--rollout-num-gpus") == "8" and flag(train, "--actor-num-nodes") == "2"
