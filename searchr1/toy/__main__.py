"""`python -m searchr1.toy {world,tokenizer,model,warmstart}`: the toy world's DAG steps, by hand.

Defaults of the sizes are the toy config's (config.yaml + config.toy.yaml, shipped in the package), read through
the same ``from_config`` as the DAG, so this command and the workflow cannot disagree.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from searchr1.toy.model import ToyModelSize, count_parameters, write_model
from searchr1.toy.tokenizer import write_tokenizer
from searchr1.toy.warmstart import WarmStartConfig, http_retriever, local_retriever, stderr_progress, warm_start
from searchr1.toy.world import WorldSizes, load_world, write_world


def cmd_world(args: argparse.Namespace) -> None:
    sizes = WorldSizes(
        n_couples=args.couples,
        n_test_couples=args.test_couples,
        n_rl_couples=args.rl_couples,
        test_per_split=args.test_per_split,
        rl_questions=args.rl_questions,
        two_hop_fraction=args.two_hop_fraction,
    )
    start = time.perf_counter()
    world = write_world(args.seed, args.out_dir, sizes)
    stderr_progress(
        f"world: {len(world.people)} passages, splits "
        f"{ {k: len(v) for k, v in world.splits.items()} } couples, "
        f"{time.perf_counter() - start:.2f}s -> {args.out_dir}"
    )


def cmd_tokenizer(args: argparse.Namespace) -> None:
    tok = write_tokenizer(args.world, args.out_dir)
    stderr_progress(f"tokenizer: {len(tok)} tokens -> {args.out_dir}")


def cmd_model(args: argparse.Namespace) -> None:
    size = ToyModelSize(hidden=args.hidden, layers=args.layers, heads=args.heads, intermediate=args.intermediate)
    model = write_model(args.tokenizer, args.out_dir, size, seed=args.seed)
    stderr_progress(f"model: {count_parameters(model):,} parameters -> {args.out_dir}")


def cmd_warmstart(args: argparse.Namespace) -> None:
    if args.retriever_url:
        ret = toy_config()["retriever"]
        retrieve = http_retriever(args.retriever_url, timeout_s=ret["timeout_s"], max_retries=ret["max_retries"])
    elif args.index and args.encoder:
        corpus = args.corpus or str(Path(args.world) / "corpus.jsonl")
        enc = {**toy_config()["retriever"]["encoder"], "query_prefix": args.query_prefix}
        retrieve = local_retriever(corpus, args.index, args.encoder, encoder_settings=enc)
    else:
        sys.exit(
            "warmstart needs --retriever-url, or --index and --encoder (with --corpus) for an in-process retriever"
        )
    cfg = WarmStartConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        n_demos=args.demos,
        topk=args.topk,
        log_every=args.log_every,
        attn_implementation=args.attn_implementation,
        passage_loss_weight=args.passage_loss_weight,
    )
    result = warm_start(args.model, load_world(args.world), retrieve, args.out_dir, cfg, stderr_progress)
    summary = {k: v for k, v in asdict(result).items() if k not in ("loss_log", "config")}
    stderr_progress("warmstart done: " + json.dumps(summary))


def toy_config() -> dict:
    from searchr1.config import default_config

    return default_config(toy=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m searchr1.toy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    cfg = toy_config()
    d = WorldSizes.from_config(cfg)
    p = sub.add_parser("world", help="write corpus.jsonl, train/test parquet and world.json")
    p.add_argument("--seed", type=int, default=cfg["seed"])
    p.add_argument("--out-dir", required=True)
    p.add_argument("--couples", type=int, default=d.n_couples)
    p.add_argument("--test-couples", type=int, default=d.n_test_couples)
    p.add_argument("--rl-couples", type=int, default=d.n_rl_couples)
    p.add_argument("--test-per-split", type=int, default=d.test_per_split)
    p.add_argument("--rl-questions", type=int, default=d.rl_questions)
    p.add_argument("--two-hop-fraction", type=float, default=d.two_hop_fraction)
    p.set_defaults(func=cmd_world)

    p = sub.add_parser("tokenizer", help="word-level tokenizer over a world")
    p.add_argument("--world", required=True)
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=cmd_tokenizer)

    m = ToyModelSize.from_config(cfg)
    p = sub.add_parser("model", help="a freshly initialised tiny policy")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--hidden", type=int, default=m.hidden)
    p.add_argument("--layers", type=int, default=m.layers)
    p.add_argument("--heads", type=int, default=m.heads)
    p.add_argument("--intermediate", type=int, default=m.intermediate)
    p.add_argument("--seed", type=int, default=cfg["seed"])
    p.set_defaults(func=cmd_model)

    w = WarmStartConfig.from_config(cfg)
    p = sub.add_parser("warmstart", help="supervised warm start on format demos -> the base policy")
    p.add_argument("--model", required=True)
    p.add_argument("--world", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--retriever-url", help="full /retrieve URL of a running retriever")
    p.add_argument("--corpus", help="corpus.jsonl for the in-process retriever (default: WORLD/corpus.jsonl)")
    p.add_argument("--index", help="faiss index for the in-process retriever")
    p.add_argument("--encoder", help="encoder model dir for the in-process retriever")
    p.add_argument(
        "--query-prefix",
        default=cfg["retriever"]["encoder"]["query_prefix"],
        help="encoder query prefix (default: the toy config's; MiniLM: none; e5: 'query: ')",
    )
    p.add_argument("--steps", type=int, default=w.steps)
    p.add_argument("--batch-size", type=int, default=w.batch_size)
    p.add_argument("--lr", type=float, default=w.lr)
    p.add_argument("--demos", type=int, default=w.n_demos)
    p.add_argument("--topk", type=int, default=w.topk)
    p.add_argument("--log-every", type=int, default=w.log_every)
    p.add_argument("--seed", type=int, default=w.seed)
    p.add_argument("--attn-implementation", choices=["sdpa", "eager"], default=w.attn_implementation)
    p.add_argument("--passage-loss-weight", type=float, default=w.passage_loss_weight)
    p.set_defaults(func=cmd_warmstart)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
