"""Network namespaces for the multi-host tests (test_cluster.py): a small
private Ethernet segment on this machine, built and removed by the test.

``Segment`` makes one namespace for the client holding a bridge, and one
namespace per server, each joined to that bridge by a veth pair; every
namespace has ``lo`` up, one address in 192.0.2.0/24 (TEST-NET-1: no other
address is used) and a default route through its link, so that datagrams to
255.255.255.255 go out on the segment and reach every other namespace.
Nothing is created in the root namespace: deleting the namespaces removes
the bridge and every veth with them.

``Subnets`` makes three subnets joined by a router, for discovery beyond
one broadcast domain (test_discovery_subnets.py): a multi-homed server on
the first two, a client namespace on the second, a router between the
second and the third, and a client namespace on the third (addresses in
192.0.2.0/24, 198.51.100.0/24 and 203.0.113.0/24 only: the three
TEST-NETs).

Names start with ``PREFIX`` and the creating process's pid, so a later run
can remove what a killed run left behind (``remove_stale``).
"""

import os
import secrets
import subprocess
from pathlib import Path

from procs import exists

PREFIX = "ppcl-"
CLIENT_ADDR = "192.0.2.100"
BRIDGE = "ppbr0"


def ip(*args, check=True):
    """Run `ip ARGS`; raise RuntimeError with its stderr if it fails."""
    done = subprocess.run(["ip", *map(str, args)], capture_output=True, text=True, timeout=60)
    if check and done.returncode != 0:
        raise RuntimeError("ip %s failed (%d): %s" % (" ".join(map(str, args)), done.returncode,
                                                      done.stderr.strip()))
    return done


def pids(name):
    """Pids of the processes in namespace `name`."""
    out = ip("netns", "pids", name, check=False).stdout.split()
    return [int(p) for p in out if p.isdigit()]


def delete(name):
    """SIGKILL whatever runs in the namespace, then delete it (with its
    links)."""
    for pid in pids(name):
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    ip("netns", "del", name, check=False)


def names():
    """Every network namespace name on the machine."""
    return [line.split()[0] for line in ip("netns", "list", check=False).stdout.splitlines()
            if line.split()]


def remove_stale():
    """Delete namespaces with our prefix whose creating process is gone."""
    for name in names():
        if not name.startswith(PREFIX):
            continue
        try:
            creator = int(name[len(PREFIX):].split("-")[0])
        except ValueError:
            continue
        if not exists(creator):
            delete(name)


def bound(pid, proto, port, state=None):
    """True if `pid`'s network namespace has a `proto` (tcp/udp) socket on
    local port `port` (in TCP state `state`, e.g. "0A" = LISTEN)."""
    try:
        lines = Path("/proc/%d/net/%s" % (pid, proto)).read_text().splitlines()[1:]
    except (FileNotFoundError, ProcessLookupError):
        return False
    for line in lines:
        fields = line.split()
        local, st = fields[1], fields[3]
        if int(local.split(":")[1], 16) == port and (state is None or st == state):
            return True
    return False


def exec_argv(ns, argv):
    """argv run inside namespace `ns` (`ip netns exec` execs it: same pid)."""
    return ["ip", "netns", "exec", ns, *map(str, argv)]


class Segment:
    """A client namespace with a bridge and `nservers` server namespaces
    wired to it. ``client`` is the client's namespace, ``servers`` the
    servers' and ``addrs`` their addresses (192.0.2.1, .2, ...).

    Create it with ``Segment(nservers, cleanup)``: every namespace is handed
    to ``cleanup`` (e.g. pytest's request.addfinalizer) as soon as it exists,
    so a failure half-way through still removes all of them."""

    def __init__(self, nservers, cleanup):
        tag = "%s%d-%s" % (PREFIX, os.getpid(), secrets.token_hex(3))
        self.client = tag + "-c"
        self.servers = ["%s-s%d" % (tag, n) for n in range(1, nservers + 1)]
        self.addrs = ["192.0.2.%d" % n for n in range(1, nservers + 1)]

        self._add(self.client, cleanup)
        ip("-n", self.client, "link", "add", BRIDGE, "type", "bridge")
        self._configure(self.client, BRIDGE, CLIENT_ADDR)
        for n, (ns, addr) in enumerate(zip(self.servers, self.addrs), 1):
            self._add(ns, cleanup)
            port = "ppv%d" % n  # the bridge's end, in the client namespace
            ip("-n", self.client, "link", "add", port, "type", "veth",
               "peer", "name", "eth0", "netns", ns)
            ip("-n", self.client, "link", "set", port, "master", BRIDGE)
            ip("-n", self.client, "link", "set", port, "up")
            self._configure(ns, "eth0", addr)

    @staticmethod
    def _add(name, cleanup):
        ip("netns", "add", name)
        cleanup(lambda: delete(name))

    @staticmethod
    def _configure(ns, dev, addr):
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "addr", "add", addr + "/24", "dev", dev)
        ip("-n", ns, "link", "set", dev, "up")
        # 255.255.255.255 goes where the default route goes.
        ip("-n", ns, "route", "add", "default", "dev", dev)


class Subnets:
    """Three IPv4 subnets and a router, built in namespaces:

    - ``server``: multi-homed, ``eth0`` 192.0.2.1/24 (subnet 1, shared with
      ``host1``, 192.0.2.100: the default route, so 255.255.255.255 leaves
      by it) and ``eth1`` 198.51.100.1/24 (subnet 2); subnet 3 is
      ``unreachable`` until ``route_subnet3()`` routes it through the
      router, so that sends to it fail meanwhile;
    - ``client2``: 198.51.100.2/24 on subnet 2, holding its bridge;
    - ``router``: 198.51.100.254/24 on subnet 2 and 203.0.113.254/24 on
      subnet 3, forwarding between them (never broadcasts);
    - ``client3``: 203.0.113.2/24 on subnet 3, default route via the router.

    Every address has its subnet's directed broadcast (``brd +``). Each
    namespace is handed to ``cleanup`` as soon as it exists."""

    SERVER1, SERVER2, HOST1 = "192.0.2.1", "198.51.100.1", "192.0.2.100"
    BROADCAST1, BROADCAST2 = "192.0.2.255", "198.51.100.255"
    CLIENT2, CLIENT3 = "198.51.100.2", "203.0.113.2"
    ROUTER2, ROUTER3 = "198.51.100.254", "203.0.113.254"
    SUBNET3 = "203.0.113.0/24"

    def __init__(self, cleanup):
        tag = "%s%d-%s" % (PREFIX, os.getpid(), secrets.token_hex(3))
        self.server, self.host1, self.client2, self.router, self.client3 = (
            tag + suffix for suffix in ("-srv", "-h1", "-c2", "-rt", "-c3"))
        for ns in (self.server, self.host1, self.client2, self.router, self.client3):
            Segment._add(ns, cleanup)
            ip("-n", ns, "link", "set", "lo", "up")

        # Subnet 1: the server and one other host, on a veth pair; the
        # server's default route.
        ip("-n", self.server, "link", "add", "eth0", "type", "veth",
           "peer", "name", "eth0", "netns", self.host1)
        self._address(self.server, "eth0", self.SERVER1)
        self._address(self.host1, "eth0", self.HOST1)
        ip("-n", self.server, "route", "add", "default", "dev", "eth0")

        # Subnet 2: a bridge in client2's namespace, the server's eth1 and
        # the router's eth0 joined to it.
        ip("-n", self.client2, "link", "add", BRIDGE, "type", "bridge")
        self._address(self.client2, BRIDGE, self.CLIENT2)
        ip("-n", self.client2, "route", "add", "default", "dev", BRIDGE)
        for n, (ns, dev, addr) in enumerate(((self.server, "eth1", self.SERVER2),
                                             (self.router, "eth0", self.ROUTER2)), 1):
            port = "ppv%d" % n
            ip("-n", self.client2, "link", "add", port, "type", "veth",
               "peer", "name", dev, "netns", ns)
            ip("-n", self.client2, "link", "set", port, "master", BRIDGE)
            ip("-n", self.client2, "link", "set", port, "up")
            self._address(ns, dev, addr)
        ip("-n", self.server, "route", "add", "unreachable", self.SUBNET3)

        # Subnet 3: the router's eth1 and client3, on a veth pair.
        ip("-n", self.router, "link", "add", "eth1", "type", "veth",
           "peer", "name", "eth0", "netns", self.client3)
        self._address(self.router, "eth1", self.ROUTER3)
        self._address(self.client3, "eth0", self.CLIENT3)
        ip("-n", self.client3, "route", "add", "default", "via", self.ROUTER3)
        # /proc/sys/net is the writer's namespace's (no sysctl binary needed).
        done = subprocess.run(exec_argv(self.router, ["sh", "-c",
                                                      "echo 1 > /proc/sys/net/ipv4/ip_forward"]),
                              capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError("cannot turn forwarding on in %s: %s"
                               % (self.router, done.stderr.strip()))

    def route_subnet3(self):
        """Route the server's way to subnet 3 through the router."""
        ip("-n", self.server, "route", "replace", self.SUBNET3, "via", self.ROUTER2)

    @staticmethod
    def _address(ns, dev, addr):
        ip("-n", ns, "addr", "add", addr + "/24", "brd", "+", "dev", dev)
        ip("-n", ns, "link", "set", dev, "up")
