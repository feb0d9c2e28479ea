"""A stand-in for slime's ``train.py`` in the two-node test (tests/test_cluster.py): submitted by the project's
real ``ray job submit`` with every recipe flag, it does what slime does that the cluster design is about.

- It waits for slime's GPU placement group: one ``{"GPU": 1, "CPU": 1}`` bundle per training GPU
  (``--actor-num-nodes`` x ``--actor-num-gpus-per-node``), as slime/ray/placement_group.py asks.
- It creates an actor with the options slime gives its RolloutManager (``num_cpus=1, num_gpus=0``, no
  scheduling strategy: Ray may put it on any node) and one pinned to the worker node
  (``NodeAffinitySchedulingStrategy``); each calls the search URL of ``--custom-config-path`` through the
  project's slime plugin client (``searchr1.slime_plugin.retriever_for``), as slime's generate calls it.
- Like slime's ``--save-hf``, each node writes its own safetensors shard of ``iter_<last rollout>/`` and the
  head the config and the index.

What each actor saw goes to ``<--save>/standin.json`` for the test to check.
"""

import argparse
import asyncio
import json
import os
import socket
import types

import ray
import yaml
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


@ray.remote
class SearchCaller:
    def call(self, custom: dict, query: str) -> dict:
        from searchr1.slime_plugin import retriever_for

        async def search():
            client = retriever_for(types.SimpleNamespace(**custom))
            try:
                return await client.search([query], int(custom["search_topk"]))
            finally:
                await client.aclose()

        return {
            "hostname": socket.gethostname(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "hits": asyncio.run(search())[0],
        }

    def write_shard(self, path: str) -> str:
        with open(path, "wb") as fh:
            fh.write(socket.gethostname().encode())
        return socket.gethostname()


def main() -> None:
    ap = argparse.ArgumentParser()
    for name in ("--custom-config-path", "--save", "--save-hf"):
        ap.add_argument(name, required=True)
    for name in ("--actor-num-nodes", "--actor-num-gpus-per-node", "--num-rollout"):
        ap.add_argument(name, type=int, required=True)
    args, _ = ap.parse_known_args()
    ray.init()
    custom = yaml.safe_load(open(args.custom_config_path, encoding="utf-8"))

    bundles = [{"GPU": 1, "CPU": 1}] * (args.actor_num_nodes * args.actor_num_gpus_per_node)
    pg = placement_group(bundles, strategy="PACK")
    ray.get(pg.ready(), timeout=120)

    head_id = ray.get_runtime_context().get_node_id()  # a Ray job's driver runs on the head
    worker_ids = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != head_id]
    rollout_manager = SearchCaller.options(num_cpus=1, num_gpus=0).remote()  # slime's RolloutManager options
    pinned = SearchCaller.options(
        num_cpus=0, num_gpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(worker_ids[0], soft=False)
    ).remote()
    results = {
        "head_node_id": head_id,
        "worker_node_ids": worker_ids,
        "rollout_manager": ray.get(rollout_manager.call.remote(custom, "capital of France")),
        "pinned_to_worker": ray.get(pinned.call.remote(custom, "river in Africa")),
    }

    out = args.save_hf.replace("{rollout_id}", str(args.num_rollout - 1))
    os.makedirs(out, exist_ok=True)
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as fh:
        json.dump({"architectures": ["Qwen2ForCausalLM"]}, fh)
    with open(os.path.join(out, "model.safetensors.index.json"), "w", encoding="utf-8") as fh:
        json.dump({"weight_map": {"a.weight": shards[0], "b.weight": shards[1]}}, fh)
    results["shard_writers"] = [
        ray.get(rollout_manager.write_shard.remote(os.path.join(out, shards[0]))),
        ray.get(pinned.write_shard.remote(os.path.join(out, shards[1]))),
    ]
    os.makedirs(args.save, exist_ok=True)
    with open(os.path.join(args.save, "standin.json"), "w", encoding="utf-8") as fh:
        json.dump(results, fh)
    print("stand-in train.py done:", json.dumps(results))


if __name__ == "__main__":
    main()
