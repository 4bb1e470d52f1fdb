"""No fd or process leaks: after 1500 connections of every kind (good,
refused, broken, abandoned), after many worker restarts (-r) and worker
kills, the server holds as many file descriptors and child processes as it
did before; and when the server stops, none of its workers outlives it.

Each test runs its own server, so nothing else moves its counts. Counts
are compared after a bounded wait for closes to settle (the server notices
a closed connection when it next reads it), with a small slack for fds
opened lazily.
"""

import os
import random
import signal
import socket
import struct
from concurrent.futures import ThreadPoolExecutor

import pytest

import faultjobs
import ppwire
from faulthelpers import ExtraServer, exec_session, stat_roundtrip
from pphelpers import (IMPL, close_client, connect_client, setup_or_fail, start_server,
                       stop_server)
from procs import (fd_count, fd_targets, held_connections, is_gone, wait_for_pool, wait_settled,
                   wait_until)

# The server's own behaviour, whatever the client family: run with the
# ppft 1.7.8 family only (conftest.py deselects it in the others).
pytestmark = pytest.mark.server_behaviour

FD_SLACK = 3
CONNECTIONS = 1500
ADD = ppwire.function_package("add", ["def add(a, b):\n    return a + b\n"])


def _one_connection(server, i):
    """Connection number i, one of ten kinds; returns the kind's name."""
    kind = i % 10
    sock = socket.create_connection((server.host, server.port), timeout=30)
    sock.settimeout(30)
    try:
        if kind == 0:
            return "connect and close"
        ppwire.recv_frame(sock)
        nonce = ppwire.recv_frame(sock)
        if kind == 1:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return "reset after the nonce"
        if kind == 2:
            ppwire.send_frame(sock, ppwire.answer(nonce, "wrong secret"))
            assert ppwire.recv_frame(sock) == b"FAILED"
            return "wrong secret"
        if kind == 3:
            sock.sendall(ppwire.HEADER.pack(2**62))
            return "oversize header before auth"
        if kind == 4:
            sock.sendall(ppwire.HEADER.pack(40)[:5])
            return "half a header"
        ppwire.send_frame(sock, ppwire.answer(nonce, server.secret))
        assert ppwire.recv_frame(sock) == b"OK"
        if kind == 5:
            ppwire.send_frame(sock, "STAT")
            assert int(ppwire.recv_frame(sock)) == server.nworkers
            ppwire.send_frame(sock, "TIME")
            float(ppwire.recv_frame(sock))
            return "STAT"
        ppwire.send_frame(sock, "EXEC")
        if kind == 6:
            ppwire.send_job(sock, ADD, (i, 1))
            assert ppwire.recv_result(sock)[0] == i + 1
            return "job"
        if kind == 7:
            ppwire.send_job(sock, ADD, (i, 2))
            return "job abandoned"
        if kind == 8:
            ppwire.send_frame(sock, b"H" + b"0" * 32)
            ppwire.send_frame(sock, ppwire.pickled_args((1, 2)))
            return "unknown package hash"
        sock.sendall(ppwire.HEADER.pack(len(ADD) + 1) + b"N" + ADD[:10])
        return "half a package"
    finally:
        sock.close()


def test_fds_back_to_baseline_after_many_connections(tmp_path):
    """1500 connections (16 at a time): clean closes, resets, wrong secrets,
    oversize and half headers, STATs, jobs, abandoned jobs, unknown hashes,
    half packages. Afterwards the server's fd count returns to what it was
    before (and it still serves)."""
    # The wrong secrets here test fds, not the login throttle
    # (test_hostile.py), which would stretch the run to minutes.
    no_delay = ("--login-delay", "0") if IMPL == "rust" else ()
    with ExtraServer(2, tmp_path / "server.log", no_delay) as server:
        pid = server.proc.pid
        for i in range(20):  # warm up every path once
            _one_connection(server, i)
        # The baseline: no connection left open (the server notices a
        # closed one when it next reads it), every worker in place.
        wait_until(lambda: not held_connections(server),
                   "the server to close the warm-up connections", timeout=30)
        wait_for_pool(server)
        baseline = fd_count(pid)
        before = fd_targets(pid)
        with ThreadPoolExecutor(16) as pool:
            kinds = list(pool.map(lambda i: _one_connection(server, i), range(CONNECTIONS)))
        assert len(kinds) == CONNECTIONS
        try:
            # Half-open peers are only dropped by the 10 s handshake timeout.
            wait_settled(lambda: fd_count(pid), baseline + FD_SLACK,
                         "server fds after %d connections" % CONNECTIONS, timeout=40)
        except AssertionError as exc:
            raise AssertionError("%s\nbefore: %s\nnow: %s" % (exc, before, fd_targets(pid)))
        assert stat_roundtrip(server)[0] == 2
        wait_for_pool(server)


@pytest.mark.better_than_ppft(reason="ppft's server does not replace killed workers")
def test_no_process_or_fd_leak_after_restarts_and_kills(tmp_path):
    """With -r every job gets a fresh worker: 60 jobs see 60 distinct worker
    pids; then 10 idle workers are SIGKILLed one after another. Afterwards
    the server has exactly its N workers, no zombie child, and its fd count
    is back to the baseline (every worker's pipes were closed)."""
    with ExtraServer(2, tmp_path / "server.log", ["-r"]) as server:
        pid = server.proc.pid
        js = connect_client(server)
        try:
            assert js.submit(faultjobs.square, (2,))() == 4
            wait_for_pool(server)
            baseline = fd_count(pid)
            before = fd_targets(pid)
            jobs = [js.submit(faultjobs.getpid_nap, (0,)) for _ in range(60)]
            pids = [job() for job in jobs]
            assert None not in pids
            assert len(set(pids)) == 60, "-r did not restart the worker after each job"
            rng = random.Random(7)
            killed = set()
            for _ in range(10):
                victim = rng.choice(sorted(wait_for_pool(server, exclude=killed)))
                os.kill(victim, signal.SIGKILL)
                killed.add(victim)
            workers = wait_for_pool(server, exclude=killed)
            assert len(workers) == 2
            assert [js.submit(faultjobs.square, (i,))() for i in range(4)] == [0, 1, 4, 9]
        finally:
            close_client(js)
        wait_for_pool(server)
        try:
            wait_settled(lambda: fd_count(pid), baseline + FD_SLACK,
                         "server fds after 60 restarts and 10 kills", timeout=30)
        except AssertionError as exc:
            raise AssertionError("%s\nbefore: %s\nnow: %s" % (exc, before, fd_targets(pid)))


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_workers_do_not_outlive_the_server(tmp_path, how):
    """Stopping the server (SIGTERM), or killing it outright (SIGKILL), also
    ends every worker, even one in the middle of a long job."""
    # The job may have started before the signal lands: then SIGTERM's drain
    # waits for it until --drain-timeout (default 20 s, test_stopping.py).
    flags = ("--drain-timeout", "1") if IMPL == "rust" else ()
    server = setup_or_fail(start_server, 2, tmp_path / "server.log", *flags)
    try:
        workers = wait_for_pool(server)
        sock = exec_session(server)
        nap = ppwire.function_package("nap", ["def nap(s):\n    import time\n    time.sleep(s)\n"])
        ppwire.send_job(sock, nap, (600,))
        server.proc.send_signal(how)
        server.proc.wait(timeout=30)
        wait_until(lambda: all(is_gone(w) for w in workers),
                   "workers %s to end with the server" % sorted(workers), timeout=30)
        sock.close()
    finally:
        stop_server(server)
