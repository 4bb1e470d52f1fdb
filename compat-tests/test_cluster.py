"""Three servers on three "hosts", one client that lists none of them: it
finds them all by autodiscovery (``ppservers=("*:PORT",)``) and spreads its
jobs over them; the servers exit by themselves once it has left (``-t``).

The hosts are network namespaces on one Ethernet segment (netns.Segment):
the client's namespace holds a bridge and has 192.0.2.100, each server's
namespace (192.0.2.1, .2, .3) is joined to the bridge by a veth pair. All
addresses are in 192.0.2.0/24 (TEST-NET-1) and nothing is created outside
the test's namespaces; they are deleted afterwards, also when the test
fails, and stale ones left by a killed run are deleted first.

The client starts first and is found by each server's ``S`` broadcast
(255.255.255.255, the default) at start; it submits its jobs only once it
is connected to all three, so each server gets jobs. Each server runs
``-a -t 10 -w 1`` with its own PPTEST_NODE, which its workers inherit and
the job returns.

Needs root and ``ip netns`` (iproute2); skipped otherwise (CI runs as root,
and scripts/test.sh installs iproute2 if ``ip`` is missing).
"""

import collections
import json
import os
import shutil
import subprocess
import sys

import pytest

import netns
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
from procs import wait_until
from serverprocs import EXIT_TIMEOUT, wait_exit

NSERVERS = 3
NJOBS = 60
IDLE_EXIT = 10  # -t: seconds with no client before a server exits

pytestmark = [
    # The servers' own behaviour (the client's side of autodiscovery runs in
    # every family: test_autodiscovery.py): with ppft 1.7.8 only (conftest.py).
    pytest.mark.server_behaviour,
    # Network namespaces: one at a time with test_autodiscovery.py under xdist.
    pytest.mark.xdist_group("netns"),
    # Client, three server starts, then IDLE_EXIT before the servers exit: more
    # than pytest.ini's 120 s only if something hangs; every wait is bounded.
    pytest.mark.timeout(300),
]


@pytest.fixture
def segment(request):
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("the ip command (iproute2) is not installed")
    netns.remove_stale()
    probe = "%s%d-probe" % (netns.PREFIX, os.getpid())
    added = netns.ip("netns", "add", probe, check=False)
    if added.returncode != 0:
        pytest.skip("ip netns is not available here: %s" % added.stderr.strip())
    bridge = netns.ip("-n", probe, "link", "add", "probe0", "type", "bridge", check=False)
    netns.delete(probe)
    if bridge.returncode != 0:
        pytest.skip("cannot create a bridge in a network namespace: %s" % bridge.stderr.strip())
    return netns.Segment(NSERVERS, request.addfinalizer)


def _start_client(segment, port):
    script = HERE / "clients" / "cluster_jobs.py"
    client = subprocess.Popen(
        netns.exec_argv(segment.client, [sys.executable, script, port, SECRET, NJOBS, NSERVERS]),
        cwd=str(HERE), env=server_env(), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Its discovery thread binds UDP PORT and sends its one C; the servers
    # started after that find it with the S they announce at start.
    listening = wait_until(lambda: client.poll() is not None
                           or netns.bound(client.pid, "udp", port), timeout=60)
    if not listening or client.poll() is not None:
        client.kill()
        out, err = client.communicate()
        pytest.fail("client never listened on UDP %d (exit %s)\nstdout:\n%s\nstderr:\n%s"
                    % (port, client.returncode, out, err))
    return client


def _start_server(ns, node, port, log_path):
    argv = netns.exec_argv(ns, server_command(
        "-a", "-d", "-t", IDLE_EXIT, "-w", 1, "-s", SECRET, "-p", port))
    server = launch(argv, log_path, port=port, nworkers=1, wait=False,
                    env=server_env({"PPTEST_NODE": node}))
    listening = wait_until(
        lambda: server.proc.poll() is not None or netns.bound(server.proc.pid, "tcp", port, "0A"),
        timeout=STARTUP_TIMEOUT)
    assert listening and server.proc.poll() is None, (
        "server %s in %s not listening (exit %s)\n%s"
        % (node, ns, server.proc.poll(), server.log_tail()))
    return server


def test_client_finds_three_servers_and_they_exit_after_it(segment, tmp_path):
    """The client discovers all three servers, every server runs some of the
    60 jobs, every result is right and says which server ran it (consistent
    with the client's own per-server job counts), and once the client has
    left each server exits 0 by itself (-t) with no process left in its
    namespace."""
    port = free_port()
    nodes = {"%s:%d" % (addr, port): "n%d" % n for n, addr in enumerate(segment.addrs, 1)}
    servers = {}
    client = _start_client(segment, port)
    try:
        for (ns, node) in zip(segment.servers, nodes.values()):
            servers[node] = _start_server(ns, node, port, tmp_path / ("server-%s.log" % node))

        code, out, err = finish_client_script(client)

        def detail():
            logs = "\n".join("--- server %s (%s) ---\n%s" % (node, s.proc.poll(), s.log_tail(30))
                             for node, s in servers.items())
            return "client exit %s\nstdout:\n%s\nstderr:\n%s\n%s" % (code, out[-4000:],
                                                                     err[-4000:], logs)

        assert code == 0, detail()
        report = json.loads(out.strip().splitlines()[-1])
        found = report["servers"]
        assert sorted(found) == sorted(nodes), "servers found: %s\n%s" % (sorted(found), detail())

        results = report["results"]
        assert len(results) == NJOBS, detail()
        bad = [(i, r) for i, r in enumerate(results) if r is None or r[:2] != [i, i * i]]
        assert bad == [], "wrong results %s\n%s" % (bad, detail())

        ran = collections.Counter(r[2] for r in results)
        assert set(ran) == set(nodes.values()), "jobs per node %s\n%s" % (dict(ran), detail())
        per_server = {nodes[k]: v["njobs"] for k, v in found.items()}
        assert ran == per_server, "jobs per node %s, client's count per server %s\n%s" % (
            dict(ran), per_server, detail())

        for node, server in servers.items():
            assert wait_exit(server.proc, timeout=IDLE_EXIT + EXIT_TIMEOUT) == 0, (
                "server %s did not exit 0 by itself within %d s of the client leaving "
                "(exit %s)\n%s" % (node, IDLE_EXIT + EXIT_TIMEOUT, server.proc.poll(),
                                   server.log_tail()))
        for ns in segment.servers:
            empty = wait_until(lambda: not netns.pids(ns), timeout=30)
            assert empty, "processes left in %s after its server exited: %s" % (
                ns, netns.pids(ns))
    finally:
        if client.poll() is None:
            client.kill()
            client.communicate()
        for server in servers.values():
            stop_server(server)
