# The retriever's artifacts: corpus (+ offsets), encoder, and the dense index (downloaded or built).
# The server itself is started, health-checked and stopped by the jobs that need it (train, evaluate, toy warm
# start; searchr1/retrieval/managed.py), not run as a Snakemake service() job: Snakemake starts a service's
# consumers without waiting for it to be ready, and under the SLURM executor a group's jobs run one after the
# other inside the allocation, so a consumer may never run beside its server.

if not TOY:

    rule download_corpus:
        output:
            CORPUS,
        log:
            "logs/download_corpus.log",
        benchmark:
            "logs/benchmarks/download_corpus.tsv"
        # Light: runs where Snakemake runs (on SLURM, the login node, which has internet access).
        localrule: True
        conda:
            "../envs/retriever.yaml"
        threads: RES["download"]["cpus"]
        resources:
            **job_resources("download"),
        params:
            **settings("data_dir", "retriever.corpus"),
        script:
            "../scripts/download_corpus.py"


rule corpus_offsets:
    input:
        CORPUS,
    output:
        OFFSETS,
    log:
        "logs/corpus_offsets.log",
    benchmark:
        "logs/benchmarks/corpus_offsets.tsv"
    conda:
        "../envs/retriever.yaml"
    threads: RES["corpus_offsets"]["cpus"]
    resources:
        **job_resources("corpus_offsets"),
    script:
        "../scripts/corpus_offsets.py"


rule fetch_encoder:
    output:
        directory(ENCODER_DIR),
    log:
        "logs/fetch_encoder.log",
    benchmark:
        "logs/benchmarks/fetch_encoder.tsv"
    # Light: runs where Snakemake runs (on SLURM, the login node, which has internet access).
    localrule: True
    conda:
        "../envs/retriever.yaml"
    threads: RES["download"]["cpus"]
    resources:
        **job_resources("download"),
    params:
        **settings("retriever.encoder.repo", "retriever.encoder.revision"),
    script:
        "../scripts/fetch_encoder.py"


if config["retriever"]["index"]["source"] == "download":

    rule download_index:
        input:
            corpus=CORPUS,
            offsets=OFFSETS,
            encoder=ENCODER_DIR,
        output:
            index=INDEX,
            meta=INDEX_META,
        log:
            "logs/download_index.log",
        benchmark:
            "logs/benchmarks/download_index.tsv"
        # Light: runs where Snakemake runs (on SLURM, the login node, which has internet access).
        localrule: True
        conda:
            "../envs/retriever.yaml"
        threads: RES["download"]["cpus"]
        resources:
            **job_resources("download"),
        params:
            **settings(
                "data_dir",
                "retriever.index.repo",
                "retriever.index.revision",
                "retriever.index.parts",
                "retriever.encoder.repo",
                "retriever.encoder.query_prefix",
                "retriever.encoder.passage_prefix",
                "budget",  # the free-disk check (operational)
            ),
        script:
            "../scripts/download_index.py"

else:

    rule build_index:
        input:
            corpus=CORPUS,
            offsets=OFFSETS,
            encoder=ENCODER_DIR,
        output:
            index=INDEX,
            meta=INDEX_META,
        log:
            "logs/build_index.log",
        benchmark:
            "logs/benchmarks/build_index.tsv"
        conda:
            "../envs/retriever.yaml"
        threads: RES["index_build"]["cpus"]
        resources:
            **job_resources("index_build"),
            gpu=RES["index_build"]["gpus"],
        params:
            **settings(
                "retriever.index.build_batch_size",
                "retriever.index.build_shard_size",
                *ENCODER_SETTINGS,
                "budget",  # the free-disk check (operational)
            ),
        script:
            "../scripts/build_index.py"


rule retriever_check:
    """Start the real server on the pair, check /health and that known passages come back, stop it."""
    input:
        **RETRIEVER_INPUTS,
    output:
        "results/retriever/check.json",
    log:
        "logs/retriever_check.log",
    benchmark:
        "logs/benchmarks/retriever_check.tsv"
    conda:
        "../envs/retriever.yaml"
    threads: RES["retriever_check"]["cpus"]
    resources:
        **job_resources("retriever_check"),
        gpu=CHECK_GPUS,
    params:
        **settings(
            "seed",
            "retriever.topk",
            *RETRIEVER_SETTINGS,
            *CLIENT_SETTINGS,
            *RETRIEVER_ONLY_SETTINGS,
        ),
    script:
        "../scripts/retriever_check.py"


# The benchmark lives beside the package (benchmarks/retriever/, not installed): the checkout's root goes on
# PYTHONPATH (params.checkout: a path, not a setting), so the rule runs from any --directory.
rule bench_retriever:
    """Benchmark: batched server vs per-request baseline at 1/32/256 concurrent clients (not part of `all`)."""
    output:
        "results/bench/retriever.json",
    log:
        "logs/bench_retriever.log",
    benchmark:
        "logs/benchmarks/bench_retriever.tsv"
    conda:
        "../envs/retriever.yaml"
    threads: RES["bench_retriever"]["cpus"]
    resources:
        **job_resources("bench_retriever"),
    params:
        checkout=workflow.basedir,
    shell:
        "PYTHONPATH={params.checkout:q}${{PYTHONPATH:+:$PYTHONPATH}} "
        "python -m benchmarks.retriever.cpu --out {output} > {log} 2>&1"
