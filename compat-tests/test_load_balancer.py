"""Three servers behind HAProxy (Debian's ``haproxy``, TCP mode), and one
client that lists only HAProxy's address.

A pp client sizes its connections from the CPU count in the ``STAT``
answer: ncpus EXEC connections plus as many reserved ones, and at most that
many jobs in flight. Behind a load balancer that answer comes from one
backend, so by default the client keeps about 4 jobs in flight for the 6
workers of three ``-w 2`` servers. With ``--advertise-ncpus 6`` on each, it
opens 12 EXEC connections, which HAProxy spreads over the three, and keeps
all six workers busy.

The measure: sleep jobs (1 s each), four rounds' worth for the six
workers, through HAProxy. Each job returns its server's PPTEST_NODE, its
worker's pid, and when it started and ended (the workers share this
host's clock): the most jobs that ran at the same moment must be six,
every worker of the three servers at once, and every backend must have run
jobs. That is an order of events, not a speed: a loaded machine makes the
jobs slower, not fewer at once.

HAProxy runs with a config written to the test's temp dir, started by the
test and stopped after it. Skipped if ``haproxy`` is not installed
(scripts/test.sh installs it when it runs as root with apt-get).
"""

import os
import shutil
import sys
from pathlib import Path

import pytest

from pphelpers import (
    SECRET,
    ServerHandle,
    close_client,
    connect_client,
    free_port,
    launch,
    rust_binary,
    server_env,
    start_server,
    stop_server,
    wait_listening,
)
from serverprocs import run_to_exit, stat_workers

NSERVERS = 3
WORKERS = 2
ADVERTISED = NSERVERS * WORKERS
NAP = 1.0  # seconds per job
ROUNDS = 4  # jobs per worker

pytestmark = [
    pytest.mark.server_behaviour,
    pytest.mark.timeout(180),
    pytest.mark.better_than_ppft(reason="ppft's server has no --advertise-ncpus"),
]


def nap_where(seconds):
    """Sleep; return the server's PPTEST_NODE, the worker's pid, and when
    the job started and ended."""
    import os
    import time

    started = time.time()
    time.sleep(seconds)
    return os.environ.get("PPTEST_NODE"), os.getpid(), started, time.time()


def most_at_once(results):
    """The most jobs whose runs overlap at one moment."""
    events = sorted([(start, 1) for _, _, start, _ in results]
                    + [(end, -1) for _, _, _, end in results],
                    key=lambda e: (e[0], e[1]))
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return most


def _haproxy():
    for path in (shutil.which("haproxy"), "/usr/sbin/haproxy"):
        if path and os.access(path, os.X_OK):
            return path
    pytest.skip("haproxy is not installed (scripts/test.sh installs Debian's as root)")


HAPROXY_CONFIG = """\
global
    maxconn 1024

defaults
    mode tcp
    timeout connect 5s
    # A pp connection sits idle between jobs; the server's -k bounds that.
    timeout client 1h
    timeout server 1h

frontend pp
    bind 127.0.0.1:{port}
    default_backend ppservers

backend ppservers
    balance roundrobin
{servers}
"""


def _start_haproxy(binary, backends, tmp_path):
    port = free_port()
    servers = "\n".join("    server %s %s:%d" % (name, s.host, s.port)
                        for name, s in backends.items())
    config = Path(tmp_path) / "haproxy.cfg"
    config.write_text(HAPROXY_CONFIG.format(port=port, servers=servers))
    # -db: stay in the foreground, so stop_server's SIGTERM stops it.
    handle = launch([binary, "-db", "-f", str(config)], Path(tmp_path) / "haproxy.log",
                    port=port, secret=None, env=dict(os.environ))
    return ServerHandle(handle.impl, handle.host, port, SECRET, ADVERTISED, handle.proc,
                        handle.log_path, handle.argv)


def test_advertised_cpus_keep_every_worker_behind_haproxy_busy(tmp_path):
    binary = _haproxy()
    started = []
    clients = []
    try:
        backends = {}
        for n in range(1, NSERVERS + 1):
            node = "n%d" % n
            backends[node] = start_server(
                WORKERS, tmp_path / ("server-%s.log" % node), "--advertise-ncpus", ADVERTISED,
                wait=False, env=server_env({"PPTEST_NODE": node}))
            started.append(backends[node])
        for server in started:
            wait_listening(server)
        assert backends["n1"].logged("telling clients 6 CPUs (--advertise-ncpus)"), (
            backends["n1"].log_tail())
        balancer = _start_haproxy(binary, backends, tmp_path)
        started.append(balancer)

        # Behind HAProxy: the client is told 6 CPUs and opens 12 EXEC
        # connections, spread over the three.
        lb = connect_client(balancer)
        clients.append(lb)
        assert lb.get_stats()[balancer.id].ncpus == ADVERTISED
        # Warm: workers up, the function package cached.
        assert None not in [job() for job in [lb.submit(nap_where, (0.1,))
                                              for _ in range(2 * ADVERTISED)]]
        jobs = [lb.submit(nap_where, (NAP,)) for _ in range(ROUNDS * ADVERTISED)]
        results = [job() for job in jobs]

        logs = "\n".join("--- %s ---\n%s" % (name, s.log_tail(20))
                         for name, s in [*backends.items(), ("haproxy", balancer)])
        assert None not in results, logs
        per_node = {node: sum(1 for r in results if r[0] == node) for node in backends}
        assert all(per_node.values()), "jobs per backend: %s\n%s" % (per_node, logs)
        workers = {(node, pid) for node, pid, _, _ in results}
        at_once = most_at_once(results)
        summary = ("behind HAProxy: %d jobs, per backend %s, on %d workers, at most %d at once"
                   % (len(results), per_node, len(workers), at_once))
        print(summary)
        assert at_once == ADVERTISED, summary + "\n" + logs
    finally:
        for client in clients:
            close_client(client)
        for handle in reversed(started):
            stop_server(handle)


@pytest.mark.parametrize("value", ["0", "-1", "six", "1.5"])
def test_advertise_ncpus_must_be_at_least_one(value):
    """Anything but a whole number of 1 or more stops the start, naming
    the flag."""
    argv = [str(rust_binary()), "-i", "127.0.0.1", "-p", str(free_port()), "--python",
            sys.executable, "--advertise-ncpus", value]
    code, out, err = run_to_exit(argv, timeout=30)
    assert code not in (0, None), (code, out, err)
    assert "--advertise-ncpus" in err and "panicked" not in err, err


def test_stat_reports_the_advertised_count(tmp_path):
    """STAT tells the advertised count; without the flag, the workers."""
    plain = start_server(1, tmp_path / "plain.log")
    told = start_server(1, tmp_path / "told.log", "--advertise-ncpus", 5)
    try:
        assert stat_workers(plain) == 1
        assert stat_workers(told) == 5
    finally:
        stop_server(plain)
        stop_server(told)
