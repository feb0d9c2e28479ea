"""Managed children (retriever, SGLang, Ray) never outlive the job that started them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import alive, wait_dead

from searchr1.process import StartError, free_port, managed_process, stop_process_group

PARENT = """
import subprocess, sys, time
from searchr1.process import die_with_parent
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True,
                         preexec_fn=die_with_parent() if sys.argv[1] == "guarded" else None)
print(child.pid, flush=True)
time.sleep(120)
"""


def start_parent(mode: str) -> tuple[subprocess.Popen, int]:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, mode], stdout=subprocess.PIPE, text=True)
    return parent, int(parent.stdout.readline())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_without_the_guard_the_child_would_be_orphaned():
    """The control: a child without die_with_parent survives a SIGKILLed job (so the sigkill tests below can fail)."""
    parent, child = start_parent("unguarded")
    try:
        parent.kill()
        parent.wait()
        # A parent-death signal is sent while the parent exits, before wait() returns: a guarded child would
        # be gone within milliseconds of being scheduled.
        time.sleep(0.5)
        assert alive(child)
    finally:
        os.kill(child, signal.SIGKILL)


def test_stop_process_group_stops_the_whole_tree():
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess,sys,time; "
            "subprocess.Popen([sys.executable,'-c','import time; time.sleep(60)']); time.sleep(60)",
        ],
        start_new_session=True,
    )

    def group() -> list[int]:
        out = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True)
        return [int(pid) for pid in out.stdout.split()]

    deadline = time.monotonic() + 30
    while len(members := group()) < 2:  # the child has started its own child
        assert time.monotonic() < deadline, members
        time.sleep(0.02)
    stop_process_group(proc, grace_s=5)
    assert proc.poll() is not None
    assert all(wait_dead(pid) for pid in members)


def test_free_port_is_bindable():
    import socket

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


# --- the three users of managed_process, on every exit path ----------------------------------------------

TESTS_DIR = Path(__file__).parent
EXIT_CODES = {"normal": 0, "exception": 1, "sigterm": 128 + signal.SIGTERM, "sigkill": -signal.SIGKILL}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
@pytest.mark.parametrize("exit_path", list(EXIT_CODES))
@pytest.mark.parametrize("user", ["retriever", "sglang", "ray"])
def test_managed_children_are_gone_on_every_exit_path(user: str, exit_path: str, tmp_path: Path) -> None:
    """The job (tests/process_users.py) leaves its block normally, by an exception, by SLURM's SIGTERM or is
    SIGKILLed; afterwards every server it started is gone, and so are the servers' own children, except after
    a SIGKILL, where only the server itself is told (its parent-death signal) and must take its children."""
    job = subprocess.Popen(
        [sys.executable, str(TESTS_DIR / "process_users.py"), user, exit_path, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    pids: list[int] = []
    try:
        if exit_path in ("sigterm", "sigkill"):
            assert job.stdout.readline().strip() == "ready", job.stderr.read()
            job.send_signal(signal.SIGTERM if exit_path == "sigterm" else signal.SIGKILL)
        _, err = job.communicate(timeout=60)
        assert job.returncode == EXIT_CODES[exit_path], err
        if exit_path == "exception":
            assert ("FileNotFoundError" if user == "ray" else "the job failed") in err
        servers = [[int(p) for p in line.split()] for line in (tmp_path / "pids").read_text().splitlines()]
        pids = [p for pair in servers for p in pair]
        assert len(servers) == (2 if user == "ray" else 1)  # Ray: the head and one worker
        for server, child in servers:
            assert wait_dead(server), f"the {user} server outlived its job ({exit_path})"
            if exit_path != "sigkill":
                assert wait_dead(child), f"a child of the {user} server outlived its job ({exit_path})"
        if user == "ray":
            assert (tmp_path / "ray_stop_ran").exists() == (exit_path != "sigkill")
    finally:
        job.kill()
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_child_that_never_becomes_healthy_is_reported_with_its_log_and_stopped(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    code = "import time; print('loading weights', flush=True); time.sleep(60)"
    with pytest.raises(StartError, match="(?s)slow server not healthy after 1 s.*loading weights"):
        with managed_process(
            [sys.executable, "-c", code],
            name="slow server",
            log_path=log,
            healthy=lambda: False,
            startup_timeout_s=1.0,
            poll_interval_s=0.1,
        ):
            pytest.fail("must not yield")
    assert "starting" in log.read_text()


def test_a_child_that_exits_first_is_reported_with_its_status_and_log(tmp_path: Path) -> None:
    code = "import sys; sys.exit('model not found')"
    with pytest.raises(StartError, match="(?s)server exited with code 1 before it was healthy.*model not found"):
        with managed_process(
            [sys.executable, "-c", code],
            name="server",
            log_path=tmp_path / "x.log",
            healthy=lambda: False,
            poll_interval_s=0.05,
        ):
            pytest.fail("must not yield")
