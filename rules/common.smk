# Paths, config validation and helpers shared by every rule file.
#
# Each step declares the config keys its job reads with `params= **settings(...)` (one param per key, so a
# changed value reruns exactly the steps that read it; see searchr1/steps/settings.py), and asks for its
# machine from the config's resources (`job_resources(...)`): the config is the one place for both.
import sys
from pathlib import Path

sys.path.insert(
    0, workflow.basedir
)  # the searchr1 package beside the Snakefile, installed or not

from searchr1.config import (  # noqa: E402
    ConfigError,
    validate_config,
    validate_experiments,
)
from searchr1.experiments import runs  # noqa: E402
from searchr1.steps.settings import MessageText, StepSettings, declare  # noqa: E402

from searchr1.retrieval import placement as retriever_placement  # noqa: E402

try:
    config = validate_config(config)
    # every (experiment, seed) run's effective config: the config with its experiment's overrides and seed
    RUN_CONFIGS = validate_experiments(config)
except ConfigError as err:
    raise WorkflowError(str(err)) from None
# A shared retriever that cannot fit beside SGLang is refused here, before anything is submitted.
_placement_problems = retriever_placement.plan_check(config)
if _placement_problems:
    raise WorkflowError(
        "retriever placement:\n  - " + "\n  - ".join(_placement_problems)
    )

DATA = config["data_dir"]
WORK = config[
    "work_dir"
]  # null in the config = <data_dir>/work (resolved by validate_config)
TOY = config["scale"] == "toy"
SPLITS = config["eval"]["splits"]
# The training runs, experiments x train.seeds (searchr1.experiments). One run (the default) keeps the single
# run's paths (results/train, results/models/rl, model rl); several live under results/runs/<exp>/seed<seed>/
# and their RL models are evaluated as rl-<exp>-s<seed>.
RUNS = runs(config)
SINGLE_RUN = len(RUNS) == 1
RUN_CONFIG = {run: cfg for run, cfg in zip(RUNS, RUN_CONFIGS)}
RUN_OF_MODEL = {run.model: run for run in RUNS}
RUN_MODELS = [run.model for run in RUNS]
# A run's files: the single run's paths, or patterns over the {experiment} and {seed} wildcards.
RUN_DIR = "results" if SINGLE_RUN else "results/runs/{experiment}/seed{seed}"
RUN_TRAIN_DIR = f"{RUN_DIR}/train"
RUN_MODEL_DIR = "results/models/rl" if SINGLE_RUN else f"{RUN_DIR}/model"
RUN_LOG = "" if SINGLE_RUN else "_{experiment}_s{seed}"  # logs/train_<exp>_s<seed>.log
# Evaluated models: the base policy, the runs' RL checkpoints, then eval.models in config order (headline rows).
EVAL_MODELS = config["eval"]["models"]
MODELS = ["base", *RUN_MODELS, *EVAL_MODELS]


def run_of(wildcards, runs=RUNS):
    """The run a job of the train or export_rl rule belongs to (its {experiment} and {seed} wildcards)."""
    if len(runs) == 1:
        return runs[0]
    for run in runs:
        if run.experiment == wildcards.experiment and str(run.seed) == wildcards.seed:
            return run
    raise WorkflowError(
        f"no run {wildcards.experiment} seed {wildcards.seed} in experiments x train.seeds"
    )


def run_files(run, pattern):
    """``pattern`` (over {experiment} and {seed}) for ``run``."""
    return pattern.format(experiment=run.experiment, seed=run.seed)


def per_run_params(params_of_run):
    """Snakemake params, one per name, each the value of the job's run ({run: params dict}): every run
    declares its own effective settings, so a changed experiment setting reruns that experiment's runs only.
    """
    names = {tuple(p) for p in params_of_run.values()}
    if len(names) != 1:
        raise WorkflowError(
            "the runs' train jobs declare different settings (an experiment changed a section's shape)"
        )
    runs = list(params_of_run)
    return {
        name: (
            lambda wildcards, name=name: params_of_run[run_of(wildcards, runs)][name]
        )
        for name in next(iter(names))
    }


RES = config["resources"]
TRAIN_RES = config["train"]["resources"]
EVAL_RES = config["eval"]["resources"]

QA_RAW = {"train": f"{DATA}/qa/train.parquet", "test": f"{DATA}/qa/test.parquet"}
CORPUS = f"{DATA}/corpus/corpus.jsonl"
OFFSETS = f"{CORPUS}.offsets.npy"
INDEX = f"{DATA}/index/index.faiss"
INDEX_META = f"{INDEX}.meta.json"
ENCODER_DIR = f"{DATA}/models/encoder"
BASE_MODEL_DIR = f"{DATA}/models/policy_base"
RETRIEVER_INPUTS = dict(
    corpus=CORPUS,
    offsets=OFFSETS,
    index=INDEX,
    index_meta=INDEX_META,
    encoder=ENCODER_DIR,
)


def settings(*keys):
    """Snakemake params for the config keys a job reads (a key or a whole section)."""
    return declare(config, *keys)


def job_resources(name):
    """mem_mb and runtime (minutes) of the job family `name` from the config's resources section."""
    res = RES[name]
    return {"mem_mb": res["mem_mb"], "runtime": res["runtime_min"]}


# What a job that starts its own retriever reads: the encoder's settings (also the index's), the server's
# and the client's. The server's and client's are operational (schema: x-operational): recorded, no rerun.
ENCODER_SETTINGS = [
    f"retriever.encoder.{key}"
    for key in (
        "query_prefix",
        "passage_prefix",
        "pooling",
        "normalize",
        "max_length",
        "fp16",
        "cpu_bf16",
    )
]
RETRIEVER_SETTINGS = ENCODER_SETTINGS + [
    f"retriever.{key}"
    for key in (
        "topk",
        "backend",
        "topk_max",
        "max_batch_size",
        "max_wait_ms",
        "host",
        "port",
        "url",
        "startup_timeout_s",
        "timeout_s",
        "max_retries",
        "placement",  # where the server runs (searchr1.retrieval.placement)
        "gpus",
    )
]
# What a job's placement check reads under placement shared: the shard size, the allowances, SGLang's share.
SHARED_PLACEMENT = (
    config["retriever"]["placement"] == "shared" and not config["retriever"]["url"]
)
SHARED_SETTINGS = (
    [
        "budget.corpus_passages",
        "budget.embedding_dim",
        "budget.retriever_gpu_overhead_mb",
        "budget.retriever_encoder_gpu_mb",
        "budget.colocate_margin_gb",
        "train.slime.sglang_mem_fraction_static",
    ]
    if SHARED_PLACEMENT
    else []
)
# Jobs whose only GPU user is the retriever shard it like training does under shared: they read its GPU count.
RETRIEVER_ONLY_SETTINGS = (
    ["train.backend", "train.slime.gpus_per_node", "train.resources.gpus"]
    if SHARED_PLACEMENT
    else []
)
CLIENT_SETTINGS = ["agent.search_concurrency"]
# The agent loop of evaluation (and of the learning curve during training): searchr1.evaluate.eval_agent_config.
EVAL_AGENT_SETTINGS = [
    "agent.max_turns",
    "agent.on_retrieval_error",
    "retriever.topk",
    "train.rollout_max_response_len",
    "eval.temperature",
]

TRAIN_BACKEND = config["train"]["backend"]
SLIME = config["train"]["slime"]
CURVE = bool(config["eval"]["interval"])
# The train job reads the recipe (train.*, less the other backend's section; train.seed is the run's seed, not
# the list train.seeds, so a new seed reruns nothing) and the learning-curve settings only when eval.interval
# turns the curve on. Each run declares them from its own effective config.
TRAIN_KEYS = [
    "seed",
    "policy.repo",
    *(
        f"train.{key}"
        for key in config["train"]
        if key not in ("slime", "torch", "resources", "seeds")
    ),
    f"train.{TRAIN_BACKEND}",
    # slime: a worker node's step asks for the job's per-node CPUs and memory (operational)
    *(["train.resources"] if TRAIN_BACKEND == "slime" else []),
    "reward",  # the training reward's scores (searchr1.reward.RewardSettings)
    "agent.max_turns",
    "agent.on_retrieval_error",
    *(["agent.sglang_input"] if TRAIN_BACKEND == "slime" else []),
    "retriever.topk",
    *RETRIEVER_SETTINGS,
    *CLIENT_SETTINGS,
    *SHARED_SETTINGS,
    "train.resources.gpus",  # the torch backend's GPUs: the split between it and a dedicated retriever
    "eval.interval",
    *(
        ["eval.curve_subset", "eval.splits", "eval.temperature", "eval.batch_size"]
        if CURVE
        else []
    ),
    "work_dir",  # checkpoints and exports under <work_dir>/train (operational)
    "budget",  # the free-disk check before training starts (operational)
    *(["agent.skip_special_tokens"] if TRAIN_BACKEND == "slime" else []),
]
TRAIN_SETTINGS = {run: declare(RUN_CONFIG[run], *TRAIN_KEYS) for run in RUNS}

# GPUs per job from retriever.placement (searchr1.retrieval.placement): dedicated adds the retriever's own GPUs
# to the train and evaluate jobs; the retriever check asks for what its retriever uses (none on the CPU).
TRAIN_NODES = SLIME["nodes"] if TRAIN_BACKEND == "slime" else 1
TRAIN_GPUS_PER_NODE = retriever_placement.job_gpus(config, "train")
TRAIN_GPUS = TRAIN_NODES * TRAIN_GPUS_PER_NODE
if TRAIN_NODES > 1:
    # SLURM's --gpus is a job total it may split unevenly over the nodes; gres is per node (the retriever's
    # GPUs are asked on every node, since which node runs the job's first step is not known in advance).
    TRAIN_GPU_RESOURCES = {"gres": f"gpu:{TRAIN_GPUS_PER_NODE}"}
else:
    TRAIN_GPU_RESOURCES = {"gpu": TRAIN_GPUS}
EVAL_GPUS = retriever_placement.job_gpus(config, "evaluate")
CHECK_GPUS = retriever_placement.job_gpus(config, "retriever_check")

# The slime image, pulled once by rule container_image (rules/train.smk) to a file under the work dir, when
# a step runs in it: slime training, or the SGLang evaluation server.
from searchr1.budget import format_plan, uses_container  # noqa: E402
from searchr1.container import image_file  # noqa: E402

IMAGE = image_file(SLIME, WORK) if uses_container(config) else None
IMAGE_INPUT = {"image": IMAGE} if IMAGE else {}

# The run's budget (disk per artifact, GPUs and time per job), printed before anything starts, `-n` included;
# not again by the jobs themselves (they parse this file too).
if workflow.is_main_process:
    print(format_plan(config), file=sys.stderr)


def slime_command_preview(run):
    """The exact commands ``run``'s train job runs (printed by `snakemake -n`), built by the same code it runs,
    from the settings the train rule declares (so the preview cannot read more than the job may).
    """
    if TRAIN_BACKEND != "slime":
        return "torch GRPO backend (searchr1.grpo), one process"
    from searchr1.steps.train import slime_preview

    return slime_preview(
        StepSettings.from_params(TRAIN_SETTINGS[run], step="train"),
        base_model=BASE_MODEL_DIR,
        train_parquet="results/data/train.parquet",
        image_file=IMAGE,
    )


from searchr1.budget import need_bytes  # noqa: E402

TRAIN_PARAMS = per_run_params(TRAIN_SETTINGS)
# the message's last part, per run (a param, so `-n` shows each run's own work dir and command)
TRAIN_PARAMS["command"] = lambda wildcards: MessageText(
    f"{RUN_CONFIG[run_of(wildcards)]['work_dir']}/train (with margin); "
    f"{retriever_placement.describe(config, 'train')}; runs:\n"
    + slime_command_preview(run_of(wildcards))
)
TRAIN_MESSAGE = (
    f"GRPO training ({TRAIN_BACKEND}) on {TRAIN_GPUS} GPUs, {TRAIN_NODES} node(s), "
    f"{{resources.mem_mb}} MB, {{resources.runtime}} min, up to {need_bytes(config, 'train') / 1e9:,.1f} GB "
    "of disk under {params.command}"
)
# Braces doubled: Snakemake formats the message with the job's wildcards.
_eval_retriever = retriever_placement.describe(config, "evaluate")
_eval_retriever = _eval_retriever.replace("{", "{{").replace("}", "}}")
EVAL_MESSAGE = (
    f"evaluate {{wildcards.model}} ({{input.model}}) on {{wildcards.split}} ({config['eval']['engine']}) on {{resources.gpu}} GPU(s), "
    f"{{resources.mem_mb}} MB, {{resources.runtime}} min; {_eval_retriever}"
)


def eval_model_dir(name):
    """Where model `name` is evaluated from: base, a run's RL model, a download of eval.models (rule download_model_<name>)
    or its local directory."""
    if name == "base":
        return BASE_MODEL_DIR
    if name in RUN_OF_MODEL:
        return run_files(RUN_OF_MODEL[name], RUN_MODEL_DIR)
    spec = EVAL_MODELS[name]
    return spec["path"] if "path" in spec else f"{DATA}/models/eval/{name}"


def model_dir(wildcards):
    return eval_model_dir(wildcards.model)


wildcard_constraints:
    model="|".join(MODELS),
    split="|".join(SPLITS),
    experiment="|".join(config["experiments"]),
    seed="[0-9]+",
