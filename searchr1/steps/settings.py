"""What a step may read: the settings its rule declares in ``params:``, and nothing else.

A rule declares the config keys its job reads::

    params:
        **settings("seed", "agent.max_turns", "retriever.encoder", "eval"),

``declare`` turns each key (a leaf, or a section: all its leaves) into one Snakemake param per leaf, named
after the key and valued ``("agent.max_turns", 2)``, so Snakemake's params trigger reruns the step when
that value changes and ``snakemake -n`` / ``--list-changes params`` name the key. Keys the schema marks
``x-operational: true`` (ports, timeouts, throughput knobs, resources: they do not change what a step
computes) are wrapped in :class:`Operational`, which Snakemake cannot serialise and so leaves out of the
params trigger; the job still receives them and records them.

The job gets :class:`StepSettings`, a read-only nested mapping rebuilt from those params alone: reading a
key the rule did not declare raises :class:`UndeclaredSetting` (``get`` and ``in`` too), so a job cannot use
a setting its rule does not show.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from types import MappingProxyType
from typing import Any

from searchr1.config import _resolve, cached_schema, config_value

__all__ = ["MessageText", "Operational", "StepSettings", "UndeclaredSetting", "declare", "flatten", "operational_keys"]


class UndeclaredSetting(LookupError):
    """A step read a config key its rule does not declare in ``params:`` (deliberately not a KeyError, so
    that ``.get(key, default)`` cannot swallow it)."""


@dataclass(frozen=True)
class MessageText:
    """A job's message text passed as a param (the train job's command preview): not a builtin type, so
    Snakemake leaves it out of the params it compares between runs, as :class:`Operational`. Defined here, not in
    a rule file: the job's script unpickles its params and must import the class from a module."""

    text: str

    def __str__(self) -> str:
        return self.text

    def __format__(self, spec: str) -> str:
        return self.text


@dataclass(frozen=True)
class Operational:
    """A declared setting that does not change what the step computes (``x-operational`` in the schema).

    Not a builtin type, so Snakemake does not serialise it into the params it compares between runs.
    """

    key: str
    value: Any


@cache  # asked once per key and prefix by every rule's declaration at start-up
def _node(path: str) -> Mapping[str, Any] | None:
    """The schema of a dotted config key (None where the schema has no ``properties`` for it)."""
    root = cached_schema()
    node: Mapping[str, Any] = root
    for part in path.split("."):
        node = _resolve(node, root)
        props = node.get("properties") or {}
        if part in props:
            node = props[part]
        elif isinstance(node.get("additionalProperties"), Mapping):
            node = node["additionalProperties"]
        else:
            return None
        node = _resolve(node, root)
    return node


def is_operational(path: str) -> bool:
    parts = path.split(".")
    return any((_node(".".join(parts[: i + 1])) or {}).get("x-operational") for i in range(len(parts)))


def operational_keys() -> list[str]:
    """Every key the schema marks ``x-operational`` (for the README and the tests)."""
    root = cached_schema()
    found: list[str] = []

    def walk(node: Mapping[str, Any], path: str) -> None:
        node = _resolve(node, root)
        for key, sub in (node.get("properties") or {}).items():
            where = f"{path}.{key}" if path else key
            if _resolve(sub, root).get("x-operational"):
                found.append(where)
            else:
                walk(sub, where)

    walk(root, "")
    return found


def flatten(value: Any, path: str) -> dict[str, Any]:
    """``{dotted key: value}`` of the leaves under ``path``: schema sections are descended, maps and
    lists are leaves (their keys are data, such as split names, not settings)."""
    node = _node(path)
    if isinstance(value, Mapping) and node is not None and node.get("properties") and value:
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(flatten(sub, f"{path}.{key}"))
        return out
    return {path: copy.deepcopy(value)}


def _lookup(config: Mapping[str, Any], path: str) -> Any:
    try:
        return config_value(config, path)
    except (KeyError, TypeError):
        raise KeyError(f"config key '{path}' is declared by a rule but missing from the config") from None


def declare(config: Mapping[str, Any], *paths: str) -> dict[str, Any]:
    """Snakemake ``params`` for the config keys ``paths``: one param per leaf (see the module docstring)."""
    if not paths:
        raise ValueError("declare() needs at least one config key")
    params: dict[str, Any] = {}
    for path in paths:
        for key, value in flatten(_lookup(config, path), path).items():
            name = "cfg__" + key.replace(".", "__")
            params[name] = Operational(key, value) if is_operational(key) else (key, value)
    return params


def _nest(items: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in items:
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


def _freeze(value: Any, step: str, path: str) -> Any:
    """Sections of the schema stay strict; a declared map (split name -> ...) is a read-only plain mapping,
    since its keys are data: a missing split is an ordinary lookup miss, not an undeclared setting."""
    if isinstance(value, Mapping):
        node = _node(path) if path and "[]" not in path else None
        if node is not None and node.get("properties"):
            return StepSettings(value, step=step, path=path)
        return MappingProxyType({k: _freeze(v, step, f"{path}[]") for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v, step, f"{path}[]") for v in value)
    return value


class StepSettings(Mapping[str, Any]):
    """Read-only nested view of the settings a rule declared; undeclared keys raise UndeclaredSetting."""

    def __init__(self, tree: Mapping[str, Any], *, step: str, path: str = "", operational: Iterable[str] = ()) -> None:
        self._tree = dict(tree)
        self._step = step
        self._path = path
        self._operational = frozenset(operational)

    @classmethod
    def from_params(cls, params: Iterable[tuple[str, Any]] | Mapping[str, Any], *, step: str) -> StepSettings:
        """From a rule's params (name -> ``(key, value)`` or :class:`Operational`); other params are ignored."""
        values = params.values() if isinstance(params, Mapping) else (v for _, v in params)
        items, operational = [], []
        for value in values:
            if isinstance(value, Operational):
                items.append((value.key, value.value))
                operational.append(value.key)
            elif isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
                items.append(value)
        return cls(_nest(items), step=step, operational=operational)

    @property
    def step(self) -> str:
        return self._step

    def _where(self, key: str) -> str:
        return f"{self._path}.{key}" if self._path else key

    def __getitem__(self, key: str) -> Any:
        if key not in self._tree:
            raise UndeclaredSetting(
                f"step '{self._step}' reads config key '{self._where(key)}', which its rule does not declare "
                f"in params: (add it to the rule's settings(...))"
            )
        return _freeze(self._tree[key], self._step, self._where(key))

    def __contains__(self, key: object) -> bool:
        self[str(key)]  # raises for an undeclared key: `in` must not silently branch around the declaration
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self._tree)

    def __len__(self) -> int:
        return len(self._tree)

    def __repr__(self) -> str:
        return f"StepSettings({self._step!r}, {self.to_dict()!r})"

    def to_dict(self) -> dict[str, Any]:
        """A plain, independent copy (for JSON, YAML and provenance)."""
        return copy.deepcopy(self._tree)

    def record(self, inputs: Mapping[str, Mapping[str, Any] | None] | None = None) -> dict[str, Any]:
        """The provenance record of a result this step makes (searchr1.provenance), with its inputs' records."""
        from searchr1 import provenance

        leaves = self.leaves()
        settings = {k: v for k, v in leaves.items() if k not in self._operational}
        operational = {k: v for k, v in leaves.items() if k in self._operational}
        return provenance.make(self._step, settings, operational, inputs)

    def leaves(self) -> dict[str, Any]:
        """``{dotted key: value}`` of every declared leaf."""
        out: dict[str, Any] = {}
        for key, value in self._tree.items():
            out.update(flatten(value, self._where(key)))
        return out
