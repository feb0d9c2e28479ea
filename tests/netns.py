"""Two "nodes" on one Linux machine for the cluster tests: network namespaces on a bridge, each with its own
address and (through ``node_prefix``) its own hostname.

Layout: a switch namespace holding a bridge, and one namespace per node joined to it by a veth pair, all on
a private /24. The host's own interfaces, routes and /etc/hosts are left alone; deleting the namespaces
removes everything. The filesystem is the machine's, less /tmp (each node gets its own, as real nodes have):
it plays the cluster's shared filesystem, so shared work directories must not be under /tmp.

``node_prefix(host)`` is what replaces ``srun --nodes=1 --ntasks=1 -w <host>`` in the launch plan: enter
the node's namespace and, in a UTS namespace of its own, take its hostname. Every step of it ``exec``s the
next, so the process that the launcher started (and signals) is the command itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


def available() -> str | None:
    """None when the namespaces can be made here, else why not (for a skip message)."""
    if os.geteuid() != 0:
        return "needs root (ip netns, veth and bridge devices)"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"needs the {tool!r} command"
    probe = f"sr1probe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()}")


@dataclass
class TwoNodes:
    """Node ``head`` and node ``worker``: hostnames, addresses, namespaces."""

    tag: str
    hosts: dict[str, str] = field(default_factory=dict)  # hostname -> address
    namespaces: dict[str, str] = field(default_factory=dict)  # hostname -> netns
    links: dict[str, str] = field(default_factory=dict)  # hostname -> its interface (in its namespace)
    host_ip: str | None = None  # this machine's own address on the bridge (``two_nodes(host_link=True)``)

    def node_prefix(self, host: str, private_tmp: bool = True, host_sys: bool = False) -> list[str]:
        return enter_node(self.namespaces[host], host, private_tmp, host_sys)

    def link_down(self, host: str) -> None:
        """Cut the node off the network (its interface down): a node that cannot join."""
        _ip("link", "set", self.links[host], "down", ns=self.namespaces[host])


def enter_node(netns: str, hostname: str, private_tmp: bool = True, host_sys: bool = False) -> list[str]:
    """The prefix that runs a command "on" a node: its network namespace, its hostname and (``private_tmp``) a
    /tmp of its own, as every real node has: Ray keeps its unix sockets under /tmp, and a socket is reachable
    across network namespaces, so a shared /tmp would let a process on one "node" talk to the other's raylet.

    ``host_sys``: keep the machine's /sys (``nsenter --net``) instead of ``ip netns exec``'s sysfs of the
    namespace, which hides the cgroup mounts under /sys/fs/cgroup that slurmd needs to start."""
    setup = 'hostname "$1" && ' + ("mount -t tmpfs tmpfs /tmp && " if private_tmp else "") + 'shift && exec "$@"'
    enter = ["nsenter", f"--net=/run/netns/{netns}"] if host_sys else ["ip", "netns", "exec", netns]
    return [*enter, "unshare", "--uts", *(["--mount"] if private_tmp else []), "--", "sh", "-c",
            setup, "sh", hostname]  # fmt: skip


@contextmanager
def two_nodes(names: tuple[str, str] = ("sr1-head", "sr1-worker"), host_link: bool = False) -> Iterator[TwoNodes]:
    """Make the two namespaces on a bridge; remove them on the way out.

    ``host_link``: also join this machine's own (root) namespace to the bridge, at ``<subnet>.254``
    (``TwoNodes.host_ip``), for a daemon that serves both nodes from outside them (the two-node SLURM test's
    slurmctld). That adds one interface and its /24 route to the host; both go with the switch namespace."""
    tag = f"{os.getpid() % 100000}"
    subnet = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
    switch = f"sr1s{tag}"
    nodes = TwoNodes(tag=tag)
    made: list[str] = []
    try:
        _ip("netns", "add", switch)
        made.append(switch)
        _ip("link", "add", "br0", "type", "bridge", ns=switch)
        _ip("link", "set", "br0", "up", ns=switch)
        for i, host in enumerate(names, start=1):
            ns = f"sr1n{i}{tag}"
            _ip("netns", "add", ns)
            made.append(ns)
            outside = f"sr1v{i}{tag}"
            _ip("link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", outside, "netns", switch)
            _ip("link", "set", outside, "master", "br0", ns=switch)
            _ip("link", "set", outside, "up", ns=switch)
            _ip("addr", "add", f"{subnet}.{i}/24", "dev", "eth0", ns=ns)
            _ip("link", "set", "eth0", "up", ns=ns)
            _ip("link", "set", "lo", "up", ns=ns)
            nodes.hosts[host] = f"{subnet}.{i}"
            nodes.namespaces[host] = ns
            nodes.links[host] = "eth0"
        if host_link:
            outside, inside = f"sr1h{tag}", f"sr1hb{tag}"
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside, "netns", switch)
            _ip("link", "set", inside, "master", "br0", ns=switch)
            _ip("link", "set", inside, "up", ns=switch)
            _ip("addr", "add", f"{subnet}.254/24", "dev", outside)
            _ip("link", "set", outside, "up")
            nodes.host_ip = f"{subnet}.254"
        yield nodes
    finally:
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
