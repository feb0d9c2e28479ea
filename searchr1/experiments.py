"""Experiments x seeds: the training runs of one workflow and each run's effective configuration.

``experiments:`` maps a name to the settings that experiment changes (a partial config of ``reward``,
``train`` and ``agent`` keys); ``train.seeds`` lists the training seeds (null = ``[seed]``). Every
(experiment, seed) is one run: trained with the config merged with its experiment's overrides and
``train.seed`` set to its seed, its RL model evaluated on every split. Each run's jobs declare that
effective config, so a changed experiment setting reruns only that experiment's runs, and a new seed trains
only the new runs.

This module names the runs and checks the overrides; it imports no other module of the package, so
searchr1.config can use it. The runs' effective configs are built and validated there (``run_config``,
``validate_experiments``).

Paths: the default single run (one experiment, one seed) keeps the single run's paths (``results/train``,
``results/models/rl``, evaluation model ``rl``). With several runs, every run lives under
``results/runs/<experiment>/seed<seed>/`` (``train/``, ``model/``) and its evaluation is the model
``rl-<experiment>-s<seed>`` in ``results/eval/``; its checkpoints go to ``<work_dir>/runs/<experiment>/seed<seed>``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

SECTIONS = ("reward", "train", "agent")
# Keys that change a run's shape (its jobs, machines or the seed list), not what it trains: not per experiment.
FIXED = (
    "train.backend",
    "train.seeds",
    "train.seed",
    "train.resources",
    "train.slime.nodes",
    "train.slime.gpus_per_node",
)
MODEL_PREFIX = "rl-"
_RUN_MODEL = re.compile(r"^rl-(?P<experiment>[A-Za-z][A-Za-z0-9_]*)-s(?P<seed>[0-9]+)$")


@dataclass(frozen=True)
class Run:
    """One (experiment, seed) training run and where its results live."""

    experiment: str
    seed: int
    single: bool  # the only run of the workflow: the single run's paths

    @property
    def model(self) -> str:
        """Its RL model's name among the evaluated models (results/eval/<model>/)."""
        return "rl" if self.single else f"{MODEL_PREFIX}{self.experiment}-s{self.seed}"

    @property
    def results_dir(self) -> str:
        return "results" if self.single else f"results/runs/{self.experiment}/seed{self.seed}"

    @property
    def train_dir(self) -> str:
        return f"{self.results_dir}/train"

    @property
    def model_dir(self) -> str:
        return "results/models/rl" if self.single else f"{self.results_dir}/model"

    @property
    def label(self) -> str:
        return f"{self.experiment} seed {self.seed}"


def train_seeds(cfg: Mapping[str, Any]) -> list[int]:
    """The training seeds: ``train.seeds``, or ``[seed]`` when it is null."""
    seeds = cfg["train"]["seeds"]
    return [int(s) for s in seeds] if seeds else [int(cfg["seed"])]


def experiment_names(cfg: Mapping[str, Any]) -> list[str]:
    return list(cfg["experiments"])


def runs(cfg: Mapping[str, Any]) -> list[Run]:
    """Every (experiment, seed), experiments in config order, then seeds in train.seeds order."""
    names, seeds = experiment_names(cfg), train_seeds(cfg)
    single = len(names) * len(seeds) == 1
    return [Run(name, seed, single) for name in names for seed in seeds]


def run_of_model(cfg: Mapping[str, Any], model: str) -> Run | None:
    """The run whose RL model is ``model`` (None for base and eval.models)."""
    for run in runs(cfg):
        if run.model == model:
            return run
    return None


def is_run_model_name(name: str) -> bool:
    """Whether ``name`` has the form of a run's model (reserved: eval.models may not use it)."""
    return name == "rl" or bool(_RUN_MODEL.match(name))


def _leaves(value: Any, path: str) -> list[str]:
    if isinstance(value, Mapping) and value:
        return [leaf for key, sub in value.items() for leaf in _leaves(sub, f"{path}.{key}")]
    return [path]


def _known(cfg: Mapping[str, Any], path: str) -> bool:
    """Whether the dotted ``path`` is a key of the (complete) config, or lies inside a map-valued key."""
    node: Any = cfg
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def override_problems(cfg: Mapping[str, Any]) -> list[str]:
    """What is wrong with the experiments' overrides, each naming the experiment and the key."""
    problems = []
    for name, overrides in cfg["experiments"].items():
        for key in override_keys(overrides):
            where = f"config key 'experiments.{name}.{key}'"
            if key.split(".")[0] not in SECTIONS:
                problems.append(f"{where}: an experiment may change only {', '.join(SECTIONS)} keys")
            elif any(key == fixed or key.startswith(fixed + ".") for fixed in FIXED):
                problems.append(f"{where}: the same for every run (it shapes the jobs or seeds), not per experiment")
            elif not _known(cfg, key):
                problems.append(f"{where}: unknown key (not a key of the config)")
    return problems


def override_keys(overrides: Mapping[str, Any]) -> list[str]:
    """The dotted keys an experiment's overrides change."""
    return [k.lstrip(".") for k in _leaves(overrides, "")] if overrides else []


def overrides_text(overrides: Mapping[str, Any]) -> str:
    """``key = value, ...`` of an experiment's overrides, or "the config as it is"."""
    keys = override_keys(overrides)
    if not keys:
        return "the config as it is"
    values = []
    for key in keys:
        node: Any = overrides
        for part in key.split("."):
            node = node[part]
        values.append(f"{key} = {node}")
    return ", ".join(values)


def by_experiment(cfg_runs: Sequence[Run]) -> dict[str, list[Run]]:
    """Runs by experiment, in config order."""
    out: dict[str, list[Run]] = {}
    for run in cfg_runs:
        out.setdefault(run.experiment, []).append(run)
    return out
