"""Autodiscovery beyond one broadcast domain, with unmodified clients that
list their server only as ``"*:PORT"`` (clients/discover_jobs.py).

The network is netns.Subnets: a multi-homed server namespace on subnet 1
(192.0.2.1, its default route) and subnet 2 (198.51.100.1), a client
namespace on subnet 2 (198.51.100.2), and a router between subnet 2 and
subnet 3, where the third client namespace is (203.0.113.2). A client's
``C`` goes to 255.255.255.255 and stays on its own subnet; so does a
server's ``S`` to 255.255.255.255, and from the server it leaves by the
default route, subnet 1, where no client is.

Two servers run at once in the server namespace, on ports A and B:

- A (``-a --announce 203.0.113.2``, broadcast by default):
  - the client on subnet 2, started after A, finds it only through the
    unicast answer to its ``C``, sent to its discovery port;
  - the client on subnet 3 finds it only through ``--announce``. Subnet 3 is
    unreachable from the server at first, so A's first announcements fail:
    the failure is logged, and once the route exists the next period's
    announcement gets through (and the log says so).
- B (``-a -b 192.0.2.255 -b 198.51.100.255``): a client on subnet 2, started
  before B (its one ``C`` is lost), finds B through the directed broadcast
  of the second ``-b``.

And a name given to ``--announce`` that does not resolve stops the start
with an error naming it (in a namespace with no name server in reach, so
the lookup fails at once).

Needs root and ``ip netns``; skipped otherwise. Namespaces are removed
afterwards, also when the test fails, and stale ones left by a killed run
first.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

import netns
from netns import Subnets
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
from serverprocs import run_to_exit

NJOBS = 6
WORKERS = 1
# The announcement period (src/front/discovery.rs), and what the client on
# subnet 3 waits beyond it: every wait is bounded.
ANNOUNCE_INTERVAL = 10
pytestmark = [
    pytest.mark.server_behaviour,
    # Network namespaces: one at a time with the other netns modules.
    pytest.mark.xdist_group("netns"),
    pytest.mark.timeout(240),
    pytest.mark.better_than_ppft(reason="ppft's server answers C by broadcast only, "
                                 "takes one -b and has no --announce"),
]


def _need_netns():
    """Skip unless namespaces can be made here; remove stale ones."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("the ip command (iproute2) is not installed")
    netns.remove_stale()
    probe = "%s%d-probe" % (netns.PREFIX, os.getpid())
    added = netns.ip("netns", "add", probe, check=False)
    if added.returncode != 0:
        pytest.skip("ip netns is not available here: %s" % added.stderr.strip())
    netns.delete(probe)


@pytest.fixture
def subnets(request):
    _need_netns()
    return Subnets(request.addfinalizer)


@pytest.fixture
def isolated(request):
    """A namespace with only lo up: no name server in reach."""
    _need_netns()
    name = "%s%d-iso" % (netns.PREFIX, os.getpid())
    netns.ip("netns", "add", name)
    request.addfinalizer(lambda: netns.delete(name))
    netns.ip("-n", name, "link", "set", "lo", "up")
    return name


def _start_client(ns, port):
    """clients/discover_jobs.py in namespace `ns`, once it listens on UDP
    `port` (it has then sent its one C)."""
    script = HERE / "clients" / "discover_jobs.py"
    client = subprocess.Popen(
        netns.exec_argv(ns, [sys.executable, script, port, SECRET, NJOBS]),
        cwd=str(HERE), env=server_env(), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    listening = wait_until(lambda: client.poll() is not None
                           or netns.bound(client.pid, "udp", port), timeout=60)
    if not listening or client.poll() is not None:
        client.kill()
        out, err = client.communicate()
        pytest.fail("client in %s never listened on UDP %d (exit %s)\nstdout:\n%s\nstderr:\n%s"
                    % (ns, port, client.returncode, out, err))
    return client


def _start_server(ns, port, log_path, *flags):
    argv = netns.exec_argv(ns, server_command(
        "-a", "-d", "-p", port, "-s", SECRET, "-w", WORKERS, *flags))
    server = launch(argv, log_path, port=port, nworkers=WORKERS, wait=False)
    listening = wait_until(
        lambda: server.proc.poll() is not None or netns.bound(server.proc.pid, "tcp", port, "0A"),
        timeout=STARTUP_TIMEOUT)
    assert listening and server.proc.poll() is None, (
        "server in %s not listening (exit %s)\n%s" % (ns, server.proc.poll(), server.log_tail()))
    return server


def _check_client(name, proc, server, address, timeout):
    """The client found exactly `address` (the server's address on the
    client's side) and got every result right."""
    code, out, err = finish_client_script(proc, timeout=timeout)
    detail = "%s: client exit %s\nstdout:\n%s\nstderr:\n%s\nserver log:\n%s" % (
        name, code, out, err[-4000:], server.log_tail())
    assert code == 0, detail
    report = json.loads(out.strip().splitlines()[-1])
    assert report["results"] == NJOBS and report["bad"] == [], detail
    assert report["servers"] == ["%s:%d" % (address, server.port)], detail


def test_clients_on_other_subnets_find_the_server(subnets, tmp_path):
    """Unicast answer to C (subnet 2, server A), --announce with a failing
    then restored route (subnet 3, server A), two -b addresses (subnet 2,
    server B): each client finds its server at the address on its side and
    gets every result."""
    port_a, port_b = free_port(), free_port()
    while port_b == port_a:
        port_b = free_port()
    started = []
    servers = []
    try:
        # Clients that must be listening before their server starts.
        on_subnet3 = _start_client(subnets.client3, port_a)
        started.append(on_subnet3)
        before_b = _start_client(subnets.client2, port_b)
        started.append(before_b)

        server_a = _start_server(subnets.server, port_a, tmp_path / "server-a.log",
                                 "--announce", Subnets.CLIENT3)
        servers.append(server_a)
        server_b = _start_server(subnets.server, port_b, tmp_path / "server-b.log",
                                 "-b", Subnets.BROADCAST1, "-b", Subnets.BROADCAST2)
        servers.append(server_b)
        # The startup lines, which may follow the listening sockets by a moment.
        server_b.logged("broadcast 192.0.2.255, 198.51.100.255")
        server_a.logged("announce to 203.0.113.2")

        # Subnet 3 is unreachable: the announcement fails, and says so.
        failed = "cannot send to %s (port %d)" % (Subnets.CLIENT3, port_a)
        assert wait_until(lambda: failed in server_a.log(), timeout=30), server_a.log_tail()
        subnets.route_subnet3()

        # Server A is up: this client's C is answered by unicast.
        after_a = _start_client(subnets.client2, port_a)
        started.append(after_a)

        _check_client("subnet 2, unicast answer to C", after_a, server_a, Subnets.SERVER2,
                      timeout=90)
        # To the client's discovery port, not to the port its C came from.
        unicast = "answer: sent S to %s:%d" % (Subnets.CLIENT2, port_a)
        server_a.logged(unicast)
        _check_client("subnet 2, second -b", before_b, server_b, Subnets.SERVER2, timeout=90)
        # The next period's announcement, through the router.
        _check_client("subnet 3, --announce", on_subnet3, server_a, Subnets.SERVER2,
                      timeout=90 + ANNOUNCE_INTERVAL)
        server_a.logged("sending to %s works again" % Subnets.CLIENT3)
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=60)
        for server in servers:
            stop_server(server)


def test_an_announce_name_that_does_not_resolve_stops_the_start(isolated):
    """--announce with a name no resolver knows: exit non-zero at once,
    naming the name and the flag, no panic."""
    name = "no-such-ppserver-client.invalid"
    argv = netns.exec_argv(isolated, server_command(
        "-a", "-p", free_port(), "-s", SECRET, "--announce", name))
    code, out, err = run_to_exit(argv, timeout=60)
    assert code not in (0, None), (code, out, err)
    assert name in err and "--announce" in err, err
    assert "panick" not in err, err
