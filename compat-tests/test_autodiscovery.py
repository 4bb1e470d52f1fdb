"""Autodiscovery (-a) between two network namespaces, with an unmodified
client that lists its server only as ``"*:PORT"``.

A fixture makes two namespaces joined by a veth pair: the server's has
192.0.2.1/24, the client's 192.0.2.2/24 (TEST-NET-1: no other address is
used), each with ``lo`` up and a default route through its veth so that
datagrams to 255.255.255.255 go out on it. The server runs in one with
``-a``, the client script (clients/discover_jobs.py) in the other.

- Server first: the client's one ``C`` reaches the server, which answers
  with an ``S`` broadcast; the client connects to the sender of that ``S``.
- Client first: its ``C`` goes out before any server exists (a probe in the
  server's namespace receives it, then exits); the server started later is
  found through the ``S`` it announces at start.

Needs root and ``ip netns``; skipped otherwise (CI runs as root). The
namespaces are removed afterwards, also when a test fails, and stale ones
left by a killed run (name prefix, dead creator pid) are removed first.

Runs in every client family: the client's side of discovery is the
family's own (pp 1.7.0's is a rewrite of ppft's), so each family's client
must find the server. The servers' side alone, with three of them:
test_cluster.py, with ppft 1.7.8.
"""

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pphelpers import (
    HERE,
    SECRET,
    STARTUP_TIMEOUT,
    finish_client_script,
    free_port,
    launch,
    server_command,
    server_env,
    stop_server,
)
from procs import exists, wait_until

PREFIX = "pptest-"
SERVER_ADDR = "192.0.2.1"
CLIENT_ADDR = "192.0.2.2"
NJOBS = 12
WORKERS = 2

# Network namespaces: one at a time with test_cluster.py under xdist.
pytestmark = pytest.mark.xdist_group("netns")


def _ip(*args, check=True):
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=60)
    if check and done.returncode != 0:
        raise RuntimeError("ip %s failed (%d): %s" % (" ".join(args), done.returncode,
                                                      done.stderr.strip()))
    return done


def _delete_namespace(name):
    """Kill whatever runs in the namespace, then delete it (and its veth)."""
    pids = _ip("netns", "pids", name, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), 9)
        except (ValueError, ProcessLookupError):
            pass
    _ip("netns", "del", name, check=False)


def _remove_stale():
    """Namespaces with our prefix whose creating test process is gone."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX):
            continue
        try:
            creator = int(name[len(PREFIX):].split("-")[0])
        except ValueError:
            continue
        if not exists(creator):
            _delete_namespace(name)


class Netns:
    """The two namespaces: .server and .client (names), and exec(ns, argv)."""

    def __init__(self, server, client):
        self.server = server
        self.client = client

    @staticmethod
    def exec(ns, argv):
        return ["ip", "netns", "exec", ns, *map(str, argv)]


@pytest.fixture
def netns(request):
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("the ip command (iproute2) is not installed")
    _remove_stale()
    tag = "%d-%s" % (os.getpid(), secrets.token_hex(3))
    ns_server, ns_client = PREFIX + tag + "-s", PREFIX + tag + "-c"
    veth_server, veth_client = "ppv%ss" % tag[-6:], "ppv%sc" % tag[-6:]

    probe = _ip("netns", "add", ns_server, check=False)
    if probe.returncode != 0:
        pytest.skip("ip netns is not available here: %s" % probe.stderr.strip())
    request.addfinalizer(lambda: _delete_namespace(ns_server))
    _ip("netns", "add", ns_client)
    request.addfinalizer(lambda: _delete_namespace(ns_client))

    _ip("link", "add", veth_server, "netns", ns_server, "type", "veth",
        "peer", "name", veth_client, "netns", ns_client)
    for ns, veth, addr in ((ns_server, veth_server, SERVER_ADDR),
                           (ns_client, veth_client, CLIENT_ADDR)):
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "addr", "add", addr + "/24", "dev", veth)
        _ip("-n", ns, "link", "set", veth, "up")
        # 255.255.255.255 goes where the default route goes.
        _ip("-n", ns, "route", "add", "default", "dev", veth)
    return Netns(ns_server, ns_client)


# --- sockets of a process, from its namespace's /proc view --------------------


def _bound(pid, proto, port, state=None):
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


def _start_server(netns, port, tmp_path):
    argv = Netns.exec(netns.server, server_command(
        "-a", "-d", "-p", port, "-s", SECRET, "-w", WORKERS))
    server = launch(argv, tmp_path / "server.log", port=port, nworkers=WORKERS, wait=False)
    listening = wait_until(
        lambda: server.proc.poll() is not None or _bound(server.proc.pid, "tcp", port, "0A"),
        timeout=STARTUP_TIMEOUT)
    assert listening and server.proc.poll() is None, (
        "server in %s not listening\n%s" % (netns.server, server.log_tail()))
    return server


def _start_client(netns, port):
    script = HERE / "clients" / "discover_jobs.py"
    return subprocess.Popen(
        Netns.exec(netns.client, [sys.executable, script, port, SECRET, NJOBS]),
        cwd=str(HERE), env=server_env(), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _check_client(proc, server, port):
    code, out, err = finish_client_script(proc)
    detail = "client exit %s\nstdout:\n%s\nstderr:\n%s\nserver log:\n%s" % (
        code, out, err[-4000:], server.log_tail())
    assert code == 0, detail
    report = json.loads(out.strip().splitlines()[-1])
    assert report["results"] == NJOBS and report["bad"] == [], detail
    assert report["servers"] == ["%s:%d" % (SERVER_ADDR, port)], detail
    assert 1 <= len(report["pids"]) <= WORKERS, detail


def test_client_finds_a_running_server(netns, tmp_path):
    """Server up first: the client's C is answered, it connects to
    192.0.2.1:PORT and gets all its results."""
    port = free_port()
    server = _start_server(netns, port, tmp_path)
    try:
        client = _start_client(netns, port)
        _check_client(client, server, port)
    finally:
        stop_server(server)


SNIFFER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(60)
while True:
    data, sender = s.recvfrom(64)
    if data[:1] == b"C":
        print(sender[0], data.decode())
        break
"""


def test_server_started_later_is_found(netns, tmp_path):
    """Client up first: its C goes out while no server exists (a probe in the
    server's namespace receives it, then exits); the server started
    afterwards announces itself with S, the client hears it, connects and
    gets all its results (the jobs it submitted before any server existed)."""
    port = free_port()
    sniffer = subprocess.Popen(Netns.exec(netns.server, [sys.executable, "-c", SNIFFER, port]),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: _bound(sniffer.pid, "udp", port)
                          or sniffer.poll() is not None, timeout=60), "probe did not start"
        client = _start_client(netns, port)
        out, err = sniffer.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        sniffer.kill()
        out, err = sniffer.communicate()
    assert out.split() == [CLIENT_ADDR, "C"], "no C from the client: %r %r" % (out, err)

    server = _start_server(netns, port, tmp_path)
    try:
        _check_client(client, server, port)
    finally:
        stop_server(server)
