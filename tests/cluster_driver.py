"""The head node's side of the two-node tests: the train job's slime path, run on the head node, exactly as
``searchr1.steps.train.train`` runs it.

``python tests/cluster_driver.py <job.pickle>``; the pickle (tests/cluster_common.py ``write_train_job``) holds
the train rule's params (as Snakemake gives them), the job's inputs, its log path and, for tests/test_cluster.py,
the nodes (hostname -> address) and their namespaces. Then the SLURM pieces are replaced: the node list
(``scontrol show hostnames``), name resolution (DNS) and the ``srun -w <node>`` prefix (entering the node's
namespace: tests/netns.py). Without them (tests/test_slurm_cluster.py) the driver runs inside a real SLURM job
and nothing is replaced. Everything else is the project's: the retriever the train job starts,
bound where the job binds it, the launch plan, the join wait, the pre-flight, ``ray job submit``, the worker
watch, the HF export check. Prints one JSON line: the retriever URL and the final export.
"""

import json
import os
import pickle
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from netns import enter_node  # noqa: E402

from searchr1.steps.retrieval import place, retriever  # noqa: E402
from searchr1.steps.settings import StepSettings  # noqa: E402
from searchr1.steps.train import retriever_host, slime_cluster, train_slime  # noqa: E402


def main() -> None:
    job = pickle.loads(Path(sys.argv[1]).read_bytes())
    cfg = StepSettings.from_params(job["params"], step="train")
    launch = {}
    if "namespaces" in job:  # the nodes are namespaces: the SLURM pieces are replaced
        hosts, namespaces = job["hosts"], job["namespaces"]
        os.environ["SLURM_JOB_NODELIST"] = ",".join(hosts)
        resolve = {"expand_hostnames": lambda nodelist: list(hosts), "resolve_ip": hosts.__getitem__}
        launch = {**resolve, "node_prefix": lambda host: enter_node(namespaces[host], host)}
        cluster = slime_cluster(cfg, **resolve)
    else:  # inside a real SLURM job (tests/test_slurm_cluster.py): all of it is the project's
        cluster = slime_cluster(cfg)
    log_path = Path(job["log_path"])
    # "bind_host" reproduces the old binding (127.0.0.1 of the head) for the test that the pre-flight catches it
    host = job.get("bind_host") or retriever_host(cfg, cluster.head_ip)
    gpus = place(cfg, "train")  # the job's GPU ids (CUDA_VISIBLE_DEVICES, else 0..n-1): Ray's head's, the retriever's
    with retriever(cfg, job["inputs"], log_path, host=host, gpus=gpus.retriever) as url:
        final = train_slime(cfg, job["inputs"], url, log_path, head_gpus=gpus.compute, **launch)
    print(json.dumps({"url": url, "final": final}))


if __name__ == "__main__":
    main()
