"""A real two-node SLURM cluster on one Linux machine, for tests/test_slurm_cluster.py: ``slurmctld`` in this
machine's own network namespace and one ``slurmd`` per node namespace of tests/netns.py (each with the node's
hostname, address and, for the worker, its own /tmp), plus a ``munged`` of its own.

Everything is private to one cluster: a state directory (configs, spool, logs, pid files, the munge socket)
under /var/tmp (not /tmp: the worker node has its own), a free slurmctld port, a ``munged`` on its own socket
(``AuthInfo=socket=...``, so a system munged, or another test's, is neither needed nor touched) and
``SLURM_CONF`` instead of /etc/slurm/slurm.conf. The daemons run in the foreground as children of the test;
on the way out every job is cancelled, every process left in a node's namespace is killed (they are all this
cluster's: the namespaces are) and the daemons are stopped.

GPUs: there are none. Each node declares ``gpus_per_node`` ``gpu`` GRES whose device files are character
devices of our own with /dev/null's numbers (gres.conf ``Name=gpu File=<state>/dev/gpu0``): slurmd 22.05
drops a GPU declared with a count and no file, and then refuses the node. So the launch's
``srun ... --gres=gpu:N`` step prefix runs as written, and each step gets CUDA_VISIBLE_DEVICES=0 as on a GPU
node; nothing opens the device (no cgroup device fencing: task/none).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import netns

COMMANDS = ("slurmctld", "slurmd", "srun", "sbatch", "squeue", "scontrol", "sinfo", "scancel", "munged", "nsenter")
MUNGE_KEY = Path("/etc/munge/munge.key")
PARTITION = "two"


def available() -> str | None:
    """None when the cluster can be started here, else why not (for a skip message)."""
    if os.geteuid() != 0:
        return "needs root (slurmd, munged, network namespaces)"
    missing = [c for c in COMMANDS if shutil.which(c) is None]
    if missing:
        return (
            f"needs SLURM and munge installed ({', '.join(missing)} missing: tests/slurm/setup_local_slurm.sh install)"
        )
    if not MUNGE_KEY.is_file():
        return f"needs a munge key ({MUNGE_KEY}: tests/slurm/setup_local_slurm.sh install)"
    return netns.available()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


@dataclass
class SlurmCluster:
    state: Path
    conf: Path
    nodes: netns.TwoNodes
    head: str
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """The environment SLURM's clients need (and that sbatch passes on to the job's steps)."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *command: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout)

    def log(self, name: str) -> str:
        path = self.state / "log" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs_tail(self, lines: int = 30) -> str:
        return "\n".join(
            f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:])
            for p in sorted((self.state / "log").glob("*"))
        )

    def namespace_pids(self, host: str) -> list[int]:
        """Every process in the node's network namespace (slurmd and whatever its jobs left)."""
        out = subprocess.run(["ip", "netns", "pids", self.nodes.namespaces[host]], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def leftovers(self, host: str) -> list[str]:
        """The command lines of the node's processes other than its slurmd."""
        slurmd = self.procs[f"slurmd-{host}"].pid
        found = []
        for pid in self.namespace_pids(host):
            if pid == slurmd:
                continue
            try:
                found.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip())
            except OSError:
                pass  # ended meanwhile
        return found

    def wait_for_job(self, job_id: str, timeout_s: float) -> str:
        """The job's final state (COMPLETED, FAILED, ...); a job still running after ``timeout_s`` is cancelled
        (its steps get SIGTERM, as at a time limit) and reported as ``TIMEOUT (test)``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            shown = self.run("scontrol", "show", "job", "-o", job_id).stdout
            state = re.search(r"JobState=(\S+)", shown)
            if state and state.group(1) not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
                return state.group(1)
            time.sleep(1)
        self.run("scancel", job_id)
        end = time.monotonic() + 60
        while time.monotonic() < end and "JobState=COMPLETING" in self.run("scontrol", "show", "job", job_id).stdout:
            time.sleep(1)
        return "TIMEOUT (test)"

    def settled_leftovers(self, host: str, timeout_s: float) -> list[str]:
        """``leftovers(host)`` once it is empty, or as it is after ``timeout_s`` (a finished job's slurmstepd
        takes a moment to go)."""
        deadline = time.monotonic() + timeout_s
        while (found := self.leftovers(host)) and time.monotonic() < deadline:
            time.sleep(0.5)
        return found


def write_config(state: Path, nodes: netns.TwoNodes, ctld_port: int, mem_mb: int, gpus_per_node: int) -> Path:
    hw = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    layout = " ".join(w for w in hw.split()[1:] if not w.startswith("RealMemory="))  # the real CPUs, sockets...
    gres = f" Gres=gpu:{gpus_per_node}" if gpus_per_node else ""
    node_lines = "\n".join(
        f"NodeName={host} NodeAddr={ip} {layout} RealMemory={mem_mb}{gres} State=UNKNOWN"
        for host, ip in nodes.hosts.items()
    )
    conf = state / "etc" / "slurm.conf"
    conf.write_text(f"""# Written by tests/slurm_nodes.py: two nodes, each a network namespace of this machine.
ClusterName=sr1two
SlurmctldHost={socket.gethostname()}({nodes.host_ip})
SlurmctldPort={ctld_port}
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={state / "munge" / "munge.socket"}
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
{"GresTypes=gpu" if gpus_per_node else ""}
ReturnToService=2
MinJobAge=300
SlurmctldTimeout=60
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
Waittime=0
FirstJobId={1000 + os.getpid() % 100000}
StateSaveLocation={state / "ctld"}
SlurmdSpoolDir={state / "spool" / "%n"}
SlurmctldPidFile={state / "run" / "slurmctld.pid"}
SlurmdPidFile={state / "run" / "slurmd-%n.pid"}
SlurmctldLogFile={state / "log" / "slurmctld.log"}
SlurmdLogFile={state / "log" / "slurmd-%n.log"}
SlurmctldDebug=info
SlurmdDebug=info
{node_lines}
PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    if gpus_per_node:
        # slurmd 22.05 drops a GPU without a device file ("Removing file-less GPU gpu:(null) from final GRES
        # list", then the node is INVAL: "gres/gpu count reported lower than configured (0 < 1)"). So each GPU
        # is a device node of our own: /dev/null's character device (1, 3) under the name gpu<i>, from which
        # SLURM takes the index it puts in the step's CUDA_VISIBLE_DEVICES. Nothing opens it.
        (state / "dev").mkdir(exist_ok=True)
        lines = []
        for i in range(gpus_per_node):
            device = state / "dev" / f"gpu{i}"
            os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
            lines.append(f"Name=gpu File={device}\n")
        (state / "etc" / "gres.conf").write_text("".join(lines))
    return conf


def _stop(proc: subprocess.Popen, grace_s: float = 15) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait(what: str, check, timeout_s: float, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        dead = [name for name, p in cluster.procs.items() if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            why = f"{', '.join(dead)} exited" if dead else f"not within {timeout_s:.0f} s"
            raise RuntimeError(f"{what}: {why}\n{cluster.logs_tail()}")
        time.sleep(0.5)


@contextmanager
def two_node_slurm(
    names: tuple[str, str] = ("sr1-head", "sr1-worker"), *, mem_mb: int, gpus_per_node: int
) -> Iterator[SlurmCluster]:
    """Start munged, slurmctld and one slurmd per node; yield when both nodes are idle; stop all on the way out.

    ``mem_mb``: the RealMemory each node declares (at most the machine's, which slurmd checks)."""
    head = names[0]
    state = Path("/var/tmp") / f"searchr1-slurm2n-{os.getpid()}-{time.monotonic_ns()}"
    with ExitStack() as stack:
        # a SIGTERM (`timeout pytest ...`) unwinds through the cleanup below instead of leaving the daemons running
        previous = signal.signal(signal.SIGTERM, _raise_exit)
        stack.callback(signal.signal, signal.SIGTERM, previous)
        stack.callback(shutil.rmtree, state, ignore_errors=True)
        for sub in ("etc", "run", "log", "ctld", "munge", *(f"spool/{n}" for n in names)):
            (state / sub).mkdir(parents=True)
        nodes = stack.enter_context(netns.two_nodes(names, host_link=True))
        conf = write_config(state, nodes, free_port(), mem_mb, gpus_per_node)
        cluster = SlurmCluster(state=state, conf=conf, nodes=nodes, head=head)
        stack.callback(_shutdown, cluster)
        munge = state / "munge"
        shutil.chown(munge, "munge", "munge")
        cluster.procs["munged"] = subprocess.Popen(
            [
                "munged",
                "--foreground",
                f"--socket={munge / 'munge.socket'}",
                f"--pid-file={munge / 'munged.pid'}",
                f"--log-file={state / 'log' / 'munged.log'}",
                f"--seed-file={munge / 'munged.seed'}",
            ],  # fmt: skip
            user="munge",
            group="munge",
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        _wait("munged", (munge / "munge.socket").exists, 20, cluster)
        cluster.procs["slurmctld"] = subprocess.Popen(
            ["slurmctld", "-D", "-f", str(conf)], env=cluster.env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        _wait("slurmctld", lambda: "UP" in cluster.run("scontrol", "ping").stdout, 60, cluster)
        for host in names:
            # the node's namespace and hostname; the worker gets its own /tmp, the head keeps the machine's
            # (and the machine's /sys: slurmd's cgroup plugin, loaded even with proctrack/linuxproc, fails its start
            # with "No filesystem mounted on /sys/fs/cgroup" under `ip netns exec`'s sysfs of the namespace)
            prefix = nodes.node_prefix(host, private_tmp=host != head, host_sys=True)
            cluster.procs[f"slurmd-{host}"] = subprocess.Popen(
                [*prefix, "slurmd", "-D", "-f", str(conf), "-N", host],
                env=cluster.env,  # gres.conf is found beside $SLURM_CONF (`-f` alone reads /etc/slurm's)
                stdout=stack.enter_context(open(state / "log" / f"slurmd-{host}.out", "w")),
                stderr=subprocess.STDOUT,
            )

        def idle() -> bool:
            states = cluster.run("sinfo", "-h", "-N", "-o", "%N %t").stdout.split()
            return states.count("idle") == len(names)

        _wait("both slurmd registered and idle", idle, 90, cluster)
        yield cluster


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(f"signal {signum}")


def _shutdown(cluster: SlurmCluster) -> None:
    """Cancel every job, kill what is left in the nodes' namespaces, stop the daemons (newest first)."""
    if cluster.procs.get("slurmctld") and cluster.procs["slurmctld"].poll() is None:
        cluster.run("scancel", "--full", f"--partition={PARTITION}")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and cluster.run("squeue", "-h").stdout.strip():
            time.sleep(1)
    slurmds = {p.pid for name, p in cluster.procs.items() if name.startswith("slurmd-")}
    for host in cluster.nodes.namespaces:
        for pid in cluster.namespace_pids(host):
            if pid not in slurmds:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    for name in reversed(list(cluster.procs)):
        _stop(cluster.procs[name])
