"""The multi-node checks of the slime launch (``searchr1.slime_launch.run_plan`` calls them on the head node).

- ``wait_for_nodes``: after the Ray workers are started, wait (at most ``train.slime.join_timeout_s``) until
  Ray's head lists every node of the allocation alive with its GPUs; fail naming the nodes that did not join,
  or at once naming a worker whose process exited. slime itself would wait for its placement group forever.
- ``preflight``: from every node, through the prefix and container its Ray worker runs in, the retriever
  URL answers and the work directory is shared (``searchr1/node_check.py``); fail naming node and cause.
- ``WorkerWatch``: while slime runs, a worker process that exits ends the job with an error naming it.
- ``stop_job_ray``: what is left of this job's Ray on this node, found by the job's own ``--temp-dir``
  (every Ray process carries it in its command line), never by name: other jobs' Ray on the node lives on.

The node list comes from Ray's state API on the head's dashboard (``GET /api/v0/nodes``, the data behind
``ray list nodes``); every node carries a custom resource ``searchr1_node:<host>`` naming its host in the
allocation (``build_plan``), so a node is found whatever interface Ray picked for its address.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from searchr1.process import log_tail

NODE_RESOURCE_PREFIX = "searchr1_node:"


class ClusterError(RuntimeError):
    """A node did not join, failed its pre-flight, or its Ray worker exited; the message names the node."""


def ray_nodes(dashboard_url: str, timeout_s: float = 5.0) -> list[dict[str, Any]]:
    """The nodes Ray's head knows (alive and dead), from its state API; [] while the API does not answer."""
    import httpx

    try:
        r = httpx.get(
            f"{dashboard_url}/api/v0/nodes", params={"limit": 10000, "detail": 1}, timeout=timeout_s, trust_env=False
        )
        r.raise_for_status()
        return list(r.json()["data"]["result"]["result"])
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return []


def node_host(node: Mapping[str, Any]) -> str | None:
    """The allocation host a Ray node was started for (its ``searchr1_node:<host>`` resource), if any."""
    for name in node.get("resources_total") or {}:
        if name.startswith(NODE_RESOURCE_PREFIX):
            return name[len(NODE_RESOURCE_PREFIX) :]
    return None


def missing_nodes(nodes: Sequence[Mapping[str, Any]], hosts: Sequence[str], gpus_per_node: int) -> dict[str, str]:
    """Each host of ``hosts`` that has no alive Ray node with ``gpus_per_node`` GPUs, with what is wrong."""
    alive = {node_host(n): n for n in nodes if n.get("state") == "ALIVE" and node_host(n)}
    missing = {}
    for host in hosts:
        node = alive.get(host)
        if node is None:
            missing[host] = "has not joined the Ray cluster"
            continue
        gpus = float((node.get("resources_total") or {}).get("GPU", 0))
        if gpus < gpus_per_node:
            missing[host] = f"joined ({node.get('node_ip')}) with {gpus:g} GPUs, {gpus_per_node} needed"
    return missing


def _exited(workers: Sequence[tuple[str, subprocess.Popen]]) -> list[tuple[str, int]]:
    return [(host, proc.returncode) for host, proc in workers if proc.poll() is not None]


def wait_for_nodes(
    dashboard_url: str,
    hosts: Sequence[str],
    gpus_per_node: int,
    *,
    timeout_s: float,
    workers: Sequence[tuple[str, subprocess.Popen]] = (),
    log_path: str | os.PathLike | None = None,
    poll_interval_s: float = 1.0,
    list_nodes: Callable[[str], list[dict[str, Any]]] = ray_nodes,
) -> list[dict[str, Any]]:
    """Wait until every host of ``hosts`` has an alive Ray node with its GPUs; return Ray's node list.

    Raises ClusterError naming the hosts still missing after ``timeout_s``, or at once naming a worker of
    ``workers`` (host, its ``ray start`` process) that exited: a worker that cannot join would otherwise
    leave slime waiting for its GPUs until the job's time limit.
    """
    deadline = time.monotonic() + timeout_s
    tail = f"; last lines of {log_path}:\n{log_tail(log_path)}" if log_path else ""
    while True:
        exited = _exited(workers)
        if exited:
            names = ", ".join(f"{host} (exit status {rc})" for host, rc in exited)
            raise ClusterError(f"the Ray worker on node(s) {names} exited before the cluster was complete" + tail)
        nodes = list_nodes(dashboard_url)
        missing = missing_nodes(nodes, hosts, gpus_per_node)
        if not missing:
            return nodes
        if time.monotonic() > deadline:
            what = "; ".join(f"{host}: {why}" for host, why in missing.items())
            joined = sorted(f"{node_host(n) or '?'} ({n.get('node_ip')})" for n in nodes if n.get("state") == "ALIVE")
            raise ClusterError(
                f"{len(missing)} of {len(hosts)} node(s) not ready after train.slime.join_timeout_s = "
                f"{timeout_s:g} s: {what} (joined: {', '.join(joined) or 'none'})" + tail
            )
        time.sleep(poll_interval_s)


def preflight(
    checks: Sequence[Any],
    directory: str | os.PathLike,
    token: str,
    *,
    timeout_s: float,
    log_path: str | os.PathLike,
    run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
) -> None:
    """Run each node's check (``NodeCheck``: host, command); raise ClusterError naming every node that failed.

    The head writes ``<directory>/head`` with ``token`` first; each node reads it back and writes
    ``node-<host>``; afterwards the head reads every node's file: both directions of the shared work directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.iterdir():  # a previous attempt's files must not pass for this one's
        old.unlink()
    (directory / "head").write_text(token + "\n", encoding="utf-8")
    failures = []
    with open(log_path, "ab") as log:
        for check in checks:
            log.write(f"# pre-flight on {check.host}: {check.command}\n".encode())
            log.flush()
            try:
                done = run(
                    check.command,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    timeout=timeout_s,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                failures.append(f"{check.host}: the check did not finish within {timeout_s:g} s")
                continue
            out = (done.stdout or b"").decode("utf-8", "replace").strip()
            log.write((out + "\n").encode())
            if done.returncode != 0:
                failures.append(f"{check.host}: {out or f'the check exited with status {done.returncode}'}")
                continue
            mine = directory / f"node-{check.host}"
            try:
                seen = mine.read_text(encoding="utf-8").split()
            except OSError:
                seen = []
            if not seen or seen[0] != token:
                failures.append(
                    f"{check.host}: its token file {mine} is not visible on the head node: the work directory "
                    "is not shared"
                )
    if failures:
        raise ClusterError("pre-flight failed before slime started:\n  " + "\n  ".join(failures))
    for f in directory.iterdir():
        f.unlink()


class WorkerWatch:
    """While the block runs, a thread polls ``processes`` ((name, Popen)); the first that exits calls
    ``on_exit(name, returncode)`` (e.g. stopping the job's submit) and is kept in ``exited``."""

    def __init__(
        self,
        processes: Sequence[tuple[str, subprocess.Popen]],
        on_exit: Callable[[str, int], None],
        poll_interval_s: float = 1.0,
    ) -> None:
        self.processes = list(processes)
        self.on_exit = on_exit
        self.poll_interval_s = poll_interval_s
        self.exited: tuple[str, int] | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-watch", daemon=True)

    def _run(self) -> None:
        while not self._done.wait(self.poll_interval_s):
            for name, proc in self.processes:
                if proc.poll() is not None:
                    self.exited = (name, int(proc.returncode))
                    self.on_exit(name, int(proc.returncode))
                    return

    def __enter__(self) -> WorkerWatch:
        if self.processes:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()


def job_ray_pids(temp_dir: str, proc_root: str | os.PathLike = "/proc") -> list[int]:
    """Processes of this user whose command line names ``temp_dir`` (Ray passes its temp/session dir to
    every process it starts: gcs_server, raylet, dashboard, agents, workers)."""
    marker = str(temp_dir).rstrip("/") + "/"
    bare = str(temp_dir).rstrip("/")
    me, uid = os.getpid(), os.getuid()
    pids = []
    for entry in Path(proc_root).iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [a.decode("utf-8", "replace") for a in args]
        if any(marker in a or a.endswith("=" + bare) or a == bare for a in text):
            pids.append(int(entry.name))
    return sorted(pids)


def stop_job_ray(temp_dir: str, grace_s: float = 10.0) -> list[int]:
    """SIGTERM, then after ``grace_s`` SIGKILL, the processes of this job's Ray (``job_ray_pids``); return them.

    This replaces ``ray stop``, which stops every Ray process of the user on the node, another job's included.
    """
    pids = job_ray_pids(temp_dir)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
