# The headline table (one row per evaluated model), plots and the examples of two models (eval.compare).
# With eval.interval, the learning curve (EM on eval.curve_subset questions every eval.interval rollouts) is an
# input and results/plots/em_curve.png an output, with every input's provenance.


rule report:
    input:
        # every run's files, in the order of searchr1.experiments.runs (experiments, then seeds)
        **(
            {
                "curve": [
                    run_files(r, f"{RUN_TRAIN_DIR}/eval_curve.jsonl") for r in RUNS
                ]
            }
            if CURVE
            else {}
        ),
        evals=expand("results/eval/{model}/{split}.json", model=MODELS, split=SPLITS),
        jsonls=expand("results/eval/{model}/{split}.jsonl", model=MODELS, split=SPLITS),
        metrics=[run_files(r, f"{RUN_TRAIN_DIR}/metrics.jsonl") for r in RUNS],
        final=[run_files(r, f"{RUN_TRAIN_DIR}/final.json") for r in RUNS],
    output:
        **(
            {
                "em_curve": report(
                    "results/plots/em_curve.png",
                    caption="../docs/report/em_curve.rst",
                    category="Training",
                )
            }
            if CURVE
            else {}
        ),
        headline=report(
            "results/headline.md",
            caption="../docs/report/headline.rst",
            category="Headline",
        ),
        examples=report(
            "results/examples.md",
            caption="../docs/report/examples.rst",
            category="Examples",
        ),
        reward=report(
            "results/plots/reward.png",
            caption="../docs/report/reward.rst",
            category="Training",
        ),
        length=report(
            "results/plots/response_length.png",
            caption="../docs/report/response_length.rst",
            category="Training",
        ),
        provenance="results/provenance.json",
    log:
        "logs/report.log",
    benchmark:
        "logs/benchmarks/report.tsv"
    # Light: runs where Snakemake runs, not as a cluster job.
    localrule: True
    conda:
        "../envs/report.yaml"
    threads: RES["report"]["cpus"]
    resources:
        **job_resources("report"),
    params:
        **settings(
            "scale",
            "seed",  # train.seeds null = [seed]
            "experiments",
            "train.seeds",
            "published",
            "eval.splits",
            "eval.models",
            "eval.compare",
            "eval.interval",
        ),
    script:
        "../scripts/report.py"
