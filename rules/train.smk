# GRPO training: slime (Megatron + SGLang, GPUs, in the slime container) at full scale, or the one-process
# torch backend (same objective) in the toy world. Checkpoints live under <work_dir>/train/, which is not
# a declared output: Snakemake never deletes it when a job fails, so rerunning resumes from the last one.
# Only the newest train.keep_checkpoints and the HF exports every train.save_hf_interval are kept.

if IMAGE:

    rule container_image:
        """The slime image, pulled (apptainer: converted to a .sif) once, resumably, with progress in the log:
        no later step pays the conversion inside a start-up timeout (searchr1.container).
        """
        output:
            IMAGE,
        log:
            "logs/container_image.log",
        benchmark:
            "logs/benchmarks/container_image.tsv"
        # apptainer: light on CPU but needs the registry, so it runs where Snakemake runs (on SLURM, the login
        # node) and writes the .sif to the shared work dir. docker: a job on a compute node, where docker runs
        # and the image is used; it records the digest every other node pulls (searchr1.container).
        localrule: SLIME["container_runtime"] == "apptainer"
        conda:
            "../envs/retriever.yaml"
        threads: RES["download"]["cpus"]
        resources:
            **job_resources("download"),
        params:
            **settings(
                "train.slime.image",
                "train.slime.container_runtime",
                "budget",  # the free-disk check (operational)
            ),
        message:
            f"pull the slime image {SLIME['image']} ({SLIME['container_runtime']}) to {IMAGE}, "
            f"about {config['budget']['image_gb']} GB"
        script:
            "../scripts/container_image.py"


rule train:
    input:
        unpack(lambda wc: RETRIEVER_INPUTS),
        **(IMAGE_INPUT if TRAIN_BACKEND == "slime" else {}),
        train="results/data/train.parquet",
        splits=expand("results/data/{split}.parquet", split=SPLITS),
        base=BASE_MODEL_DIR,
        retriever_check="results/retriever/check.json",
    output:
        **({"curve": f"{RUN_TRAIN_DIR}/eval_curve.jsonl"} if CURVE else {}),
        metrics=f"{RUN_TRAIN_DIR}/metrics.jsonl",
        final=f"{RUN_TRAIN_DIR}/final.json",
    log:
        f"logs/train{RUN_LOG}.log",
    benchmark:
        f"logs/benchmarks/train{RUN_LOG}.tsv"
    conda:
        "../envs/train.yaml"
    threads: TRAIN_RES["cpus"]
    resources:
        **TRAIN_GPU_RESOURCES,
        nodes=TRAIN_NODES,
        mem_mb=TRAIN_RES["mem_mb"],
        runtime=TRAIN_RES["runtime_min"],
    params:
        # the run's recipe (with its experiment's overrides and seed), the agent, the retriever it starts, the
        # learning curve (common.smk: TRAIN_KEYS, TRAIN_PARAMS)
        **TRAIN_PARAMS,
    message:
        TRAIN_MESSAGE
    script:
        "../scripts/train.py"


rule export_rl:
    """The final policy as an HF checkpoint (slime's --save-hf output, or the torch backend's export)."""
    input:
        final=f"{RUN_TRAIN_DIR}/final.json",
    output:
        directory(RUN_MODEL_DIR),
    log:
        f"logs/export_rl{RUN_LOG}.log",
    benchmark:
        f"logs/benchmarks/export_rl{RUN_LOG}.tsv"
    conda:
        "../envs/train.yaml"
    threads: RES["export_rl"]["cpus"]
    resources:
        **job_resources("export_rl"),
    script:
        "../scripts/export_rl.py"
