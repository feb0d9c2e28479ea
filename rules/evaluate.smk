# Greedy evaluation (1 sample per question) of {base, rl} x {splits}, with the training agent loop and reward.
# Partial results live in <work_dir>/eval/{model}/{split}.partial.jsonl (not a declared output, so a killed
# job keeps them) and the job resumes from them.

EVAL_SGLANG = config["eval"]["engine"] == "sglang"


EVAL_KEYS = [
    "seed",
    "eval.engine",
    "eval.max_questions",
    "eval.batch_size",
    "work_dir",  # partial results under <work_dir>/eval (operational)
    *EVAL_AGENT_SETTINGS,
    *RETRIEVER_SETTINGS,
    *CLIENT_SETTINGS,
    *SHARED_SETTINGS,
    "eval.resources.gpus",  # the engine's GPUs: the split between it and the retriever
    # the SGLang server: in the slime image, at training's memory share, tensor parallel over its GPUs
    *(
        [
            "agent.sglang_input",
            "agent.skip_special_tokens",
            "train.slime.sglang_mem_fraction_static",
            "train.slime.container_runtime",
            "train.slime.image",
            "train.slime.env",  # the cluster network's variables (operational)
        ]
        if EVAL_SGLANG
        else []
    ),
]
EVAL_SETTINGS = {run: declare(RUN_CONFIG[run], *EVAL_KEYS) for run in RUNS}
_SHARED_EVAL_SETTINGS = settings(*EVAL_KEYS)
if {tuple(p) for p in EVAL_SETTINGS.values()} != {tuple(_SHARED_EVAL_SETTINGS)}:
    raise WorkflowError(
        "the runs' evaluations declare different settings (an experiment changed a section's shape)"
    )


# (the tables are bound as defaults: a lambda reads the globals of the last workflow parsed in its process)
def _eval_param(
    name,
    by_run=EVAL_SETTINGS,
    shared=_SHARED_EVAL_SETTINGS,
    run_of_model=RUN_OF_MODEL,
):
    return lambda wildcards: (
        by_run[run_of_model[wildcards.model]]
        if wildcards.model in run_of_model
        else shared
    )[name]


EVAL_PARAMS = {name: _eval_param(name) for name in _SHARED_EVAL_SETTINGS}


rule evaluate:
    input:
        unpack(lambda wc: RETRIEVER_INPUTS),
        **(IMAGE_INPUT if EVAL_SGLANG else {}),
        model=model_dir,
        split="results/data/{split}.parquet",
        retriever_check="results/retriever/check.json",
    output:
        jsonl="results/eval/{model}/{split}.jsonl",
        summary="results/eval/{model}/{split}.json",
    log:
        "logs/evaluate/{model}_{split}.log",
    benchmark:
        "logs/benchmarks/evaluate/{model}_{split}.tsv"
    conda:
        "../envs/train.yaml"
    threads: EVAL_RES["cpus"]
    resources:
        gpu=EVAL_GPUS,
        mem_mb=EVAL_RES["mem_mb"],
        runtime=EVAL_RES["runtime_min"],
    params:
        # a run's RL model is evaluated under its run's effective config (its experiment's agent settings),
        # the base model and eval.models under the config (common.smk: eval_params)
        **EVAL_PARAMS,
    message:
        EVAL_MESSAGE
    script:
        "../scripts/evaluate.py"


# eval.models given as an HF repo: one download rule per model, declaring only that model's entry (a new
# revision of one model re-downloads and re-evaluates that model alone).
for _name, _spec in EVAL_MODELS.items():
    if "repo" not in _spec:
        continue

    rule:
        name:
            f"download_model_{_name}"
        output:
            directory(f"{DATA}/models/eval/{_name}"),
        log:
            f"logs/download_model/{_name}.log",
        benchmark:
            f"logs/benchmarks/download_model/{_name}.tsv"
        # Light: runs where Snakemake runs (on SLURM, the login node, which has internet access).
        localrule: True
        conda:
            "../envs/retriever.yaml"
        threads: RES["download"]["cpus"]
        resources:
            **job_resources("download"),
        params:
            **settings("data_dir", f"eval.models.{_name}"),
        script:
            "../scripts/download_model.py"
