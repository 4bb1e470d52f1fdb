"""Signals sent to the server's main process: SIGUSR1 prints the job
statistics; SIGTERM and SIGINT stop it cleanly (exit 0, no worker left, pid
file removed); SIGKILL still takes the workers with it.

Workers are the server's child processes (found through /proc; the server
puts them in their own process group, so they are not signalled along with
it). No wall-clock thresholds: every wait is a generous upper bound.
"""

import os
import signal

import pytest

import ppwire
import serverprocs as sp
from procs import is_gone, wait_for_children, wait_until, worker_children

# The server's own behaviour, whatever the client family: run with the
# ppft 1.7.8 family only (conftest.py deselects it in the others).
pytestmark = pytest.mark.server_behaviour

better_than_ppft = pytest.mark.better_than_ppft(
    reason="ppft's ppserver dies on SIGTERM/SIGINT/SIGHUP/SIGKILL without stopping its workers "
    "or removing its pid file"
)


def _stats_rows(text):
    """Rows of ppft's statistics table: lists of the `|`-separated fields."""
    rows = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split("|")]
        if len(fields) == 5 and fields[0].isdigit():
            rows.append(fields)
    return rows


def test_sigusr1_prints_the_statistics_table(launch):
    """SIGUSR1: the server prints ppft's statistics table (header and a row
    counting the 3 jobs run, 100% of them, on its local workers) and keeps
    serving."""
    server = launch(nworkers=2)
    sock = ppwire.open_session(server.host, server.port, server.secret, "EXEC")
    try:
        add = ppwire.function_package("add", [sp.ADD_SOURCE])
        for i in range(3):
            ppwire.send_job(sock, add, (i, 1), cached=i > 0)
            assert ppwire.recv_result(sock)[0] == i + 1
    finally:
        sock.close()

    os.kill(server.proc.pid, signal.SIGUSR1)
    header = "job count | % of all jobs | job time sum | time per job | job server"
    assert wait_until(
        lambda: header in server.log() and _stats_rows(server.log()), timeout=60
    ), "no statistics table after SIGUSR1\n%s" % server.log_tail()
    rows = _stats_rows(server.log())
    assert len(rows) == 1, rows
    count, share, time_sum, per_job, node = rows[0]
    assert (int(count), float(share), node) == (3, 100.0, "local"), rows
    assert float(time_sum) >= 0.0 and float(per_job) >= 0.0

    assert server.proc.poll() is None, "SIGUSR1 stopped the server"
    assert sp.raw_job(server, "add", sp.ADD_SOURCE, (40, 2))[0] == 42


@better_than_ppft
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT", "SIGHUP"])
def test_stop_signal_stops_every_worker(launch, tmp_path, signame):
    """SIGTERM, SIGINT or SIGHUP (the terminal or ssh session that started
    it went away), with a client connected and a job running: the
    server exits 0, none of its 3 workers is left running, and the -P pid
    file is gone."""
    pid_file = tmp_path / "ppserver.pid"
    # The running job outlasts the drain (test_stopping.py covers drains
    # that finish): the stop must still leave nothing behind.
    server = launch("-P", pid_file, "--drain-timeout", 2, nworkers=3)
    workers = wait_for_children(server, 3)
    launch.workers.extend(workers)
    assert wait_until(lambda: pid_file.exists(), timeout=60), server.log_tail()

    # A job that keeps its worker busy past any bounded wait below.
    busy, busy_worker = sp.start_marked_nap(server, tmp_path / "running")
    assert busy_worker in workers, (busy_worker, workers)
    try:
        idle = ppwire.open_session(server.host, server.port, server.secret, "STAT")
        try:
            assert int(ppwire.recv_frame(idle)) == 3
            os.kill(server.proc.pid, getattr(signal, signame))
            code = sp.wait_exit(server.proc)
        finally:
            idle.close()
    finally:
        busy.close()
    assert code == 0, "exit code %r after %s\n%s" % (code, signame, server.log_tail())
    assert wait_until(lambda: all(is_gone(pid) for pid in workers), timeout=60), (
        "workers still running after %s: %r\n%s"
        % (signame, [p for p in workers if not is_gone(p)], server.log_tail())
    )
    assert not pid_file.exists(), "pid file left behind after %s" % signame


@better_than_ppft
def test_sigkill_takes_the_workers_along(launch, tmp_path):
    """SIGKILL of the server (no chance to clean up): its workers die too
    (they asked for PR_SET_PDEATHSIG), including one busy with a long job,
    which would not notice its closed stdin until the job ends."""
    server = launch(nworkers=2)
    workers = wait_for_children(server, 2)
    launch.workers.extend(workers)
    busy, busy_worker = sp.start_marked_nap(server, tmp_path / "running")
    assert busy_worker in workers, (busy_worker, workers)
    try:
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(timeout=sp.EXIT_TIMEOUT)
        assert wait_until(lambda: all(is_gone(pid) for pid in workers), timeout=60), (
            "workers outlived the killed server: %r" % [p for p in workers if not is_gone(p)]
        )
    finally:
        busy.close()


def test_workers_are_the_servers_children(launch):
    """Sanity check of the process inspection the tests above rely on: a
    server with 3 workers has exactly 3 live children, which run jobs."""
    server = launch(nworkers=3)
    workers = wait_for_children(server, 3)
    assert len(workers) == 3
    assert worker_children(server.proc.pid) == workers
    pids = set()
    for _ in range(20):
        pids.add(sp.raw_job(server, "worker_pid", sp.PID_SOURCE, ())[0])
        if len(pids) == 3:
            break
    assert pids <= set(workers), (pids, workers)
