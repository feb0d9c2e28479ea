# Greedy evaluation (1 sample per question) of {base, rl} x {splits}, with the training agent loop and reward.
# Partial results live in <work_dir>/eval/{model}/{split}.partial.jsonl (not a declared output, so a killed
# job keeps them) and the job resumes from them.

EVAL_SGLANG = config["eval"]["engine"] == "sglang"


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
        "benchmarks/evaluate/{model}_{split}.tsv"
    conda:
        "../envs/train.yaml"
    threads: EVAL_RES["cpus"]
    resources:
        gpu=EVAL_GPUS,
        mem_mb=EVAL_RES["mem_mb"],
        runtime=EVAL_RES["runtime_min"],
    params:
        **settings(
            "seed",
            "eval.engine",
            "eval.max_questions",
            "eval.batch_size",
            "work_dir",  # partial results under <work_dir>/eval (operational)
            *EVAL_AGENT_SETTINGS,
            *RETRIEVER_SETTINGS,
            *CLIENT_SETTINGS,
            # the SGLang server: in the slime image, at training's memory share, tensor parallel over its GPUs
            *(
                [
                    "agent.sglang_input",
                    "agent.skip_special_tokens",
                    "eval.resources.gpus",
                    "train.slime.sglang_mem_fraction_static",
                    "train.slime.container_runtime",
                    "train.slime.image",
                ]
                if EVAL_SGLANG
                else []
            ),
        ),
    script:
        "../scripts/evaluate.py"
