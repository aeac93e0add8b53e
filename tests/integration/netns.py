"""Hosts as Linux network namespaces on one bridge, for tests that need several machines' addresses.

Each host is a namespace with one veth interface on a bridge in the root namespace; the bridge has
the subnet's .254 so the test process reaches every host. Namespaces share /dev/shm, so a test that
means "another host" forces the ZMQ transport between them. ``HostNetwork.close`` deletes what
``create`` made, also after a partial start; it needs root and iproute2 (deploy/setup.sh --test).
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _free_subnet() -> str:
    """A 10.77.N.0/24 no interface of this machine uses (several test runs may share the machine)."""
    used = _ip("-4", "-o", "addr", "show").stdout
    for n in range(1, 255):
        prefix = f"10.77.{n}."
        if f" {prefix}" not in used:
            return prefix
    raise RuntimeError("no free 10.77.N.0/24 subnet for test hosts")


@dataclass
class HostNetwork:
    tag: str  # prefix of every namespace and link this network creates
    prefix: str = ""  # "10.77.N."
    addresses: dict[str, str] = field(default_factory=dict)  # host name -> address
    namespaces: dict[str, str] = field(default_factory=dict)  # host name -> namespace
    bridge: str = ""
    links: list[str] = field(default_factory=list)  # the bridge and the root side of each veth pair

    @classmethod
    def create(cls, hosts: list[str]) -> HostNetwork:
        net = cls(tag=f"pd{os.getpid() % 100000}")
        try:
            net._build(hosts)
        except BaseException:
            net.close()
            raise
        return net

    def _build(self, hosts: list[str]) -> None:
        self.prefix = _free_subnet()
        self.bridge = f"{self.tag}br"
        _ip("link", "add", self.bridge, "type", "bridge")
        self.links.append(self.bridge)
        _ip("addr", "add", f"{self.prefix}254/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, host in enumerate(hosts):
            ns, veth = f"{self.tag}-{host}", f"{self.tag}v{i}"
            _ip("netns", "add", ns)
            self.namespaces[host] = ns
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            self.links.append(veth)
            _ip("link", "set", veth, "master", self.bridge, "up")
            address = f"{self.prefix}{i + 1}"
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            self.addresses[host] = address

    def exec_argv(self, host: str, argv: list[str]) -> list[str]:
        """argv run inside the host's namespace (`ip netns exec` execs it: the pid stays the same)."""
        return ["ip", "netns", "exec", self.namespaces[host], *argv]

    def close(self, timeout_s: float = 10.0) -> None:
        for ns in self.namespaces.values():  # deleting a namespace deletes its veth pair
            _ip("netns", "delete", ns, check=False)
        # A deleted namespace lives on while sockets in it still close (a TCP connection cut by a
        # partition retransmits its FIN for minutes), and with it its veth pair: deleting the root side
        # takes the pair down at once.
        for link in self.links:
            _ip("link", "delete", link, check=False)
        # The kernel frees a namespace's interfaces once its last process is gone, not at once.
        deadline = time.monotonic() + timeout_s
        while self.leftovers() and time.monotonic() < deadline:
            time.sleep(0.2)

    def leftovers(self) -> list[str]:
        """The namespaces and links this network made that still exist."""
        ours = {*self.namespaces.values(), *self.links}
        namespaces = {line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()}
        links = {line.split(":")[1].strip().split("@")[0]
                 for line in _ip("-o", "link", "show").stdout.splitlines()}
        return sorted(ours & (namespaces | links))
