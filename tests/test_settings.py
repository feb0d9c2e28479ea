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
    "searchr1.retrieval.server.Limits.topk_max": (
        "the server library's limit; `serve` and the DAG pass retriever.topk_max"
    ),
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
