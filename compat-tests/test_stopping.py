"""Stopping without losing jobs, and clients that stop reading.

- SIGTERM drains: the listener closes at once, the jobs already received
  are run and answered, each connection is closed once it has nothing
  pending, and the server exits 0.
- --drain-timeout bounds the drain; a second signal (a second or more after
  the first) ends it at once. The connections left are closed (pp clients
  resubmit such jobs), never answered with a made-up result.
- -k also bounds a write: a client that never reads its answers is
  dropped and the memory of its result freed.

No wall-clock thresholds: every wait is a generous upper bound.
"""

import os
import signal
import socket

import pytest

import ppwire
import serverprocs as sp
from procs import is_gone, rss_kib, wait_for_children, wait_until

# The server's own behaviour, whatever the client family: run with the
# ppft 1.7.8 family only (conftest.py deselects it in the others).
pytestmark = [
    pytest.mark.server_behaviour,
    pytest.mark.better_than_ppft(
        reason="ppft's server closes every connection at once on SIGTERM and keeps "
        "unread results for as long as the socket stays open"),
]

BIG_SOURCE = "def big(n):\n    return 'x' * n\n"
RESULT_BYTES = 64 << 20


def _refuses(server):
    try:
        socket.create_connection((server.host, server.port), timeout=1.0).close()
        return False
    except OSError:
        return True


def test_sigterm_answers_the_running_jobs_then_exits(launch, tmp_path):
    """Two jobs running when SIGTERM arrives: new connections are refused
    at once, both jobs are answered, then their connections are closed and
    the server exits 0."""
    server = launch("--drain-timeout", 120, nworkers=2)
    launch.workers.extend(wait_for_children(server, 2))
    first, _ = sp.start_marked_nap(server, tmp_path / "first", seconds=4)
    second, _ = sp.start_marked_nap(server, tmp_path / "second", seconds=4)
    try:
        os.kill(server.proc.pid, signal.SIGTERM)
        assert wait_until(lambda: _refuses(server), timeout=30), "still accepting"
        for sock in (first, second):
            result, _ = ppwire.recv_result(sock)
            assert result == 4
            with pytest.raises(ppwire.ClosedError):
                ppwire.recv_frame(sock)
    finally:
        first.close()
        second.close()
    assert sp.wait_exit(server.proc) == 0, server.log_tail()
    assert "drained" in server.log(), server.log_tail()


def test_drain_timeout_closes_what_is_left(launch, tmp_path):
    """A job that outlasts --drain-timeout: its connection is closed, not
    answered, and the server exits 0 with no worker left."""
    server = launch("--drain-timeout", 2)
    workers = wait_for_children(server, 1)
    launch.workers.extend(workers)
    sock, _ = sp.start_marked_nap(server, tmp_path / "long", seconds=600)
    try:
        os.kill(server.proc.pid, signal.SIGTERM)
        with pytest.raises(ppwire.ClosedError):
            ppwire.recv_frame(sock)
    finally:
        sock.close()
    assert sp.wait_exit(server.proc) == 0, server.log_tail()
    assert wait_until(lambda: all(is_gone(p) for p in workers), timeout=60)
    assert "drain timeout" in server.log(), server.log_tail()


def test_a_second_signal_stops_at_once(launch, tmp_path):
    server = launch("--drain-timeout", 3600)
    launch.workers.extend(wait_for_children(server, 1))
    sock, _ = sp.start_marked_nap(server, tmp_path / "long", seconds=600)
    try:
        os.kill(server.proc.pid, signal.SIGTERM)
        assert wait_until(lambda: "draining" in server.log(), timeout=30), server.log_tail()

        # Signals within a second of the first are the same request (Slurm's
        # time limit sends two): sent again until one counts.
        def stopped():
            if server.proc.poll() is None:
                os.kill(server.proc.pid, signal.SIGINT)
            return server.proc.poll() is not None

        wait_until(stopped, timeout=60, interval=0.25)
        assert sp.wait_exit(server.proc) == 0, server.log_tail()
    finally:
        sock.close()
    assert "second stop request" in server.log(), server.log_tail()


def test_a_client_that_never_reads_is_dropped_and_its_result_freed(launch):
    """Three clients send a job with a 64 MiB result and never read: after
    -k seconds without progress each connection is closed and the server's
    memory comes back down, while it keeps serving others."""
    server = launch("-k", 3, nworkers=2)
    package = ppwire.function_package("big", [BIG_SOURCE])
    silent = []
    try:
        for _ in range(3):
            sock = ppwire.open_session(server.host, server.port, server.secret, "EXEC")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
            ppwire.send_job(sock, package, (RESULT_BYTES,))
            silent.append(sock)
        assert wait_until(lambda: server.log().count("stopped reading") >= 1, timeout=120), (
            server.log_tail())
        # The warning is rate-limited: wait for the memory, not the lines.
        assert wait_until(lambda: rss_kib(server.proc.pid) < 48 * 1024, timeout=120), (
            "server RSS %d KiB after the write timeouts\n%s"
            % (rss_kib(server.proc.pid), server.log_tail()))
        assert sp.raw_job(server, "add", sp.ADD_SOURCE, (40, 2))[0] == 42
    finally:
        for sock in silent:
            sock.close()
