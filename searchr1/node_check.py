"""The pre-flight a multi-node train job runs on every node before slime starts (``searchr1.cluster.preflight``).

Run as a file (``python3 <repo>/searchr1/node_check.py ...``) through the same launch prefix and container
as that node's Ray worker, so it sees what slime's processes there will see. Standard library only: it runs
with whatever ``python3`` the node (or the slime image) has, without the project installed.

On the node it proves two things, and exits non-zero with one line naming the node and what failed:
- the retriever URL that slime is given answers ``/health`` from here (the RolloutManager actor that calls
  it may be placed on any node);
- the work directory is shared: the token file the head wrote is here with the head's token, and the file
  this node writes beside it (read back by the head afterwards) is there.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import urllib.error
import urllib.request

from searchr1.fsutil import write_text_atomic


def health_url(retrieve_url: str) -> str:
    base = retrieve_url.rstrip("/")
    return (base[: -len("/retrieve")] if base.endswith("/retrieve") else base) + "/health"


def check_retriever(url: str, timeout_s: float) -> str | None:
    """None when the retriever's /health answers ok from here, else what went wrong."""
    target = health_url(url)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy (as the client)
    try:
        with opener.open(target, timeout=timeout_s) as response:
            body = json.loads(response.read().decode("utf-8"))
    except (urllib.error.URLError, OSError, ValueError) as e:
        return f"the retriever at {target} does not answer from here: {e}"
    if body.get("status") != "ok":
        return f"the retriever at {target} answers status {body.get('status')!r}"
    return None


def check_shared_dir(directory: str, token: str, node: str) -> str | None:
    """None when the head's token file is readable here with ``token``, and this node's file is written."""
    head_file = os.path.join(directory, "head")
    try:
        with open(head_file, encoding="utf-8") as fh:
            seen = fh.read().strip()
    except OSError as e:
        return f"the head's token file {head_file} is not visible here ({e}): the work directory is not shared"
    if seen != token:
        return f"{head_file} holds another run's token: the work directory is not the head's"
    mine = os.path.join(directory, f"node-{node}")
    try:
        write_text_atomic(mine, f"{token} {socket.gethostname()}\n")
    except OSError as e:
        return f"cannot write {mine} ({e})"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--node", required=True, help="the node's name in the allocation (for the messages)")
    ap.add_argument("--url", required=True, help="the retriever's /retrieve URL given to slime")
    ap.add_argument("--dir", required=True, help="the pre-flight directory under the shared work directory")
    ap.add_argument("--token", required=True)
    ap.add_argument("--timeout-s", type=float, default=10.0)
    args = ap.parse_args(argv)
    failures = [
        f for f in (check_retriever(args.url, args.timeout_s), check_shared_dir(args.dir, args.token, args.node)) if f
    ]
    for failure in failures:
        print(f"pre-flight on node {args.node} ({socket.gethostname()}): {failure}", file=sys.stderr)
    if not failures:
        print(f"pre-flight on node {args.node} ({socket.gethostname()}): ok")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
