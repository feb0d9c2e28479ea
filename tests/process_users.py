"""Run one user of ``searchr1.process.managed_process`` and leave its block by one exit path.

``python process_users.py USER EXIT TMP``: USER is ``retriever`` (``managed_server``), ``sglang``
(``sglang_server``) or ``ray`` (``run_plan`` with a head and one worker); EXIT is ``normal``, ``exception``,
``sigterm`` or ``sigkill`` (for the last two it prints ``ready`` inside the block and waits for the test's
signal). The servers are stand-ins that answer every GET with ``{"status": "ok"}``, each with a child of its
own (as SGLang's scheduler or Ray's raylet); every stand-in appends ``<its pid> <its child's pid>`` to
``TMP/pids``, so the test can check that all of them are gone once this process is.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

STANDIN = """
import http.server, json, os, subprocess, sys
port, pids = int(sys.argv[1]), sys.argv[2]
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
with open(pids, "a") as fh:
    fh.write(f"{os.getpid()} {child.pid}\\n")
class Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"status": "ok"}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", port), Ok).serve_forever()
"""


def standin(port: int, tmp: Path) -> list[str]:
    return [sys.executable, "-c", STANDIN, str(port), str(tmp / "pids")]


def block(exit_path: str) -> None:
    """What the job does while its children run."""
    if exit_path == "exception":
        raise RuntimeError("the job failed")
    if exit_path in ("sigterm", "sigkill"):
        print("ready", flush=True)
        time.sleep(300)


def main(user: str, exit_path: str, tmp: Path) -> int:
    log = tmp / f"{user}.log"
    if user == "retriever":
        import searchr1.retrieval.managed as managed

        managed.serve_command = lambda *, port, **_: standin(port, tmp)  # no model to load
        with managed.managed_server(corpus="-", index="-", encoder="-", log_path=log, startup_timeout_s=60):
            block(exit_path)
        return 0
    if user == "sglang":
        from searchr1.evaluate import sglang_server

        def wrap(command: list[str]) -> list[str]:
            return standin(int(command[command.index("--port") + 1]), tmp)

        with sglang_server(tmp, tp=1, mem_fraction=0.5, log_path=log, poll_interval_s=0.1, wrap=wrap):
            block(exit_path)
        return 0
    if user == "ray":
        from searchr1.process import free_port
        from searchr1.slime_launch import LaunchPlan, run_plan

        head_port = free_port()
        submit = {
            "normal": [sys.executable, "-c", "print('trained')"],
            "exception": [str(tmp / "no-such-ray"), "job", "submit"],  # Popen raises FileNotFoundError
            "sigterm": [sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(300)"],
        }
        submit["sigkill"] = submit["sigterm"]
        plan = LaunchPlan(
            head_start=standin(head_port, tmp),
            worker_starts=[standin(free_port(), tmp)],
            submit=submit[exit_path],
            stop=[sys.executable, "-c", f"open({str(tmp / 'ray_stop_ran')!r}, 'w')"],
            dashboard_url=f"http://127.0.0.1:{head_port}",
            custom_config={},
            make_dirs=[],
            save_dir=str(tmp / "save"),
            metrics_path=str(tmp / "metrics.jsonl"),
            gpus_per_node=1,
            join_timeout_s=60,
        )

        def popen(command: list[str], **kwargs) -> subprocess.Popen:
            pids = tmp / "pids"
            if command == plan.submit:  # submit once the head and the worker have started their own children
                while not pids.exists() or len(pids.read_text().splitlines()) < 2:
                    time.sleep(0.02)
            return subprocess.Popen(command, **kwargs)

        return run_plan(plan, log, head_timeout_s=60, stop_grace_s=10, popen=popen)
    raise SystemExit(f"unknown user {user!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], Path(sys.argv[3])))
