"""Build and run the slime command lines for the Search-R1 recipe (Ray cluster + `ray job submit`).

``build_plan(cfg, paths=...)`` turns the config into argument lists (never shell strings): a Ray head,
one Ray worker per extra SLURM node (``srun --nodes=1 --ntasks=1 -w <node>`` with the node's resources;
the prefix is injectable), a pre-flight check per node, the ``ray job submit`` of slime's ``train.py``
with every recipe flag, each wrapped in the container runtime. ``run_plan`` executes it: it waits until
every node has joined with its GPUs (``searchr1.cluster``), runs the pre-flight from every node, watches
the workers while slime runs, and always stops what it started. Unlike slime's example script, nothing
here kills processes by name: only the processes this module started, by their handles, and what is left
of this job's own Ray (its per-job ``--temp-dir``).

Flag names are checked against THUDM/slime 624b824a ``slime/utils/arguments.py``; the Megatron flags
(parallelism, recompute, optimizer, dropout) are the ones slime's ``examples/search-r1/run_qwen2.5_3B.sh``
and ``scripts/models/qwen2.5-*.sh`` pass.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from searchr1.cluster import NODE_RESOURCE_PREFIX, ClusterError, WorkerWatch, preflight, stop_job_ray, wait_for_nodes
from searchr1.process import free_port, http_ok, log_tail, managed_process, sigterm_raises, stop_process_group
from searchr1.reward import EM_REWARD_KEY, TRAINING_REWARD_KEY, RewardSettings

PLUGIN = "searchr1.slime_plugin"
DASHBOARD_HOST = "127.0.0.1"

# Megatron architecture flags per HF model, from slime's scripts/models/qwen2.5-*.sh (624b824a).
_QWEN25_COMMON = [
    "--swiglu", "--use-rotary-position-embeddings", "--disable-bias-linear", "--add-qkv-bias",
    "--normalization", "RMSNorm", "--norm-epsilon", "1e-6", "--group-query-attention",
]  # fmt: skip
MODEL_ARGS: dict[str, list[str]] = {
    "qwen2.5-0.5B": _QWEN25_COMMON + [
        "--num-layers", "24", "--hidden-size", "896", "--ffn-hidden-size", "4864", "--num-attention-heads", "14",
        "--rotary-base", "1000000", "--num-query-groups", "2", "--vocab-size", "151936",
    ],
    "qwen2.5-1.5B": _QWEN25_COMMON + [
        "--num-layers", "28", "--hidden-size", "1536", "--ffn-hidden-size", "8960", "--num-attention-heads", "12",
        "--rotary-base", "10000", "--num-query-groups", "2", "--vocab-size", "151936",
    ],
    "qwen2.5-3B": _QWEN25_COMMON + [
        "--num-layers", "36", "--hidden-size", "2048", "--ffn-hidden-size", "11008", "--num-attention-heads", "16",
        "--rotary-base", "1000000", "--num-query-groups", "2", "--vocab-size", "151936",
    ],
    "qwen2.5-7B": _QWEN25_COMMON + [
        "--num-layers", "28", "--hidden-size", "3584", "--ffn-hidden-size", "18944", "--num-attention-heads", "28",
        "--rotary-base", "1000000", "--num-query-groups", "4", "--vocab-size", "152064",
        "--untie-embeddings-and-output-weights",
    ],
}  # fmt: skip


class LaunchError(RuntimeError):
    """The plan cannot be built or run; the message names the bad setting."""


def model_args_for(policy_repo: str) -> list[str]:
    """MODEL_ARGS for an HF repo id such as ``Qwen/Qwen2.5-3B`` (the -Instruct variants share them)."""
    name = policy_repo.rsplit("/", 1)[-1]
    key = re.sub(r"-instruct$", "", name.lower())
    for known in MODEL_ARGS:
        if known.lower() == key:
            return list(MODEL_ARGS[known])
    raise LaunchError(
        f"policy.repo {policy_repo!r}: no Megatron MODEL_ARGS known for it (known: {', '.join(MODEL_ARGS)}); "
        "add them to searchr1.slime_launch.MODEL_ARGS from slime's scripts/models/"
    )


@dataclass
class LaunchPaths:
    hf_checkpoint: str  # base HF dir: --hf-checkpoint and --ref-load
    train_parquet: str
    save_dir: str  # --save and --load (resume)
    save_hf_dir: str  # --save-hf <dir>/iter_{rollout_id}
    metrics_path: str
    eval_metrics_path: str
    custom_config_path: str
    retriever_url: str
    log_dir: str
    plugin_pythonpath: str  # the directory holding the searchr1 package
    eval_prompt_data: dict[str, str] = field(default_factory=dict)  # name -> parquet (learning-curve evals)
    work_dir: str | None = None  # the run's work directory (bound into the container as a whole)
    image_file: str | None = None  # the pulled image (rule container_image); None = the config's image

    @classmethod
    def coerce(cls, paths: LaunchPaths | Mapping[str, Any]) -> LaunchPaths:
        if isinstance(paths, LaunchPaths):
            return paths
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(paths) - known)
        if unknown:
            raise LaunchError(f"unknown launch path keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        values = {k: v for k, v in paths.items()}
        for key, value in values.items():
            if key != "eval_prompt_data" and value is not None:
                values[key] = str(value) if key == "retriever_url" else os.path.abspath(os.fspath(value))
        values["eval_prompt_data"] = {
            str(k): os.path.abspath(os.fspath(v)) for k, v in (values.get("eval_prompt_data") or {}).items()
        }
        return cls(**values)


@dataclass
class ClusterInfo:
    head_host: str
    head_ip: str
    worker_hosts: list[str]

    @property
    def hosts(self) -> list[str]:
        return [self.head_host, *self.worker_hosts]


def is_loopback(address: str) -> bool:
    """Whether ``address`` is a loopback IP (127.0.0.0/8, ::1): Debian's ``127.0.1.1 <hostname>`` hosts entry
    makes a node's own name resolve to one."""
    import ipaddress

    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def slurm_hostnames(nodelist: str) -> list[str]:
    """Expand a SLURM node list (``node[01-03]``) with ``scontrol show hostnames``."""
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True)
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def slurm_job_nodelist(job_id: str) -> str | None:
    """The node list of SLURM job ``job_id`` as slurmctld has it (``squeue -j``); None if it cannot say."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%N"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    nodelist = out.stdout.strip()
    return nodelist if out.returncode == 0 and nodelist else None


def cluster_from_env(
    nodes: int,
    env: Mapping[str, str] | None = None,
    *,
    expand_hostnames: Callable[[str], list[str]] = slurm_hostnames,
    resolve_ip: Callable[[str], str] = socket.gethostbyname,
    job_nodelist: Callable[[str], str | None] = slurm_job_nodelist,
) -> ClusterInfo:
    """Head and worker hosts: one node = this machine; more = the first ``nodes`` of SLURM_JOB_NODELIST.

    Inside a job step that covers fewer nodes than the job, SLURM_JOB_NODELIST names the step's nodes only:
    the Snakemake SLURM executor runs the rule under ``srun -n1 ... --nodes=N`` (snakemake-executor-plugin-
    slurm-jobstep 0.6.1), which srun reduces to one node, and SLURM 22.05 then sets SLURM_JOB_NODELIST to that
    node (SLURM_NODELIST kept the job's: tests/test_slurm_cluster.py). So when the variables list fewer than
    ``nodes`` hosts, the job's own node list is asked from SLURM (``job_nodelist(SLURM_JOB_ID)``)."""
    env = os.environ if env is None else env
    if nodes <= 1:
        return ClusterInfo(head_host="localhost", head_ip=env.get("MASTER_ADDR", "127.0.0.1"), worker_hosts=[])
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise LaunchError(f"train.slime.nodes is {nodes} but SLURM_JOB_NODELIST is not set (run inside a SLURM job)")
    hosts = expand_hostnames(nodelist)
    if len(hosts) < nodes and env.get("SLURM_JOB_ID"):
        from_job = job_nodelist(env["SLURM_JOB_ID"])
        if from_job and from_job != nodelist:
            nodelist, hosts = from_job, expand_hostnames(from_job)
    if len(hosts) < nodes:
        raise LaunchError(
            f"train.slime.nodes is {nodes} but the SLURM allocation has {len(hosts)}: {hosts} (node list "
            f"{nodelist!r}; submit the job with --nodes={nodes})"
        )
    head = hosts[0]
    given = env.get("MASTER_ADDR") or env.get("SLIME_HOST_IP")
    head_ip = given or resolve_ip(head)
    if is_loopback(head_ip):
        source = "MASTER_ADDR/SLIME_HOST_IP" if given else f"the name {head!r} (resolved on this node)"
        raise LaunchError(
            f"train.slime.nodes is {nodes} but the head's address from {source} is the loopback address "
            f"{head_ip}, which the other nodes cannot reach (Debian-style hosts files map the own hostname to "
            "127.0.1.1); set MASTER_ADDR (or SLIME_HOST_IP) to the head's address on the cluster network"
        )
    return ClusterInfo(head_host=head, head_ip=head_ip, worker_hosts=hosts[1:nodes])


def srun_prefix(resources: Mapping[str, Any], gpus_per_node: int) -> Callable[[str], list[str]]:
    """The prefix that runs a command on one node of the train job's allocation: a SLURM step with that node's
    share of the job (``train.resources`` cpus and mem_mb are per node; ``gpus_per_node``).

    The resources are explicit because since SLURM 22.05 a step no longer inherits the job's
    ``--cpus-per-task``: without them a worker's whole Ray runtime could be put on one CPU. ``--overlap``
    because the job's own first step (the one running this launcher) may already hold the allocation's
    resources, and a step that may not share them would wait for them forever; the explicit sizes keep
    each step to its node's share. ``--exact`` is not needed: one task per step, with its CPUs given.
    """
    cpus = int(resources["cpus"])
    mem_mb = int(resources["mem_mb"])

    def prefix(host: str) -> list[str]:
        out = [
            "srun",
            "--nodes=1",
            "--ntasks=1",
            "-w",
            host,
            "--overlap",
            f"--cpus-per-task={cpus}",
            f"--mem={mem_mb}M",
        ]
        if gpus_per_node:
            out.append(f"--gres=gpu:{gpus_per_node}")
        return out

    return prefix


@dataclass
class NodeCheck:
    """The pre-flight of one node: ``command`` runs ``searchr1/node_check.py`` there (through the node's prefix)."""

    host: str
    command: list[str]


@dataclass
class LaunchPlan:
    head_start: list[str]
    worker_starts: list[list[str]]
    submit: list[str]
    stop: list[str] | None  # docker: stop the head's container; else None (the per-job Ray temp dir is enough)
    dashboard_url: str
    custom_config: dict[str, Any]
    make_dirs: list[str]
    save_dir: str
    metrics_path: str
    gpus_per_node: int  # the GPUs every node must bring before the job is submitted
    join_timeout_s: float  # how long to wait for them, and for each node's pre-flight (multi-node)
    worker_hosts: list[str] = field(default_factory=list)  # one per worker_starts entry
    head_host: str = "localhost"
    ray_temp_dir: str | None = None  # this job's Ray --temp-dir: what is left under it is this job's
    node_checks: list[NodeCheck] = field(default_factory=list)  # the pre-flight, head first (multi-node)
    preflight_dir: str | None = None
    preflight_token: str = ""

    def commands(self) -> list[list[str]]:
        return [
            self.head_start,
            *self.worker_starts,
            *(c.command for c in self.node_checks),
            self.submit,
            *([self.stop] if self.stop else []),
        ]

    def to_shell(self) -> str:
        """One ``shlex.join`` line per command (for ``snakemake -n -p``); workers and head run in the background."""
        lines = [shlex.join(self.head_start) + " &"]
        lines += [shlex.join(w) + " &" for w in self.worker_starts]
        if self.worker_starts:
            lines.append(
                f"# wait until {1 + len(self.worker_starts)} nodes with {self.gpus_per_node} GPUs each "
                f"have joined (at most {self.join_timeout_s:g} s), then the pre-flight on every node:"
            )
        lines += [shlex.join(c.command) for c in self.node_checks]
        lines.append(shlex.join(self.submit))
        if self.stop:
            lines.append(shlex.join(self.stop))
        if self.ray_temp_dir:
            lines.append(f"# then: stop what is left of this job's Ray (processes under {self.ray_temp_dir})")
        return "\n".join(lines)


def _flag_value(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _bind_dirs(paths: LaunchPaths, slime_cfg: Mapping[str, Any]) -> list[str]:
    dirs = [
        paths.plugin_pythonpath, paths.hf_checkpoint, os.path.dirname(paths.train_parquet), paths.save_dir,
        paths.save_hf_dir, os.path.dirname(paths.metrics_path), os.path.dirname(paths.eval_metrics_path),
        os.path.dirname(paths.custom_config_path), paths.log_dir, *([paths.work_dir] if paths.work_dir else []),
        *(os.path.dirname(p) for p in paths.eval_prompt_data.values()),
        *(os.path.abspath(p) for p in slime_cfg["extra_binds"]),
    ]  # fmt: skip
    unique: list[str] = []
    for d in sorted(set(dirs)):
        if not any(d == u or d.startswith(u.rstrip("/") + "/") for u in unique):
            unique.append(d)
    for d in unique:
        if "," in d or ":" in d:
            raise LaunchError(f"path {d!r} contains ',' or ':', which container bind specs cannot express")
    return unique


def wrap_in_container(
    command: Sequence[str],
    slime_cfg: Mapping[str, Any],
    binds: Sequence[str],
    *,
    name: str | None = None,
    image_file: str | None = None,
    env: Mapping[str, str] | None = None,
    process_env: Mapping[str, str] | None = None,
) -> list[str]:
    """``command`` inside the configured container runtime (apptainer | docker | none).

    Every bind is an absolute host directory mounted at the same path, and no argument is a relative path
    (searchr1.container.check_absolute), so the command means the same inside as outside. ``image_file`` is
    the image the ``container_image`` step pulled (a .sif, or a file holding the docker digest reference).
    ``env`` (train.slime.env) is set inside the container. GPUs: the ones of the process that runs the command
    (``process_env``, default this process's environment: CUDA_VISIBLE_DEVICES, SLURM's GPU variables), see
    searchr1.container.gpu_devices; apptainer's ``--nv`` honours CUDA_VISIBLE_DEVICES by itself.
    """
    from searchr1.container import ContainerError, check_absolute, env_args, gpu_devices, image_ref

    runtime = slime_cfg["container_runtime"]
    image = slime_cfg["image"]
    env = dict(env or {})
    try:
        env_flags = env_args(runtime, env)
        devices = gpu_devices(process_env) if runtime == "docker" else None
    except ContainerError as exc:
        raise LaunchError(str(exc)) from exc
    if runtime == "none":
        # already inside the image: the variables through env(1), still one argument each
        return ["env", *env_flags, *command] if env_flags else list(command)
    if not image:
        raise LaunchError(f"train.slime.image is required with container_runtime {runtime!r}")
    check_absolute(command, binds)
    ref = image_ref(slime_cfg, image_file)
    if runtime == "apptainer":
        bind = ",".join(f"{d}:{d}" for d in binds)
        return ["apptainer", "exec", "--nv", *env_flags, *(["--bind", bind] if bind else []), ref, *command]
    if runtime == "docker":
        # docker's --gpus value is CSV: a device list with commas must be one quoted field.
        gpus = "all" if devices is None else f'"device={devices}"'
        out = ["docker", "run", "--rm", "--pull", "missing", "--gpus", gpus, "--ipc=host", "--network", "host",
               "--shm-size", "16g", *env_flags]  # fmt: skip
        if name:
            out += ["--name", name]
        for d in binds:
            out += ["-v", f"{d}:{d}"]
        return out + [ref, *command]
    raise LaunchError(f"train.slime.container_runtime {runtime!r}: expected apptainer, docker or none")


# Characters a double-quoted POSIX shell word still interprets (see ray_entrypoint).
_DOUBLE_QUOTE_SPECIAL = ("$", "`", "\\")


def ray_entrypoint(argv: Sequence[str]) -> list[str]:
    """``argv`` as the entrypoint of ``ray job submit``: ``sh -c 'exec <argv, shell-quoted>'``.

    Ray's CLI joins the entrypoint words into one string that the job supervisor runs with
    ``subprocess.Popen(entrypoint, shell=True)`` (python/ray/dashboard/modules/job/job_supervisor.py). How it
    joins depends on the Ray version inside the image: ``subprocess.list2cmdline`` (cmd.exe rules; Ray 2.46,
    python/ray/dashboard/modules/job/cli.py ``submit``), which leaves ``[0:500]`` bare for sh to glob and puts
    a path with blanks in double quotes, or ``shlex.join`` on POSIX since ray-project/ray#63797 (2026-06),
    which quotes right. Quoting each word ourselves would be quoted again by the latter. One ``sh -c`` script
    built with ``shlex.join`` survives both: shlex.join keeps it one single-quoted word; list2cmdline puts
    it in double quotes, where sh expands only ``$``, backquotes and backslashes, so those are refused.
    """
    script = "exec " + shlex.join(str(a) for a in argv)
    bad = sorted({c for c in _DOUBLE_QUOTE_SPECIAL if c in script})
    if bad:
        culprit = next(a for a in argv if any(c in str(a) for c in bad))
        raise LaunchError(
            f"slime argument {culprit!r} contains {' '.join(bad)}: `ray job submit` may pass its entrypoint "
            "through a double-quoted shell word, where these are expanded; rename the path or setting"
        )
    return ["sh", "-c", script]


def recipe_flags(cfg: Mapping[str, Any], paths: LaunchPaths) -> list[str]:
    """Every slime/Megatron flag of the recipe, grouped as in slime's run_qwen2.5_3B.sh."""
    train, sl = cfg["train"], cfg["train"]["slime"]
    f: list[str] = []
    f += model_args_for(cfg["policy"]["repo"])
    f += [  # checkpoints: HF ref directly (slime >= v0.2), resume from the save dir, HF copies as we go
        "--hf-checkpoint", paths.hf_checkpoint, "--ref-load", paths.hf_checkpoint,
        "--load", paths.save_dir, "--save", paths.save_dir, "--save-interval", str(train["save_interval"]),
        "--save-hf", f"{paths.save_hf_dir}/iter_{{rollout_id}}",
    ]  # fmt: skip
    f += [
        "--prompt-data", paths.train_parquet, "--input-key", "prompt", "--label-key", "reward_model",
        "--apply-chat-template",
    ]  # fmt: skip
    if train["rollout_shuffle"]:
        f.append("--rollout-shuffle")
    f += [
        # the run's training seed (train.seeds): slime's rollout (prompt order, sampling) and Megatron's RNG
        "--seed", str(train["seed"]), "--rollout-seed", str(train["seed"]),
        "--num-rollout", str(train["num_rollout"]),
        "--rollout-batch-size", str(train["rollout_batch_size"]),
        "--n-samples-per-prompt", str(train["n_samples_per_prompt"]),
        "--rollout-max-response-len", str(train["rollout_max_response_len"]),
        "--rollout-temperature", _flag_value(train["rollout_temperature"]),
        "--rollout-top-p", _flag_value(train["rollout_top_p"]),
        "--global-batch-size", str(train["global_batch_size"]),
    ]  # fmt: skip
    if cfg["agent"]["skip_special_tokens"]:  # slime's default (flag unset) sends skip_special_tokens false
        f.append("--rollout-skip-special-tokens")
    if sl["balance_data"]:
        f.append("--balance-data")
    # perf
    f += [
        "--tensor-model-parallel-size", str(sl["tensor_model_parallel_size"]),
        "--pipeline-model-parallel-size", str(sl["pipeline_model_parallel_size"]),
        "--context-parallel-size", str(sl["context_parallel_size"]),
        "--expert-model-parallel-size", "1", "--expert-tensor-parallel-size", "1",
    ]  # fmt: skip
    if sl["sequence_parallel"]:
        f.append("--sequence-parallel")
    if sl["recompute_granularity"]:
        f += ["--recompute-granularity", sl["recompute_granularity"]]
        if sl["recompute_granularity"] == "full":
            f += [
                "--recompute-method",
                sl["recompute_method"],
                "--recompute-num-layers",
                str(sl["recompute_num_layers"]),
            ]
    if sl["use_dynamic_batch_size"]:
        f += ["--use-dynamic-batch-size", "--max-tokens-per-gpu", str(sl["max_tokens_per_gpu"])]
    else:
        f += ["--micro-batch-size", str(sl["micro_batch_size"])]
    # GRPO
    f += ["--advantage-estimator", train["advantage_estimator"]]
    if train["use_kl_loss"]:
        f += ["--use-kl-loss", "--kl-loss-coef", _flag_value(train["kl_loss_coef"]),
              "--kl-loss-type", train["kl_loss_type"]]  # fmt: skip
    f += [
        "--entropy-coef", _flag_value(train["entropy_coef"]),
        "--eps-clip", _flag_value(train["eps_clip"]), "--eps-clip-high", _flag_value(train["eps_clip_high"]),
    ]  # fmt: skip
    if train["use_tis"]:
        f.append("--use-tis")
    # optimizer
    f += [
        "--optimizer", train["optimizer"], "--lr", _flag_value(train["lr"]),
        "--lr-decay-style", train["lr_decay_style"],
        "--weight-decay", _flag_value(train["weight_decay"]),
        "--adam-beta1", _flag_value(train["adam_beta1"]),
        "--adam-beta2", _flag_value(train["adam_beta2"]),
    ]  # fmt: skip
    # SGLang
    f += [
        # --rollout-num-gpus first, as slime's example does: after --rollout-num-gpus-per-engine, SGLang's
        # argument pre-parser would read it as an abbreviation of that flag.
        "--rollout-num-gpus", str(sl["rollout_num_gpus"]),
        "--rollout-num-gpus-per-engine", str(sl["rollout_num_gpus_per_engine"]),
        "--sglang-mem-fraction-static", _flag_value(sl["sglang_mem_fraction_static"]),
    ]  # fmt: skip
    # misc (as the seed script)
    f += [
        "--attention-dropout", "0.0", "--hidden-dropout", "0.0", "--accumulate-allreduce-grads-in-fp32",
        "--attention-softmax-in-fp32", "--attention-backend", sl["attention_backend"],
    ]  # fmt: skip
    # our plugin
    f += [
        "--custom-generate-function-path", f"{PLUGIN}.generate",
        "--custom-rm-path", f"{PLUGIN}.reward_func",
        "--custom-rollout-log-function-path", f"{PLUGIN}.log_rollout",
        "--custom-config-path", paths.custom_config_path,
    ]  # fmt: skip
    if not RewardSettings.from_config(cfg).is_exact_match:
        # a format-aware reward: the plugin's reward is a dict; slime trains on its "score" and evaluates its "em"
        # (slime/utils/arguments.py:1336-1350 at 624b824a; searchr1.slime_plugin.reward_func says where slime
        # reads them). All scores 0: neither flag and a float reward, the seed recipe's command exactly.
        f += ["--reward-key", TRAINING_REWARD_KEY, "--eval-reward-key", EM_REWARD_KEY]
    # learning-curve evals inside training (optional)
    interval = cfg["eval"]["interval"]
    if interval and paths.eval_prompt_data:
        subset = cfg["eval"]["curve_subset"]
        data: list[str] = []
        for name, path in sorted(paths.eval_prompt_data.items()):
            data += [name, f"{path}@[0:{subset}]"]
        f += [
            "--eval-interval", str(interval), "--eval-prompt-data", *data,
            "--eval-input-key", "prompt", "--eval-label-key", "reward_model", "--n-samples-per-eval-prompt", "1",
            "--eval-temperature", _flag_value(cfg["eval"]["temperature"]),
            # the standalone evaluation's top_p 1 / top_k -1 (searchr1.evaluate.eval_agent_config); unset,
            # slime would fall back to the rollout's (slime/utils/eval_config.py: eval_top_p -> rollout_top_p)
            "--eval-top-p", "1.0", "--eval-top-k", "-1",
            "--custom-eval-rollout-log-function-path", f"{PLUGIN}.log_eval",
        ]  # fmt: skip
    # resources
    f += [
        "--actor-num-nodes", str(sl["nodes"]), "--actor-num-gpus-per-node", str(sl["gpus_per_node"]),
        "--num-gpus-per-node", str(sl["gpus_per_node"]),
    ]  # fmt: skip
    if sl["colocate"]:
        f.append("--colocate")
    f += [str(a) for a in sl["extra_args"]]
    return f


def custom_config(
    cfg: Mapping[str, Any], retriever_url: str, metrics_path: str | Path, eval_metrics_path: str | Path | None = None
) -> dict[str, Any]:
    """The keys slime sets on ``args`` from --custom-config-path, read by searchr1.slime_plugin."""
    agent, retriever = cfg["agent"], cfg["retriever"]
    out: dict[str, Any] = {
        "search_url": retriever_url,
        "search_topk": int(retriever["topk"]),
        "search_max_turns": int(agent["max_turns"]),
        "search_on_error": str(agent["on_retrieval_error"]),
        "search_timeout_s": float(retriever["timeout_s"]),
        "search_max_retries": int(retriever["max_retries"]),
        "search_concurrency": int(agent["search_concurrency"]),
        "search_input_mode": str(agent["sglang_input"]),
        "search_metrics_path": os.path.abspath(os.fspath(metrics_path)),
        # the training reward's scores (searchr1.slime_plugin.reward_settings)
        **{f"search_{name}": float(value) for name, value in asdict(RewardSettings.from_config(cfg)).items()},
    }
    if eval_metrics_path:
        out["search_eval_metrics_path"] = os.path.abspath(os.fspath(eval_metrics_path))
    return out


def write_custom_config(
    path: str | Path,
    cfg: Mapping[str, Any],
    retriever_url: str,
    metrics_path: str | Path,
    eval_metrics_path: str | Path | None = None,
) -> dict[str, Any]:
    """Write the custom-config YAML atomically; return what was written."""
    data = custom_config(cfg, retriever_url, metrics_path, eval_metrics_path)
    from searchr1.fsutil import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(data, sort_keys=True))
    return data


def ray_temp_dir(env: Mapping[str, str]) -> str:
    """A Ray ``--temp-dir`` of this job alone (the worker nodes take the head's): short, because Ray's unix
    sockets live under it and a socket path may not exceed 107 bytes."""
    job = env.get("SLURM_JOB_ID") or str(os.getpid())
    return f"/tmp/searchr1-ray-{job}"


def build_plan(
    cfg: Mapping[str, Any],
    *,
    paths: LaunchPaths | Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    expand_hostnames: Callable[[str], list[str]] = slurm_hostnames,
    resolve_ip: Callable[[str], str] = socket.gethostbyname,
    node_prefix: Callable[[str], list[str]] | None = None,
    pick_port: Callable[[], int | str] | None = None,
    head_gpus: Sequence[str] | None = None,
) -> LaunchPlan:
    """The full launch as argument lists, from the config, the paths and (multi-node) the SLURM env.

    ``node_prefix(host)`` is what runs a command on another node of the allocation (default: ``srun_prefix``,
    a SLURM step with the node's resources); the two-node test replaces it by entering a network namespace.
    ``pick_port()`` gives the Ray ports the config leaves open (null); by default a port free on every
    interface of this node (the head) right now, so two runs sharing a node do not collide.

    ``head_gpus``: the GPU ids the Ray head may hand to slime (searchr1.retrieval.placement): the job's other
    GPUs (a dedicated retriever's) stay out of Ray's reach. Apptainer and no container: ``env
    CUDA_VISIBLE_DEVICES=...`` before ``ray start`` (host ids: ``--nv`` keeps them); docker: the container is
    given only those GPUs (``--gpus device=...``, renumbered from 0 inside). slime's actors map the ids Ray
    gives them through CUDA_VISIBLE_DEVICES (slime/utils/accelerator ``resolve_visible_device_id``, 624b824a),
    so any subset works. The retriever runs on the first node only, so the other nodes' ``ray start`` is left
    as it is.
    """
    paths = LaunchPaths.coerce(paths)
    env = os.environ if env is None else env
    sl = cfg["train"]["slime"]
    nodes = int(sl["nodes"])
    cluster = cluster_from_env(nodes, env, expand_hostnames=expand_hostnames, resolve_ip=resolve_ip)
    if node_prefix is None:
        node_prefix = srun_prefix(cfg["train"]["resources"], int(sl["gpus_per_node"]))
    if pick_port is None:
        pick_port = lambda: free_port("0.0.0.0")  # noqa: E731
    ray_port, dashboard_port, client_port, agent_port = (
        sl[key] or pick_port()
        for key in ("ray_port", "dashboard_port", "ray_client_server_port", "dashboard_agent_port")
    )
    gpus = str(sl["gpus_per_node"])
    temp_dir = ray_temp_dir(env)
    binds = _bind_dirs(paths, sl)
    container_name = f"searchr1-slime-{os.getpid()}" if sl["container_runtime"] == "docker" else None

    cluster_env = dict(sl["env"])

    def wrap(command: list[str], name: str | None = None, process_env: Mapping[str, str] | None = env) -> list[str]:
        return wrap_in_container(
            command, sl, binds, name=name, image_file=paths.image_file, env=cluster_env, process_env=process_env
        )

    def node_label(host: str) -> list[str]:
        # A custom resource naming the node's host in the allocation: the join wait finds each node by it,
        # whatever interface Ray picked for the node's address.
        return ["--resources", json.dumps({f"{NODE_RESOURCE_PREFIX}{host}": 1})]

    head = [
        "ray", "start", "--head", "--node-ip-address", cluster.head_ip, "--port", str(ray_port),
        "--dashboard-host", DASHBOARD_HOST, "--dashboard-port", str(dashboard_port),
        "--ray-client-server-port", str(client_port), "--dashboard-agent-listen-port", str(agent_port),
        "--temp-dir", temp_dir, "--num-gpus", gpus, *node_label(cluster.head_host), "--disable-usage-stats", "--block",
    ]  # fmt: skip
    if head_gpus is not None:
        if len(head_gpus) != int(gpus):
            raise LaunchError(
                f"the Ray head is given {len(head_gpus)} GPU(s) ({','.join(head_gpus) or 'none'}) but "
                f"train.slime.gpus_per_node is {gpus}"
            )
        if sl["container_runtime"] != "docker":
            head = ["env", f"CUDA_VISIBLE_DEVICES={','.join(head_gpus)}", *head]
    # docker: the head's container is given the head's GPUs only (searchr1.container.gpu_devices)
    head_env = None if head_gpus is None else {**env, "CUDA_VISIBLE_DEVICES": ",".join(head_gpus)}
    workers = []
    for host in cluster.worker_hosts:
        start = ["ray", "start", "--address", f"{cluster.head_ip}:{ray_port}", "--num-gpus", gpus,
                 *node_label(host), "--disable-usage-stats", "--block"]  # fmt: skip
        workers.append([*node_prefix(host), *wrap(start)])

    # Multi-node: the pre-flight, from every node through the prefix and container its Ray runs in.
    preflight_dir = os.path.join(os.path.dirname(paths.save_hf_dir), ".preflight")
    token = f"{temp_dir.rsplit('-', 1)[-1]}-{os.urandom(6).hex()}"
    checks = []
    if cluster.worker_hosts:
        script = os.path.join(paths.plugin_pythonpath, "searchr1", "node_check.py")
        for host in cluster.hosts:
            check = ["python3", script, "--node", host, "--url", paths.retriever_url, "--dir", preflight_dir,
                     "--token", token, "--timeout-s", _flag_value(float(cfg["retriever"]["timeout_s"]))]  # fmt: skip
            prefix = [] if host == cluster.head_host else node_prefix(host)
            checks.append(NodeCheck(host=host, command=[*prefix, *wrap(check)]))

    own_env = {
        "PYTHONPATH": f"{sl['megatron_dir']}:{paths.plugin_pythonpath}",
        "CUDA_DEVICE_MAX_CONNECTIONS": "1",
        "PYTHONUNBUFFERED": "1",
        "MASTER_ADDR": cluster.head_ip,
    }
    clash = sorted(set(cluster_env) & set(own_env))
    if clash:
        raise LaunchError(f"train.slime.env sets {', '.join(clash)}, which the launch sets itself")
    # The cluster-network variables reach every process of slime's job (Ray applies env_vars to its workers).
    runtime_env = {"env_vars": {**own_env, **cluster_env}}
    dashboard_url = f"http://{DASHBOARD_HOST}:{dashboard_port}"
    train_argv = ["python3", f"{sl['slime_dir'].rstrip('/')}/train.py", *recipe_flags(cfg, paths)]
    if sl["container_runtime"] != "none":
        from searchr1.container import check_absolute

        check_absolute(train_argv, binds)  # inside the sh -c script below, wrap_in_container cannot see them
    submit = [
        "ray", "job", "submit", "--address", dashboard_url, "--runtime-env-json", json.dumps(runtime_env), "--",
        *ray_entrypoint(train_argv),
    ]  # fmt: skip
    return LaunchPlan(
        head_start=wrap(head, name=container_name, process_env=env if head_env is None else head_env),
        worker_starts=workers,
        submit=wrap(submit),
        # docker: a fresh container cannot see the head's processes, so stop the head's container itself.
        # Otherwise nothing: `ray stop` would stop every Ray of the user on this node, other jobs' included;
        # what this job's head leaves behind is found by its own --temp-dir (stop_job_ray).
        stop=["docker", "stop", container_name] if container_name else None,
        dashboard_url=dashboard_url,
        custom_config=custom_config(cfg, paths.retriever_url, paths.metrics_path, paths.eval_metrics_path),
        make_dirs=[
            paths.save_dir,
            paths.save_hf_dir,
            paths.log_dir,
            os.path.dirname(paths.metrics_path),
            os.path.dirname(paths.eval_metrics_path),
        ],  # fmt: skip
        save_dir=paths.save_dir,
        metrics_path=paths.metrics_path,
        worker_hosts=list(cluster.worker_hosts),
        head_host=cluster.head_host,
        gpus_per_node=int(sl["gpus_per_node"]),
        join_timeout_s=float(sl["join_timeout_s"]),
        ray_temp_dir=temp_dir,
        node_checks=checks,
        preflight_dir=preflight_dir if checks else None,
        preflight_token=token,
    )


# --------------------------------------------------------------------------------------------------
# Running a plan
# --------------------------------------------------------------------------------------------------


def resume_rollout_id(save_dir: str | Path) -> int | None:
    """The rollout id of slime's latest Megatron checkpoint in ``save_dir`` (None if there is none)."""
    marker = Path(save_dir) / "latest_checkpointed_iteration.txt"
    if not marker.is_file():
        return None
    text = marker.read_text().strip()
    return int(text) if text.isdigit() else None


def run_plan(
    plan: LaunchPlan,
    log_path: str | Path,
    *,
    head_timeout_s: float = 600.0,
    stop_grace_s: float = 30.0,
    poll_interval_s: float = 1.0,
    popen: Callable[..., subprocess.Popen] = subprocess.Popen,
) -> int:
    """Start the head and workers, wait for every node, pre-flight, submit the job (its output streamed to
    ``log_path``), stop what we started.

    Before submitting: the directories exist, and metrics lines past slime's latest checkpoint are
    dropped (slime resumes at that rollout + 1 and will log them again). Multi-node, also before submitting:
    every node has joined with its GPUs within ``plan.join_timeout_s``, and the pre-flight passed on every
    node (``searchr1.cluster``); while slime runs, a Ray worker (or the head) that exits stops the submit and
    raises ClusterError naming its node. Returns the submit's exit status.
    Each process is a ``searchr1.process.managed_process`` (own process group, dies with this job, the
    head waited for until its dashboard answers): on every exit path, SIGTERM from Snakemake/SLURM
    included, what was started is stopped, newest first, and then what is left of this job's Ray (its
    ``--temp-dir``; docker: the head's container) if a head was started.
    """
    from searchr1.metrics_file import truncate_metrics

    for d in plan.make_dirs:
        Path(d).mkdir(parents=True, exist_ok=True)
    last = resume_rollout_id(plan.save_dir)
    truncate_metrics(plan.metrics_path, 0 if last is None else last + 1)

    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} launch\n{plan.to_shell()}\n".encode())
    common = {"log_path": log_path, "stop_grace_s": stop_grace_s, "popen": popen}
    with sigterm_raises(), ExitStack() as started:

        def start_head(*args: Any, **kwargs: Any) -> subprocess.Popen:
            head = popen(*args, **kwargs)
            # The head runs with --block and gets SIGTERM on the way out; what it left behind on this node is
            # stopped after every process here is stopped (callbacks run newest first), also when the head
            # never became healthy, and never when no head was started.
            started.callback(_stop_job_ray, plan, log_path)
            return head

        head = started.enter_context(
            managed_process(
                plan.head_start,
                name=f"the Ray head on {plan.head_host}",
                error=LaunchError,
                startup_timeout_s=head_timeout_s,
                healthy=lambda: http_ok(f"{plan.dashboard_url}/api/version"),
                poll_interval_s=0.5,
                **{**common, "popen": start_head},
            )  # fmt: skip
        )
        hosts = plan.worker_hosts or [f"worker {i + 1}" for i in range(len(plan.worker_starts))]
        workers = []
        for host, worker in zip(hosts, plan.worker_starts):
            workers.append(
                (host, started.enter_context(managed_process(worker, name=f"Ray worker on {host}", **common)))
            )
        if plan.worker_hosts:
            wait_for_nodes(
                plan.dashboard_url,
                [plan.head_host, *plan.worker_hosts],
                plan.gpus_per_node,
                timeout_s=plan.join_timeout_s,
                workers=workers,
                log_path=log_path,
                poll_interval_s=poll_interval_s,
            )
        if plan.node_checks:
            assert plan.preflight_dir is not None
            preflight(
                plan.node_checks,
                plan.preflight_dir,
                plan.preflight_token,
                timeout_s=plan.join_timeout_s,
                log_path=log_path,
            )
        submit = started.enter_context(
            managed_process(plan.submit, name="ray job submit", stdout=subprocess.PIPE, **common)
        )
        assert submit.stdout is not None

        def lost(name: str, rc: int) -> None:
            with open(log_path, "ab") as log:
                log.write(f"# {name} exited with status {rc} while slime ran: stopping the job\n".encode())
            stop_process_group(submit, stop_grace_s)

        watched = [(f"the Ray head on {plan.head_host}", head)] + [(f"the Ray worker on {h}", p) for h, p in workers]
        with WorkerWatch(watched if plan.worker_hosts else [], lost, poll_interval_s) as watch:
            with open(log_path, "ab") as log:
                for line in submit.stdout:  # stream to the log and to our stdout
                    log.write(line)
                    log.flush()
                    sys.stdout.buffer.write(line)
                    sys.stdout.flush()
            rc = submit.wait()
        if watch.exited:
            name, code = watch.exited
            raise ClusterError(
                f"{name} exited with status {code} while slime ran; last lines of {log_path}:\n" + log_tail(log_path)
            )
        return rc


def _stop_job_ray(plan: LaunchPlan, log_path: Path) -> None:
    with open(log_path, "ab") as log:
        if plan.stop:
            subprocess.run(
                list(plan.stop),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                check=False,
                timeout=120,
            )
        if plan.ray_temp_dir:
            stopped = stop_job_ray(plan.ray_temp_dir)
            log.write(
                f"# stopped {len(stopped)} leftover process(es) of this job's Ray ({plan.ray_temp_dir})\n".encode()
            )


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------

_ITER_RE = re.compile(r"^iter_(\d+)$")


def final_hf_checkpoint(save_hf_dir: str | Path) -> Path:
    """The newest ``iter_<rollout_id>`` HF directory slime wrote with --save-hf, checked complete
    (``check_hf_export``): an incomplete one is refused, never passed on as the RL model."""
    root = Path(save_hf_dir)
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = _ITER_RE.match(child.name)
            if match and child.is_dir() and (child / "config.json").is_file():
                found.append((int(match.group(1)), child))
    if not found:
        raise LaunchError(f"no iter_*/ HF checkpoint with a config.json under {root}")
    newest = max(found)[1]
    check_hf_export(newest)
    return newest


HF_INDEX = "model.safetensors.index.json"


def check_hf_export(hf_dir: str | Path) -> None:
    """Raise LaunchError unless every weight file of the HF checkpoint ``hf_dir`` is there and not empty.

    slime's --save-hf has every node write its own safetensors shards into the same directory, and rank 0
    the config and the index (``model.safetensors.index.json``, whose ``weight_map`` names a shard per
    tensor). With a work directory that is not shared between the nodes, the head's copy has the index and
    only its own shards: the shards the index names are checked against the files present.
    """
    hf_dir = Path(hf_dir)
    index_path = hf_dir / HF_INDEX
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise LaunchError(f"{index_path} is not a safetensors index with a weight_map: {e}") from e
        if not shards:
            raise LaunchError(f"{index_path} names no shard files")
    else:
        shards = sorted(p.name for p in hf_dir.glob("*.safetensors"))
        if not shards:
            raise LaunchError(f"{hf_dir} holds no safetensors weights (neither {HF_INDEX} nor *.safetensors)")
    missing = [name for name in shards if not (hf_dir / name).is_file()]
    empty = [name for name in shards if name not in missing and (hf_dir / name).stat().st_size == 0]
    if missing or empty:
        what = []
        if missing:
            what.append(f"missing {len(missing)} of {len(shards)} shard(s): {', '.join(missing)}")
        if empty:
            what.append(f"empty: {', '.join(empty)}")
        raise LaunchError(
            f"the HF export {hf_dir} is incomplete ({'; '.join(what)}). slime writes each node's shards into "
            "this directory from that node: a work_dir that is not shared by all nodes of the allocation "
            "(node-local disk) leaves the other nodes' shards on those nodes. Put work_dir on a shared "
            "filesystem, or copy the shards here from the other nodes, and rerun."
        )


def export_hf(src: str | Path, dst: str | Path) -> Path:
    """Copy the HF checkpoint ``src`` to ``dst`` atomically (temp dir + rename)."""
    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise LaunchError(f"{src} is not an HF checkpoint (no config.json)")
    from searchr1.fsutil import copy_tree_atomic

    return copy_tree_atomic(src, dst)
