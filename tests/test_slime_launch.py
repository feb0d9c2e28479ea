"""The slime launch plan: every recipe value reaches its flag; containers, SLURM workers, export."""

import copy
import json
import shlex
from pathlib import Path

import pytest
from helpers import entrypoint_argv

from searchr1.config import load_config
from searchr1.slime_launch import (
    MODEL_ARGS,
    LaunchError,
    build_plan,
    export_hf,
    final_hf_checkpoint,
    model_args_for,
    resume_rollout_id,
    write_custom_config,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cfg():
    return load_config(ROOT / "config.yaml")


def paths(tmp: Path, **kw):
    base = dict(
        hf_checkpoint=tmp / "models" / "base",
        train_parquet=tmp / "data" / "train.parquet",
        save_dir=tmp / "train" / "slime ckpt",
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


def train_argv(plan):
    return entrypoint_argv(plan.submit)[2:]


def flag(argv, name, n=1):
    i = argv.index(name)
    return argv[i + 1] if n == 1 else argv[i + 1 : i + 1 + n]


def local(cfg):
    c = copy.deepcopy(cfg)
    c["train"]["slime"]["container_runtime"] = "none"
    return c


def test_every_recipe_value_reaches_its_flag(cfg, tmp_path):
    plan = build_plan(local(cfg), paths=paths(tmp_path), env={})
    a = train_argv(plan)
    t, sl = cfg["train"], cfg["train"]["slime"]
    expect = {
        "--num-rollout": t["num_rollout"],
        "--rollout-batch-size": t["rollout_batch_size"],
        "--n-samples-per-prompt": t["n_samples_per_prompt"],
        "--global-batch-size": t["global_batch_size"],
        "--rollout-max-response-len": t["rollout_max_response_len"],
        "--rollout-temperature": t["rollout_temperature"],
        "--rollout-top-p": t["rollout_top_p"],
        "--lr": t["lr"],
        "--weight-decay": t["weight_decay"],
        "--adam-beta1": t["adam_beta1"],
        "--adam-beta2": t["adam_beta2"],
        "--kl-loss-coef": t["kl_loss_coef"],
        "--entropy-coef": t["entropy_coef"],
        "--eps-clip": t["eps_clip"],
        "--eps-clip-high": t["eps_clip_high"],
        "--save-interval": t["save_interval"],
        "--rollout-seed": cfg["seed"],
        "--tensor-model-parallel-size": sl["tensor_model_parallel_size"],
        "--pipeline-model-parallel-size": sl["pipeline_model_parallel_size"],
        "--context-parallel-size": sl["context_parallel_size"],
        "--max-tokens-per-gpu": sl["max_tokens_per_gpu"],
        "--recompute-num-layers": sl["recompute_num_layers"],
        "--rollout-num-gpus-per-engine": sl["rollout_num_gpus_per_engine"],
        "--sglang-mem-fraction-static": sl["sglang_mem_fraction_static"],
        "--actor-num-nodes": sl["nodes"],
        "--actor-num-gpus-per-node": sl["gpus_per_node"],
        "--rollout-num-gpus": sl["rollout_num_gpus"],
        "--num-gpus-per-node": sl["gpus_per_node"],
    }
    for name, value in expect.items():
        assert float(flag(a, name)) == pytest.approx(float(value)), name
    for name, value in {
        "--advantage-estimator": "grpo",
        "--kl-loss-type": "low_var_kl",
        "--optimizer": "adam",
        "--lr-decay-style": "constant",
        "--recompute-granularity": "full",
        "--recompute-method": "uniform",
        "--attention-backend": "flash",
        "--input-key": "prompt",
        "--label-key": "reward_model",
    }.items():
        assert flag(a, name) == value, name
    for switch in (
        "--rollout-shuffle",
        "--balance-data",
        "--sequence-parallel",
        "--use-dynamic-batch-size",
        "--use-kl-loss",
        "--use-tis",
        "--colocate",
        "--apply-chat-template",
        "--accumulate-allreduce-grads-in-fp32",
        "--attention-softmax-in-fp32",
    ):
        assert switch in a, switch
    assert flag(a, "--attention-dropout") == "0.0" and flag(a, "--hidden-dropout") == "0.0"
    assert flag(a, "--custom-generate-function-path") == "searchr1.slime_plugin.generate"
    assert flag(a, "--custom-rm-path") == "searchr1.slime_plugin.reward_func"
    assert flag(a, "--custom-rollout-log-function-path") == "searchr1.slime_plugin.log_rollout"
    assert flag(a, "--custom-config-path") == str(tmp_path / "train" / "custom.yaml")
    # the model architecture of Qwen2.5-3B, in slime's order
    assert a[: len(MODEL_ARGS["qwen2.5-3B"])] == MODEL_ARGS["qwen2.5-3B"]
    assert flag(a, "--num-layers") == "36" and flag(a, "--vocab-size") == "151936"
    assert "--eval-interval" not in a  # eval.interval is null in the recipe
    # the custom config carries the agent/retriever recipe
    cc = plan.custom_config
    assert cc["search_topk"] == cfg["retriever"]["topk"] and cc["search_max_turns"] == cfg["agent"]["max_turns"]
    assert cc["search_url"] == "http://127.0.0.1:8000/retrieve" and cc["search_on_error"] == "fail"


@pytest.mark.parametrize(
    ("section", "key", "value", "name", "expected"),
    [
        ("train", "lr", 3e-6, "--lr", "3e-06"),
        ("train", "num_rollout", 7, "--num-rollout", "7"),
        ("train", "kl_loss_coef", 0.01, "--kl-loss-coef", "0.01"),
        ("slime", "tensor_model_parallel_size", 1, "--tensor-model-parallel-size", "1"),
        ("slime", "sglang_mem_fraction_static", 0.5, "--sglang-mem-fraction-static", "0.5"),
        ("slime", "gpus_per_node", 8, "--actor-num-gpus-per-node", "8"),
    ],
)
def test_changing_a_config_value_changes_its_flag(cfg, tmp_path, section, key, value, name, expected):
    c = local(cfg)
    (c["train"] if section == "train" else c["train"]["slime"])[key] = value
    assert flag(train_argv(build_plan(c, paths=paths(tmp_path), env={})), name) == expected


def test_switches_follow_booleans(cfg, tmp_path):
    c = local(cfg)
    c["train"]["use_tis"] = False
    c["train"]["slime"]["colocate"] = False
    c["train"]["slime"]["use_dynamic_batch_size"] = False
    c["train"]["rollout_shuffle"] = False
    a = train_argv(build_plan(c, paths=paths(tmp_path), env={}))
    for gone in ("--use-tis", "--colocate", "--use-dynamic-batch-size", "--max-tokens-per-gpu", "--rollout-shuffle"):
        assert gone not in a
    assert flag(a, "--micro-batch-size") == "1"
    c["train"]["slime"]["extra_args"] = ["--log-multi-turn", "--tis-clip", "3"]
    assert train_argv(build_plan(c, paths=paths(tmp_path), env={}))[-3:] == ["--log-multi-turn", "--tis-clip", "3"]


def test_resume_flags_share_the_save_dir_and_hf_dirs(cfg, tmp_path):
    a = train_argv(build_plan(local(cfg), paths=paths(tmp_path), env={}))
    save = str(tmp_path / "train" / "slime ckpt")
    assert flag(a, "--load") == save and flag(a, "--save") == save
    base = str(tmp_path / "models" / "base")
    assert flag(a, "--hf-checkpoint") == base and flag(a, "--ref-load") == base
    assert flag(a, "--save-hf") == str(tmp_path / "train" / "hf") + "/iter_{rollout_id}"
    assert flag(a, "--prompt-data") == str(tmp_path / "data" / "train.parquet")


def test_paths_with_spaces_survive_shell_quoting(cfg, tmp_path):
    plan = build_plan(local(cfg), paths=paths(tmp_path), env={})
    lines = plan.to_shell().splitlines()
    assert len(lines) == 3  # head &, submit, stop
    assert shlex.split(lines[1]) == plan.submit
    assert shlex.split(lines[0].removesuffix(" &")) == plan.head_start
    assert "'" + str(tmp_path / "train" / "slime ckpt") + "'" in lines[1]


def test_runtime_env_and_ray_commands(cfg, tmp_path):
    c = local(cfg)
    c["train"]["slime"].update(ray_port=6379, dashboard_port=8265)  # the config's ports, when set, are used
    plan = build_plan(c, paths=paths(tmp_path), env={})
    s = plan.submit
    assert s[:5] == ["ray", "job", "submit", "--address", "http://127.0.0.1:8265"]
    env = json.loads(flag(s, "--runtime-env-json"))["env_vars"]
    assert env["PYTHONPATH"] == f"/root/Megatron-LM:{ROOT}"
    assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    assert entrypoint_argv(plan.submit)[:2] == ["python3", "/root/slime/train.py"]
    h = plan.head_start
    assert h[:3] == ["ray", "start", "--head"] and "--disable-usage-stats" in h
    assert flag(h, "--num-gpus") == str(cfg["train"]["slime"]["gpus_per_node"])
    assert flag(h, "--port") == "6379" and flag(h, "--dashboard-port") == "8265"
    assert flag(h, "--dashboard-host") == "127.0.0.1" and flag(h, "--node-ip-address") == "127.0.0.1"
    # no `ray stop` (it stops every Ray of the user on the node): this job's own --temp-dir marks its processes
    assert plan.stop is None and plan.worker_starts == [] and plan.node_checks == []
    assert flag(h, "--temp-dir") == plan.ray_temp_dir == f"/tmp/searchr1-ray-{__import__('os').getpid()}"
    assert flag(h, "--resources") == '{"searchr1_node:localhost": 1}'


def test_ray_ports_default_to_free_ports_picked_at_launch(cfg, tmp_path):
    """Two runs on one node got the same fixed ports (6379/8265/10001/52365); null ports are free ones now."""
    from searchr1.process import free_port

    c = local(cfg)
    assert [c["train"]["slime"][k] for k in ("ray_port", "dashboard_port")] == [None, None]
    picked = []

    def pick():
        picked.append(1)
        return 40000 + len(picked)

    h = build_plan(c, paths=paths(tmp_path), env={}, pick_port=pick).head_start
    assert [
        flag(h, f) for f in ("--port", "--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port")
    ] == ["40001", "40002", "40003", "40004"]
    a, b = (build_plan(c, paths=paths(tmp_path), env={}).head_start for _ in range(2))
    ports = [int(flag(x, "--port")) for x in (a, b)] + [int(flag(x, "--dashboard-port")) for x in (a, b)]
    assert all(p > 19999 or p < 10002 for p in ports)  # never inside Ray's worker port range
    port = free_port()
    c["train"]["slime"]["ray_client_server_port"] = port
    assert flag(build_plan(c, paths=paths(tmp_path), env={}).head_start, "--ray-client-server-port") == str(port)


def test_container_wrapping_per_runtime(cfg, tmp_path):
    c = copy.deepcopy(cfg)  # the recipe: apptainer
    plan = build_plan(c, paths=paths(tmp_path), env={})
    for cmd in (plan.head_start, plan.submit):
        assert cmd[:3] == ["apptainer", "exec", "--nv"]
        assert cmd[cmd.index("--bind") + 2] == "docker://slimerl/slime:v0.3.1-cu129"
    binds = flag(plan.submit, "--bind").split(",")
    assert f"{ROOT}:{ROOT}" in binds and f"{tmp_path}/train:{tmp_path}/train" in binds
    assert f"{tmp_path}/train/hf:{tmp_path}/train/hf" not in binds  # covered by its parent
    c["train"]["slime"]["container_runtime"] = "docker"
    plan = build_plan(c, paths=paths(tmp_path), env={})
    h = plan.head_start
    assert h[:2] == ["docker", "run"] and "--gpus" in h and "--ipc=host" in h and flag(h, "--network") == "host"
    name = flag(h, "--name")
    assert plan.stop == ["docker", "stop", name]
    assert plan.submit[0] == "docker" and "slimerl/slime:v0.3.1-cu129" in plan.submit
    c["train"]["slime"]["container_runtime"] = "apptainer"
    c["train"]["slime"]["image"] = "/images/slime.sif"
    assert "/images/slime.sif" in build_plan(c, paths=paths(tmp_path), env={}).submit
    with pytest.raises(LaunchError, match="cannot express"):
        build_plan(cfg, paths=paths(tmp_path, log_dir=tmp_path / "a,b"), env={})


def test_multi_node_workers_from_slurm_nodelist(cfg, tmp_path):
    c = local(cfg)
    c["train"]["slime"]["nodes"] = 3
    seen = []

    def expand(nodelist):
        seen.append(nodelist)
        return ["gpu07", "gpu08", "gpu09", "gpu10"]

    plan = build_plan(
        c,
        paths=paths(tmp_path),
        env={"SLURM_JOB_NODELIST": "gpu[07-10]"},
        expand_hostnames=expand,
        resolve_ip=lambda host: {"gpu07": "10.0.0.7"}[host],
    )
    assert seen == ["gpu[07-10]"]
    assert flag(plan.head_start, "--node-ip-address") == "10.0.0.7"
    port = flag(plan.head_start, "--port")
    assert len(plan.worker_starts) == 2 and plan.worker_hosts == ["gpu08", "gpu09"] and plan.head_host == "gpu07"
    res = c["train"]["resources"]
    for host, w in zip(["gpu08", "gpu09"], plan.worker_starts):
        # the worker step asks for its node's share of the job: CPUs, memory, GPUs (SLURM >= 22.05 steps
        # no longer inherit --cpus-per-task)
        assert w[:10] == [
            "srun",
            "--nodes=1",
            "--ntasks=1",
            "-w",
            host,
            "--overlap",
            f"--cpus-per-task={res['cpus']}",
            f"--mem={res['mem_mb']}M",
            "--gres=gpu:4",
            "ray",
        ]
        assert w[10:12] == ["start", "--address"] and flag(w, "--address") == f"10.0.0.7:{port}"
        assert flag(w, "--resources") == json.dumps({f"searchr1_node:{host}": 1})
    assert plan.gpus_per_node == 4 and plan.join_timeout_s == c["train"]["slime"]["join_timeout_s"]
    # the pre-flight: on the head as it is, on each worker through the same srun prefix
    assert [chk.host for chk in plan.node_checks] == ["gpu07", "gpu08", "gpu09"]
    assert plan.node_checks[0].command[0] == "python3"
    assert plan.node_checks[1].command[:10] == plan.worker_starts[0][:9] + ["python3"]
    assert flag(plan.node_checks[2].command, "--url") == "http://127.0.0.1:8000/retrieve"
    assert flag(train_argv(plan), "--actor-num-nodes") == "3"
    assert json.loads(flag(plan.submit, "--runtime-env-json"))["env_vars"]["MASTER_ADDR"] == "10.0.0.7"
    with pytest.raises(LaunchError, match="SLURM_JOB_NODELIST"):
        build_plan(c, paths=paths(tmp_path), env={})
    with pytest.raises(LaunchError, match="has 1"):
        build_plan(c, paths=paths(tmp_path), env={"SLURM_JOB_NODELIST": "x"}, expand_hostnames=lambda s: ["x"])


def test_no_command_kills_by_name(cfg, tmp_path):
    for runtime in ("apptainer", "docker", "none"):
        c = copy.deepcopy(cfg)
        c["train"]["slime"]["container_runtime"] = runtime
        c["train"]["slime"]["nodes"] = 2
        plan = build_plan(
            c,
            paths=paths(tmp_path),
            env={"SLURM_JOB_NODELIST": "n[1-2]"},
            expand_hostnames=lambda s: ["n1", "n2"],
            resolve_ip=lambda h: "10.1.1.1",
        )
        for cmd in plan.commands():
            assert not {"pkill", "killall", "kill"} & set(cmd), cmd
            assert "--force" not in cmd
        assert "pkill" not in plan.to_shell() and "killall" not in plan.to_shell()


def test_eval_during_training_flags(cfg, tmp_path):
    c = local(cfg)
    c["eval"]["interval"] = 25
    p = paths(tmp_path, eval_prompt_data={"nq_test": tmp_path / "nq.parquet", "hotpotqa_test": tmp_path / "hq.parquet"})
    a = train_argv(build_plan(c, paths=p, env={}))
    assert flag(a, "--eval-interval") == "25"
    assert flag(a, "--eval-prompt-data", 4) == [
        "hotpotqa_test",
        f"{tmp_path}/hq.parquet@[0:500]",
        "nq_test",
        f"{tmp_path}/nq.parquet@[0:500]",
    ]
    assert flag(a, "--eval-temperature") == "0.0"
    assert flag(a, "--custom-eval-rollout-log-function-path") == "searchr1.slime_plugin.log_eval"


def test_model_args_table_and_unknown_model():
    assert model_args_for("Qwen/Qwen2.5-3B") == MODEL_ARGS["qwen2.5-3B"]
    assert model_args_for("Qwen/Qwen2.5-3B-Instruct") == MODEL_ARGS["qwen2.5-3B"]
    assert "--untie-embeddings-and-output-weights" in model_args_for("Qwen/Qwen2.5-7B")
    with pytest.raises(LaunchError, match="no Megatron MODEL_ARGS"):
        model_args_for("meta-llama/Llama-3-8B")


def test_write_custom_config(cfg, tmp_path):
    import yaml

    out = tmp_path / "cc" / "custom.yaml"
    data = write_custom_config(out, cfg, "http://127.0.0.1:9/retrieve", tmp_path / "m.jsonl", tmp_path / "e.jsonl")
    assert yaml.safe_load(out.read_text()) == data
    assert data == {
        "search_url": "http://127.0.0.1:9/retrieve",
        "search_topk": 3,
        "search_max_turns": 2,
        "search_on_error": "fail",
        "search_timeout_s": 60.0,
        "search_max_retries": 3,
        "search_concurrency": 256,
        "search_input_mode": "text",
        "search_metrics_path": str(tmp_path / "m.jsonl"),
        "search_eval_metrics_path": str(tmp_path / "e.jsonl"),
        "search_structure_format_score": 0.0,
        "search_final_format_score": 0.0,
        "search_retrieval_score": 0.0,
    }


def test_reward_flags_only_with_a_format_aware_reward(cfg, tmp_path):
    """All reward.* scores 0 (the recipe): no reward flag at all, the seed command. A non-zero score: the plugin's
    dict reward, trained on "score" and evaluated on "em"; the scores reach the plugin through the custom config."""
    plain = train_argv(build_plan(local(cfg), paths=paths(tmp_path), env={}))
    assert "--reward-key" not in plain and "--eval-reward-key" not in plain
    c = local(cfg)
    c["reward"] = {"structure_format_score": 0.2, "final_format_score": 0.1, "retrieval_score": 0.0}
    plan = build_plan(c, paths=paths(tmp_path), env={})
    a = train_argv(plan)
    assert flag(a, "--reward-key") == "score" and flag(a, "--eval-reward-key") == "em"
    assert [x for x in a if x not in ("--reward-key", "score", "--eval-reward-key", "em")] == plain
    assert (plan.custom_config["search_structure_format_score"], plan.custom_config["search_final_format_score"]) == (
        0.2,
        0.1,
    )
    c["reward"] = {"structure_format_score": 0.0, "final_format_score": 0.0, "retrieval_score": 0.3}
    assert flag(train_argv(build_plan(c, paths=paths(tmp_path), env={})), "--reward-key") == "score"


def test_final_hf_checkpoint_and_atomic_export(tmp_path):
    hf = tmp_path / "hf"
    with pytest.raises(LaunchError, match="no iter_"):
        final_hf_checkpoint(hf)
    for rid in (19, 119, 39):
        (hf / f"iter_{rid}").mkdir(parents=True)
        (hf / f"iter_{rid}" / "config.json").write_text(json.dumps({"rid": rid}))
        (hf / f"iter_{rid}" / "model.safetensors").write_bytes(b"w")
    (hf / "iter_999").mkdir()  # incomplete: no config.json
    assert final_hf_checkpoint(hf).name == "iter_119"
    dst = tmp_path / "models" / "rl"
    export_hf(final_hf_checkpoint(hf), dst)
    assert json.loads((dst / "config.json").read_text()) == {"rid": 119}
    export_hf(hf / "iter_39", dst)  # replaces
    assert json.loads((dst / "config.json").read_text()) == {"rid": 39}
    assert sorted(p.name for p in dst.parent.iterdir()) == ["rl"]


def test_resume_rollout_id(tmp_path):
    assert resume_rollout_id(tmp_path) is None
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("59\n")
    assert resume_rollout_id(tmp_path) == 59


def test_run_plan_streams_submit_and_stops_what_it_started(tmp_path):
    import sys

    from searchr1.process import free_port
    from searchr1.slime_launch import LaunchPlan, run_plan

    port = free_port()
    head_code = (
        "import http.server, pathlib, sys\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(200); self.end_headers(); self.wfile.write(b'{}')\n"
        "    def log_message(self, *a): pass\n"
        f"pathlib.Path({str(tmp_path / 'head.pid')!r}).write_text(str(__import__('os').getpid()))\n"
        f"http.server.HTTPServer(('127.0.0.1', {port}), H).serve_forever()\n"
    )
    save = tmp_path / "save"
    save.mkdir()
    (save / "latest_checkpointed_iteration.txt").write_text("1")
    metrics = tmp_path / "m.jsonl"
    metrics.write_text("".join(json.dumps({"step": i}) + "\n" for i in range(4)))
    plan = LaunchPlan(
        head_start=[sys.executable, "-c", head_code],
        worker_starts=[[sys.executable, "-c", "import time; time.sleep(60)"]],
        submit=[sys.executable, "-c", "print('train says hi'); raise SystemExit(3)"],
        stop=[sys.executable, "-c", "print('stop ran')"],
        dashboard_url=f"http://127.0.0.1:{port}",
        custom_config={},
        make_dirs=[str(tmp_path / "logs")],
        save_dir=str(save),
        metrics_path=str(metrics),
        gpus_per_node=0,
        join_timeout_s=1.0,
    )
    started = []

    def popen(*args, **kw):
        import subprocess

        proc = subprocess.Popen(*args, **kw)
        started.append(proc)
        return proc

    rc = run_plan(plan, tmp_path / "logs" / "train.log", head_timeout_s=30, popen=popen)
    assert rc == 3
    log = (tmp_path / "logs" / "train.log").read_text()
    assert "train says hi" in log and "stop ran" in log
    assert all(p.poll() is not None for p in started)  # head and worker terminated
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [0, 1]  # resumes at 2


def test_the_launcher_does_not_load_torch():
    """The launch step runs in a light process: run_plan's imports (metrics truncation included) need no torch."""
    import subprocess
    import sys

    code = (
        "import sys, searchr1.slime_launch, searchr1.metrics_file, searchr1.steps.train; "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
