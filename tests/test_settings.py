"""One home for every default, each relation between keys checked once.

config.yaml holds every value of the recipe (the schema documents and checks it); a settings object reads
its values through ``from_config`` (``CONFIG_KEYS``) and carries no default of its own for them; the checks
between keys live in searchr1/config.py and nowhere else.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, config

import searchr1
from searchr1.config import ConfigError, complete, config_value, load_config, load_schema, validate_config
from searchr1.steps.settings import flatten, operational_keys

PACKAGE = Path(searchr1.__file__).parent


def _modules():
    for info in pkgutil.walk_packages(searchr1.__path__, "searchr1."):
        if not info.name.endswith("__main__"):
            yield importlib.import_module(info.name)


def _dataclasses():
    for module in _modules():
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__:
                yield f"{module.__name__}.{name}", obj


def _leaf_names() -> set[str]:
    cfg = config(toy=True)
    return {key.split(".")[-1] for top, value in cfg.items() for key in flatten(value, top)}


def _has_default(field: dataclasses.Field) -> bool:
    return field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING


SETTINGS_CLASSES = [(name, cls) for name, cls in _dataclasses() if hasattr(cls, "CONFIG_KEYS")]

# Fields named like a config key that are something else, each with its reason.
NOT_CONFIG_VALUES = {
    "searchr1.engines.GenerationRequest.temperature": "per request; the agent always sets the rollout/eval one",
    "searchr1.toy.warmstart.WarmStartConfig.weight_decay": "the warm start's own optimiser, not train.weight_decay",
    "searchr1.toy.warmstart.WarmStartConfig.grad_clip": "the warm start's own optimiser, not train.torch.grad_clip",
    "searchr1.toy.world.World.splits": "the generated question splits (data), not data.splits",
    "searchr1.slime_launch.LaunchPaths.work_dir": "the train step passes the config's work_dir; None = not bound",
}


def test_the_settings_classes_are_found():
    names = {name.rsplit(".", 1)[1] for name, _ in SETTINGS_CLASSES}
    assert {"GRPOSettings", "AgentConfig", "WarmStartConfig", "WorldSizes", "ToyModelSize"} <= names


@pytest.mark.parametrize("name,cls", SETTINGS_CLASSES, ids=[n for n, _ in SETTINGS_CLASSES])
def test_settings_objects_have_no_literal_default_for_config_values(name, cls):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    toy = config(toy=True)
    for field_name, key in cls.CONFIG_KEYS.items():
        assert field_name in fields, f"{name}.CONFIG_KEYS names no field {field_name!r}"
        assert not _has_default(fields[field_name]), f"{name}.{field_name} has a default, but {key} holds its value"
        config_value(toy, key)  # the key exists (KeyError otherwise)


def test_no_other_field_shadows_a_config_value_with_a_default():
    leaves = _leaf_names()
    found = {}
    for name, cls in _dataclasses():
        mapped = set(getattr(cls, "CONFIG_KEYS", {}))
        for field in dataclasses.fields(cls):
            if _has_default(field) and field.name in leaves and field.name not in mapped:
                found[f"{name}.{field.name}"] = field.default
    assert set(found) == set(NOT_CONFIG_VALUES), (
        "a dataclass field named like a config key has a literal default: read it from the config "
        f"(CONFIG_KEYS) or list it with its reason: {sorted(set(found) ^ set(NOT_CONFIG_VALUES))}"
    )


# --- keyword defaults: no function or method of the package restates (or contradicts) a config value ----------

# Keyword parameters named like a config key (its leaf, or ending in "_<leaf>") that keep a literal default,
# each with the reason it is not that key's value. Anything else named like a config key is required.
KEYWORD_DEFAULTS_NOT_CONFIG_VALUES = {
    **{
        f"searchr1.reward.compute_score_em({key})": "Search-R1's own signature (qa_em_format.py), kept so the function "
        "reads as upstream's; the workflow always passes the reward: section's values (RewardSettings.score)"
        for key in ("structure_format_score", "final_format_score", "retrieval_score")
    },
    "searchr1.engines.HFEngine(device)": "the HF eval engine's torch device (the toy evaluates on the CPU); no config "
    "key sets it (train.torch.device is the trainer's)",
    "searchr1.engines.HFEngine(max_batch_size)": "sequences per HF generate call, not retriever.max_batch_size",
    "searchr1.engines.HFEngine.from_pretrained(device)": "as HFEngine(device)",
    "searchr1.engines.SGLangEngine(timeout_s)": "the SGLang generation client's timeout, not retriever.timeout_s",
    "searchr1.engines.SGLangEngine(max_retries)": "the SGLang generation client's retries, not retriever.max_retries",
    "searchr1.evaluate.evaluate_split(device)": "as HFEngine(device)",
    "searchr1.evaluate.sglang_server(port)": "0 = a free port for an SGLang server, not retriever.port",
    "searchr1.evaluate.sglang_server(host)": "an SGLang server binds loopback unless told (security), "
    "not retriever.host",
    "searchr1.evaluate.sglang_server(startup_timeout_s)": "an SGLang server's start, not the retriever's",
    "searchr1.evaluate.sglang_server(extra_args)": "no extra SGLang flags, not train.slime.extra_args",
    "searchr1.grpo.logprobs.token_logprobs(temperature)": "1.0 leaves the logits as they are; the trainer passes "
    "the rollout temperature",
    "searchr1.grpo.logprobs.token_logprobs(device)": "a tensor helper's device; the trainer passes its own",
    "searchr1.grpo.logprobs.token_logprobs(bf16_autocast)": "a tensor helper is exact unless asked; the trainer "
    "passes train.torch.bf16_autocast",
    "searchr1.cluster.ray_nodes(timeout_s)": "one request to Ray's state API on the head, not the retrieval "
    "client's timeout",
    "searchr1.cluster.wait_for_nodes(list_nodes)": "the function that lists Ray's nodes (a test seam), not "
    "train.slime.nodes",
    "searchr1.process.free_port(host)": "a probe of the loopback interface, not retriever.host",
    "searchr1.process.http_ok(timeout_s)": "a health probe's timeout, not the retrieval client's",
    "searchr1.process.managed_process(startup_timeout_s)": "any child process's start; callers pass their own",
    "searchr1.report.headline_table(models)": "base and rl, the two models every run evaluates (not eval.models, "
    "the named models besides them)",
    "searchr1.report.behaviour_table(models)": "as headline_table(models)",
    "searchr1.report.render_report(models)": "as headline_table(models)",
    "searchr1.retrieval.download.download_index(delete_parts)": "a switch of the download, not retriever.index.parts",
    "searchr1.retrieval.encoder.Encoder(batch_size)": "texts per encoder forward, not eval.batch_size",
    "searchr1.retrieval.index.write_index_meta(source)": "how the index was obtained (metadata), not the config key",
    "searchr1.retrieval.index.TorchBackend.from_shards(fp16)": "the index's storage dtype, not the encoder's fp16",
    "searchr1.retrieval.managed.check_health(timeout_s)": "a health probe's timeout, not the retrieval client's",
    "searchr1.retrieval.managed.serve_command(extra_args)": "no extra serve flags, not train.slime.extra_args",
    "searchr1.retrieval.managed.managed_server(host)": "a server binds loopback unless told (security); the steps "
    "pass retriever.host",
    "searchr1.retrieval.managed.managed_server(port)": "0 = a free port; the steps pass retriever.port",
    "searchr1.retrieval.managed.managed_server(extra_args)": "no extra serve flags, not train.slime.extra_args",
    "searchr1.slime_launch.run_plan(head_timeout_s)": "the Ray head's start, not the retriever's timeout_s",
    "searchr1.stats.summarize_rows(source)": "a label of the summarised rows, not retriever.index.source",
}


def _public_callables():
    """(name, callable) of every public function, public class (its __init__ unless a dataclass: the field tests
    above cover those) and public method defined in the package, ``__main__`` modules included."""
    for info in pkgutil.walk_packages(searchr1.__path__, "searchr1."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(obj):
                yield f"{module.__name__}.{name}", obj
            elif inspect.isclass(obj):
                if not dataclasses.is_dataclass(obj) and "__init__" in vars(obj):
                    yield f"{module.__name__}.{name}", obj.__init__
                for attr, member in vars(obj).items():
                    func = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
                    if not attr.startswith("_") and inspect.isfunction(func):
                        yield f"{module.__name__}.{name}.{attr}", func


def keyword_defaults_named_like_config_keys(callables, leaves: set[str]) -> dict[str, object]:
    """``{"module.func(param)": default}`` for each parameter named like a config key (its leaf, or ending in
    ``_<leaf>``) whose default is a value (None means "not given" and is allowed)."""
    found = {}
    for name, func in callables:
        for param in inspect.signature(func).parameters.values():
            if param.default is inspect.Parameter.empty or param.default is None:
                continue
            if any(param.name == leaf or param.name.endswith("_" + leaf) for leaf in leaves):
                found[f"{name}({param.name})"] = param.default
    return found


def _all_leaf_names() -> set[str]:
    return {
        key.split(".")[-1] for toy in (False, True) for top, v in config(toy=toy).items() for key in flatten(v, top)
    }


def test_no_keyword_default_restates_a_config_value():
    found = keyword_defaults_named_like_config_keys(_public_callables(), _all_leaf_names())
    unexplained = {k: v for k, v in found.items() if k not in KEYWORD_DEFAULTS_NOT_CONFIG_VALUES}
    assert not unexplained, (
        "keyword defaults named like a config key: make them required (the caller has the config) or list them in "
        f"KEYWORD_DEFAULTS_NOT_CONFIG_VALUES with the reason they are not that key's value: {unexplained}"
    )
    stale = set(KEYWORD_DEFAULTS_NOT_CONFIG_VALUES) - set(found)
    assert not stale, f"allowlisted keyword defaults that no longer exist: {sorted(stale)}"


def test_the_keyword_default_scan_finds_the_old_literals():
    """The defaults this scan made required (the server's topk_max 100 against retriever.topk_max 50, the client's
    timeout and retries, create_app's batch size and wait) are found on functions shaped like the old ones."""

    def create_app(corpus, encoder, backend, *, topk_max=100, max_batch_size=256, max_wait_ms=1.0, default_topk=3):
        pass

    class RetrievalClient:
        def __init__(self, url, *, timeout_s=60.0, max_retries=3, backoff_s=0.5):
            pass

    found = keyword_defaults_named_like_config_keys(
        [("old.create_app", create_app), ("old.RetrievalClient", RetrievalClient.__init__)], _all_leaf_names()
    )
    assert found == {
        "old.create_app(topk_max)": 100,
        "old.create_app(max_batch_size)": 256,
        "old.create_app(max_wait_ms)": 1.0,
        "old.create_app(default_topk)": 3,
        "old.RetrievalClient(timeout_s)": 60.0,
        "old.RetrievalClient(max_retries)": 3,
    }


def test_served_limits_come_from_the_config():
    """``serve``'s flags default to the packaged config's retriever values (no second literal)."""
    from searchr1.config import default_config
    from searchr1.retrieval.__main__ import build_parser

    ret = default_config()["retriever"]
    a = build_parser().parse_args(["serve", "--corpus", "c", "--index", "i", "--encoder", "e"])
    assert (a.topk_max, a.topk, a.max_batch_size, a.max_wait_ms) == (
        ret["topk_max"],
        ret["topk"],
        ret["max_batch_size"],
        ret["max_wait_ms"],
    )


def test_from_config_reads_the_config_values():
    from searchr1.grpo.settings import GRPOSettings

    s = GRPOSettings.from_config(config(toy=True, train={"lr": 3e-4}, agent={"max_turns": 4}))
    assert (s.lr, s.max_turns, s.use_tis, s.topk) == (3e-4, 4, True, 3)
    assert s.objective().use_tis is True and s.objective().eps_clip_high == 0.28


# --- one home: config.yaml holds every key, the schema documents and checks it ---------------------------


def test_config_yaml_holds_every_key_and_a_missing_one_is_named():
    raw = yaml.safe_load((ROOT / "config.yaml").read_text())
    _, missing = complete(raw)
    assert missing == []
    del raw["train"]["weight_decay"]
    with pytest.raises(ConfigError, match=r"'train\.weight_decay': missing"):
        validate_config(raw)


def test_operational_keys_are_config_keys():
    cfg = config()
    keys = operational_keys()
    assert {"retriever.port", "retriever.url", "eval.batch_size", "resources"} <= set(keys)
    assert not {"train.lr", "eval.max_questions", "retriever.topk"} & set(keys)
    for key in keys:
        config_value(cfg, key)


def test_toy_config_only_overrides_sizes_and_switches():
    """config.toy.yaml changes values; every key it sets is a key of config.yaml."""
    full = config()
    toy = yaml.safe_load((ROOT / "config.toy.yaml").read_text())
    for top, value in toy.items():
        if top == "toy":
            continue
        for key in flatten(value, top):
            config_value(full, key)


# --- each relation between keys is checked once, in searchr1/config.py -----------------------------------


def _cross_key_checks(tree: ast.AST, leaves: set[str]) -> set[tuple[str, ...]]:
    """Key pairs compared (<, >, ==, %, ...) in the test of an `if` whose body raises or records a problem."""

    def keys(node: ast.AST) -> set[str]:
        out = set()
        for n in ast.walk(node):
            if isinstance(n, ast.Attribute) and n.attr in leaves:
                out.add(n.attr)
            elif isinstance(n, ast.Subscript) and isinstance(n.slice, ast.Constant) and n.slice.value in leaves:
                out.add(n.slice.value)
        return out

    found = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.If):
            continue
        body = [n for b in node.body for n in ast.walk(b)]
        if not any(isinstance(n, ast.Raise) or (isinstance(n, ast.Attribute) and n.attr == "append") for n in body):
            continue
        for part in ast.walk(node.test):
            if isinstance(part, (ast.Compare, ast.BinOp)):
                pair = keys(part)
                if len(pair) >= 2:
                    found.add(tuple(sorted(pair)))
    return found


# The retriever server checks a *request's* topk against its limit (input validation, not the config's).
REQUEST_CHECKS = {("searchr1/retrieval/server.py", ("topk", "topk_max"))}


def test_each_cross_key_check_exists_once():
    leaves = _leaf_names()
    in_config = _cross_key_checks(ast.parse((PACKAGE / "config.py").read_text()), leaves)
    assert ("eps_clip", "eps_clip_high") in in_config and ("topk", "topk_max") in in_config
    duplicates = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).as_posix()
        if rel == "searchr1/config.py":
            continue
        for pair in _cross_key_checks(ast.parse(path.read_text()), leaves) & in_config:
            if (rel, pair) not in REQUEST_CHECKS:
                duplicates.add((rel, pair))
    assert not duplicates, f"checks of config.py repeated elsewhere: {sorted(duplicates)}"


def test_the_duplicate_check_detector_can_fail():
    """The check GRPOSettings used to repeat is found by the detector."""
    leaves = _leaf_names()
    old = ast.parse(
        "class S:\n"
        "    def __post_init__(self):\n"
        "        if self.eps_clip_high < self.eps_clip:\n"
        "            raise ValueError('eps_clip_high below eps_clip')\n"
    )
    assert ("eps_clip", "eps_clip_high") in _cross_key_checks(old, leaves)


def test_steps_and_launchers_have_no_second_default_for_a_config_key():
    """`cfg.get("key", <default>)` would be a second home for a value config.yaml holds."""
    leaves = _leaf_names()
    offenders = []
    for path in [
        *sorted((PACKAGE / "steps").glob("*.py")),
        PACKAGE / "slime_launch.py",
        PACKAGE / "grpo" / "settings.py",
    ]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "get"
                and len(node.args) == 2
                and isinstance(node.args[0], ast.Constant)
                and node.args[0].value in leaves
            ):
                offenders.append(f"{path.name}:{node.lineno} .get({node.args[0].value!r}, ...)")
    assert not offenders, offenders


def test_load_config_fills_schema_defaults(tmp_path):
    schema = load_schema()
    schema["properties"]["data"]["properties"]["sha256"]["default"] = {}
    raw = yaml.safe_load((ROOT / "config.yaml").read_text())
    del raw["data"]["sha256"]
    filled, missing = complete(raw, schema)
    assert missing == [] and filled["data"]["sha256"] == {}
    assert load_config(ROOT / "config.yaml")["data"]["sha256"] == {}


@pytest.mark.parametrize(
    "configfiles",
    [("config.yaml", "config.toy.yaml"), ("config.yaml",)],
    ids=["toy", "full"],
)
def test_every_rules_params_unpickle_where_its_script_runs(configfiles, tmp_path):
    """Snakemake's script: directive pickles the job's params into a fresh interpreter, which must import every
    value's class from a module: a class defined in a rule file lives in snakemake.workflow, whose import from the
    script fails (a circular import), so every train job of the toy failed that way once (MessageText)."""
    import pickle
    import subprocess
    import sys

    from helpers import _workflow_rules, rule_params

    paths = [ROOT / c for c in configfiles]
    rules = _workflow_rules(tuple((path, path.read_text()) for path in paths))
    job = tmp_path / "params.pickle"
    params = {rule: rule_params(rule, *configfiles) for rule in rules if not rule.startswith("__")}
    job.write_bytes(pickle.dumps(params))
    code = "import pickle, sys; pickle.loads(open(sys.argv[1], 'rb').read())"
    res = subprocess.run(
        [sys.executable, "-c", code, str(job)], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "train" in params and "evaluate" in params
