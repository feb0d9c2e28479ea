"""The multi-node launch without a cluster: each defect of the multi-node path, with hand-made inputs (the
two-node run itself is tests/test_cluster.py, `-m cluster`)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from searchr1.cluster import ClusterError, job_ray_pids, missing_nodes, preflight, stop_job_ray, wait_for_nodes
from searchr1.config import load_config
from searchr1.process import free_port
from searchr1.slime_launch import (
    LaunchError,
    LaunchPlan,
    NodeCheck,
    check_hf_export,
    cluster_from_env,
    final_hf_checkpoint,
    run_plan,
)
from searchr1.steps.settings import StepSettings
from searchr1.steps.train import retriever_host

ROOT = Path(__file__).resolve().parents[1]
NODE_CHECK = str(ROOT / "searchr1" / "node_check.py")


@pytest.fixture(scope="module")
def cfg():
    return load_config(ROOT / "config.yaml")


def node(host: str, ip: str, gpus: float = 4, state: str = "ALIVE") -> dict:
    """One entry of Ray's state API node list (GET /api/v0/nodes), as Ray 2.46 returns it."""
    return {"node_ip": ip, "state": state, "resources_total": {"CPU": 32.0, "GPU": gpus, f"searchr1_node:{host}": 1.0}}


# --- the head's address -----------------------------------------------------------------------------------------


def test_the_nodes_come_from_the_job_when_the_step_names_fewer():
    """The Snakemake SLURM executor runs the train rule in `srun -n1 ... --nodes=2`: srun makes that one node and
    SLURM_JOB_NODELIST names only it (tests/test_slurm_cluster.py saw it on SLURM 22.05). The job's node list
    comes from SLURM then; before, the launch refused a two-node allocation as a one-node one."""
    expand = {"n1": ["n1"], "n[1-2]": ["n1", "n2"]}.__getitem__
    asked = []

    def job_nodelist(job_id: str) -> str:
        asked.append(job_id)
        return "n[1-2]"

    step_env = {"SLURM_JOB_NODELIST": "n1", "SLURM_JOB_ID": "42", "MASTER_ADDR": "10.0.0.5"}
    got = cluster_from_env(2, step_env, expand_hostnames=expand, resolve_ip=str, job_nodelist=job_nodelist)
    assert (got.head_host, got.worker_hosts, asked) == ("n1", ["n2"], ["42"])
    # the variables list enough nodes: SLURM is not asked
    whole = {**step_env, "SLURM_JOB_NODELIST": "n[1-2]"}
    assert cluster_from_env(
        2, whole, expand_hostnames=expand, resolve_ip=str, job_nodelist=job_nodelist
    ).worker_hosts == ["n2"]
    assert asked == ["42"]
    # a job that really has one node is refused, naming what it has
    with pytest.raises(LaunchError, match=r"train.slime.nodes is 2 but the SLURM allocation has 1: \['n1'\]"):
        cluster_from_env(2, step_env, expand_hostnames=expand, resolve_ip=str, job_nodelist=lambda job: "n1")
    with pytest.raises(LaunchError, match="allocation has 1"):  # SLURM cannot say: the variables stand
        cluster_from_env(2, step_env, expand_hostnames=expand, resolve_ip=str, job_nodelist=lambda job: None)


def test_a_loopback_head_address_is_refused_on_several_nodes():
    """Debian's `127.0.1.1 <hostname>` hosts entry made the head 127.0.1.1: workers would dial themselves."""
    env = {"SLURM_JOB_NODELIST": "n[1-2]"}
    hosts = lambda _: ["n1", "n2"]  # noqa: E731
    with pytest.raises(LaunchError, match=r"loopback address 127\.0\.1\.1.*MASTER_ADDR \(or SLIME_HOST_IP\)"):
        cluster_from_env(2, env, expand_hostnames=hosts, resolve_ip=lambda h: "127.0.1.1")
    with pytest.raises(LaunchError, match="from MASTER_ADDR/SLIME_HOST_IP is the loopback address 127.0.0.1"):
        cluster_from_env(2, {**env, "MASTER_ADDR": "127.0.0.1"}, expand_hostnames=hosts, resolve_ip=lambda h: "x")
    ok = cluster_from_env(
        2, {**env, "MASTER_ADDR": "10.0.0.5"}, expand_hostnames=hosts, resolve_ip=lambda h: "127.0.1.1"
    )
    assert (ok.head_host, ok.head_ip, ok.worker_hosts) == ("n1", "10.0.0.5", ["n2"])
    assert cluster_from_env(1, {}).head_ip == "127.0.0.1"  # one node: loopback is right


# --- where the retriever binds ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backend", "nodes", "host", "expected"),
    [
        ("slime", 1, "127.0.0.1", "127.0.0.1"),  # one node: stays on loopback
        ("slime", 2, "127.0.0.1", "10.1.2.3"),  # several: the head's address in the allocation
        ("slime", 2, "0.0.0.0", "10.1.2.3"),  # a wildcard is no address to call
        ("slime", 2, "192.168.7.7", "192.168.7.7"),  # an explicit routable address is the user's choice
        ("torch", 2, "127.0.0.1", "127.0.0.1"),  # the torch backend is one process
    ],
)
def test_the_train_jobs_retriever_binds_the_heads_address_on_several_nodes(cfg, backend, nodes, host, expected):
    c = copy.deepcopy(cfg)
    c["train"]["backend"], c["train"]["slime"]["nodes"], c["retriever"]["host"] = backend, nodes, host
    assert retriever_host(StepSettings(c, step="train"), "10.1.2.3") == expected


# --- waiting for the nodes --------------------------------------------------------------------------------------


def test_missing_nodes_names_absent_dead_and_short_of_gpus():
    nodes = [node("n1", "10.0.0.1"), node("n2", "10.0.0.2", gpus=2), node("n3", "10.0.0.3", state="DEAD")]
    assert missing_nodes(nodes, ["n1", "n2", "n3", "n4"], 4) == {
        "n2": "joined (10.0.0.2) with 2 GPUs, 4 needed",
        "n3": "has not joined the Ray cluster",
        "n4": "has not joined the Ray cluster",
    }
    assert missing_nodes(nodes, ["n1"], 4) == {}


def test_the_join_wait_times_out_naming_the_node_that_did_not_join():
    calls = []

    def listing(url):
        calls.append(url)
        return [node("n1", "10.0.0.1")] + ([node("n2", "10.0.0.2")] if len(calls) > 2 else [])

    # n2 joins on the third poll: the wait returns then
    assert len(wait_for_nodes("http://d", ["n1", "n2"], 4, timeout_s=30, poll_interval_s=0.01, list_nodes=listing)) == 2
    started = time.monotonic()
    with pytest.raises(ClusterError, match=r"1 of 3 node\(s\) not ready after .* 0.3 s: n3: has not joined") as e:
        wait_for_nodes("http://d", ["n1", "n2", "n3"], 4, timeout_s=0.3, poll_interval_s=0.05, list_nodes=listing)
    assert time.monotonic() - started < 5
    assert "joined: n1 (10.0.0.1), n2 (10.0.0.2)" in str(e.value)


def test_the_join_wait_fails_at_once_when_a_worker_exits():
    worker = subprocess.Popen([sys.executable, "-c", "raise SystemExit(7)"])
    worker.wait()
    with pytest.raises(ClusterError, match=r"Ray worker on node\(s\) n2 \(exit status 7\) exited"):
        wait_for_nodes("http://d", ["n1", "n2"], 4, timeout_s=600, workers=[("n2", worker)], list_nodes=lambda u: [])


# --- the pre-flight ---------------------------------------------------------------------------------------------


class _Health(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.end_headers()
        self.wfile.write(json.dumps({"status": "ok"}).encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def health_url():
    server = HTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/retrieve"
    server.shutdown()


def check(host: str, url: str, directory: Path, token: str) -> NodeCheck:
    return NodeCheck(host, [sys.executable, NODE_CHECK, "--node", host, "--url", url, "--dir", str(directory),
                            "--token", token, "--timeout-s", "2"])  # fmt: skip


def test_the_preflight_passes_when_every_node_sees_the_retriever_and_the_work_dir(tmp_path, health_url):
    shared = tmp_path / "work" / ".preflight"
    checks = [check(h, health_url, shared, "tok-1") for h in ("n1", "n2")]
    preflight(checks, shared, "tok-1", timeout_s=30, log_path=tmp_path / "launch.log")
    assert "pre-flight on node n2" in (tmp_path / "launch.log").read_text() and list(shared.iterdir()) == []


def test_the_preflight_names_each_node_and_what_failed(tmp_path, health_url):
    """n2 sees another directory (a node-local work dir); n3 cannot reach the retriever (a loopback URL)."""
    shared = tmp_path / "work" / ".preflight"
    node_local = tmp_path / "n2-local" / ".preflight"
    node_local.mkdir(parents=True)
    dead = f"http://127.0.0.1:{free_port()}/retrieve"
    checks = [check("n1", health_url, shared, "tok"), check("n2", health_url, node_local, "tok"),
              check("n3", dead, shared, "tok")]  # fmt: skip
    with pytest.raises(ClusterError) as e:
        preflight(checks, shared, "tok", timeout_s=30, log_path=tmp_path / "launch.log")
    msg = str(e.value)
    assert "\n  n1:" not in msg  # the head passed
    assert "n2: pre-flight on node n2" in msg and "is not visible here" in msg and "not shared" in msg
    assert (
        "n3: pre-flight on node n3" in msg
        and f"the retriever at {dead[: -len('/retrieve')]}/health does not answer" in msg
    )


def test_the_preflight_catches_a_node_whose_writes_the_head_cannot_see(tmp_path, health_url):
    """The node reads the head's token (a copy of it) but writes where the head does not look."""
    shared = tmp_path / "work" / ".preflight"
    elsewhere = tmp_path / "copy"
    elsewhere.mkdir()

    def run(command, **kw):
        (elsewhere / "head").write_text((shared / "head").read_text())
        return subprocess.run([*command[:-6], str(elsewhere), *command[-4:]], **kw)

    c = check("n2", health_url, shared, "tok")
    c.command = [*c.command[:7], "--dir", str(shared), "--token", "tok", "--timeout-s", "2"]
    with pytest.raises(ClusterError, match=r"n2: its token file .*node-n2 is not visible on the head node"):
        preflight([c], shared, "tok", timeout_s=30, log_path=tmp_path / "launch.log", run=run)


# --- watching the workers while slime runs ----------------------------------------------------------------------

_HEAD = """
import http.server, json, sys
nodes = json.loads(sys.argv[2])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = {"data": {"result": {"result": nodes}}} if self.path.startswith("/api/v0/nodes") else {}
        self.send_response(200); self.end_headers(); self.wfile.write(json.dumps(body).encode())
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def plan_with(tmp_path: Path, port: int, nodes: list[dict], worker: str, submit: str, **kw) -> LaunchPlan:
    return LaunchPlan(
        head_start=[sys.executable, "-c", _HEAD, str(port), json.dumps(nodes)],
        worker_starts=[[sys.executable, "-c", worker]],
        submit=[sys.executable, "-c", submit],
        stop=None,
        dashboard_url=f"http://127.0.0.1:{port}",
        custom_config={},
        make_dirs=[],
        save_dir=str(tmp_path / "save"),
        metrics_path=str(tmp_path / "m.jsonl"),
        worker_hosts=["n2"],
        head_host="n1",
        gpus_per_node=4,
        **kw,
    )


def test_a_worker_that_exits_while_slime_runs_ends_the_job_naming_it(tmp_path):
    port = free_port()
    nodes = [node("n1", "10.0.0.1"), node("n2", "10.0.0.2")]
    submit = "import time; print('training', flush=True); time.sleep(120)"
    plan = plan_with(tmp_path, port, nodes, "import time; time.sleep(3); raise SystemExit(9)", submit,
                     join_timeout_s=30)  # fmt: skip
    started = time.monotonic()
    with pytest.raises(ClusterError, match="the Ray worker on n2 exited with status 9 while slime ran"):
        run_plan(plan, tmp_path / "train.log", head_timeout_s=30, stop_grace_s=5, poll_interval_s=0.2)
    assert time.monotonic() - started < 60  # not the 120 s of the "training" (nor slime's wait forever)
    assert "training" in (tmp_path / "train.log").read_text()


def test_run_plan_does_not_submit_before_every_node_joined(tmp_path):
    port = free_port()
    marker = tmp_path / "submitted"
    plan = plan_with(tmp_path, port, [node("n1", "10.0.0.1")], "import time; time.sleep(120)",
                     f"open({str(marker)!r}, 'w').close()", join_timeout_s=1.5)  # fmt: skip
    with pytest.raises(ClusterError, match=r"n2: has not joined the Ray cluster"):
        run_plan(plan, tmp_path / "train.log", head_timeout_s=30, stop_grace_s=5, poll_interval_s=0.2)
    assert not marker.exists()


# --- stopping only this job's Ray -------------------------------------------------------------------------------


def test_stop_job_ray_stops_only_this_jobs_processes(tmp_path):
    """`ray stop` stopped every Ray of the user on the node; now only what runs under this job's --temp-dir."""
    code = "import time; time.sleep(120)"
    mine = subprocess.Popen([sys.executable, "-c", code, "--session-dir=/tmp/searchr1-ray-41/session_x"])
    also_mine = subprocess.Popen([sys.executable, "-c", code, "--temp-dir=/tmp/searchr1-ray-41"])
    other = subprocess.Popen([sys.executable, "-c", code, "--session-dir=/tmp/searchr1-ray-411/session_y"])
    try:
        time.sleep(0.3)
        assert job_ray_pids("/tmp/searchr1-ray-41") == sorted([mine.pid, also_mine.pid])
        assert sorted(stop_job_ray("/tmp/searchr1-ray-41", grace_s=5)) == sorted([mine.pid, also_mine.pid])
        assert mine.wait(5) is not None and also_mine.wait(5) is not None
        assert other.poll() is None  # another job's Ray lives on
    finally:
        for p in (mine, also_mine, other):
            p.kill()
            p.wait()


# --- the HF export ----------------------------------------------------------------------------------------------


def write_export(d: Path, shards: dict[str, bytes], index: list[str] | None = None) -> Path:
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    if index is not None:
        weight_map = {f"layer{i}.weight": name for i, name in enumerate(index)}
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for name, data in shards.items():
        (d / name).write_bytes(data)
    return d


def test_an_incomplete_hf_export_is_refused_naming_the_missing_shards(tmp_path):
    names = [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    # a node-local work dir: the head's copy has the index and the head's own two shards
    partial = write_export(tmp_path / "hf" / "iter_9", {n: b"w" for n in names[:2]}, index=names + names[:1])
    with pytest.raises(LaunchError, match=r"missing 2 of 4 shard\(s\): model-00003-of-00004.safetensors, "
                                          r"model-00004-of-00004.safetensors.*not shared"):  # fmt: skip
        final_hf_checkpoint(tmp_path / "hf")
    (partial / names[2]).write_bytes(b"")
    (partial / names[3]).write_bytes(b"w")
    with pytest.raises(LaunchError, match=r"empty: model-00003-of-00004.safetensors"):
        check_hf_export(partial)
    (partial / names[2]).write_bytes(b"w")
    assert final_hf_checkpoint(tmp_path / "hf") == partial
    # no index: the single-file form
    check_hf_export(write_export(tmp_path / "single", {"model.safetensors": b"w"}))
    with pytest.raises(LaunchError, match="holds no safetensors weights"):
        check_hf_export(write_export(tmp_path / "none", {}))
    bad = write_export(tmp_path / "bad", {}, index=[])
    with pytest.raises(LaunchError, match="names no shard files"):
        check_hf_export(bad)
