"""The server's stderr and stdout on pipes that nobody reads, as launchers
(pathos, ssh loops, batch scripts) leave them: the server keeps serving
every client. Log lines and statistics tables that cannot be written are
dropped and counted, and once the pipe is read again a notice says how many
log lines were dropped.

The test starts the server itself (pphelpers.launch sends the output to a
log file), with -d so that every connection writes log lines, and shrinks
both pipes to one page so they fill early. No wall-clock thresholds: every
wait is a generous upper bound.
"""

import fcntl
import os
import signal
import socket
import subprocess
import termios
import threading

import pytest

import ppwire
import serverprocs as sp
from pphelpers import (
    HERE,
    IMPL,
    SECRET,
    ServerHandle,
    close_client,
    connect_client,
    free_port,
    server_command,
    server_env,
    setup_or_fail,
    stop_server,
    wait_listening,
)
from procs import wait_until

CONNECTIONS = 4000
JOBS = 500
# Client sockets are bound to these before connecting, so the connections
# come from several peers (and no single source address runs out of ports).
SOURCES = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
PIPE_SIZE = 4096  # one page, the smallest a pipe can be
WAIT = 60.0  # seconds: upper bound of every wait here
# Linux's fcntl commands (F_LINUX_SPECIFIC_BASE + 7 and + 8): PyPy 3.9's
# fcntl module, like CPython's before 3.10, does not name them.
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)


def tagged_add(i):
    """A job: returns its argument with a result computed from it."""
    return (i, i + 1)


def _pending(pipe):
    """Bytes written into the pipe and not read yet."""
    return int.from_bytes(fcntl.ioctl(pipe.fileno(), termios.FIONREAD, bytes(4)), "little",
                          signed=True)


def _capacity(pipe):
    return fcntl.fcntl(pipe.fileno(), F_GETPIPE_SZ)


def _writer_blocked(pid, name):
    """Whether the server's thread `name` is blocked writing to a pipe."""
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/comm" % (pid, tid)) as f:
                comm = f.read().strip()
            with open("/proc/%d/task/%s/wchan" % (pid, tid)) as f:
                wchan = f.read()
        except OSError:
            continue
        if comm == name and "pipe_write" in wchan:
            return True
    return False


def _full(server, pipe, name):
    """No room left for the next batch of lines: the writer thread waits.
    A one-page pipe may block a write long before it is full to the byte
    (a write that does not fit the page's rest needs a second page), so the
    writer's own state says it, where the kernel shows it."""
    return _pending(pipe) > _capacity(pipe) - 1024 or (
        _pending(pipe) > 0 and _writer_blocked(server.proc.pid, name))


@pytest.fixture
def unread_server(tmp_path):
    """The server under test (-d, 2 workers) with stdout and stderr each on
    a pipe this test does not read until it says so; stopped afterwards."""
    port = free_port()
    # Its wrong secrets make log lines; the login throttle (test_hostile.py)
    # would only stretch the run.
    argv = server_command("-i", "127.0.0.1", "-p", port, "-w", 2, "-s", SECRET, "-d",
                          "--login-delay", 0)
    log_path = tmp_path / "server.log"
    log_path.write_text("$ %s\n(stdout and stderr: pipes nobody reads)\n" % argv[0])
    proc = subprocess.Popen(argv, cwd=str(HERE), env=server_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    for pipe in (proc.stdout, proc.stderr):
        try:
            fcntl.fcntl(pipe.fileno(), F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # already holds more than a page: it just fills later
    handle = ServerHandle(IMPL, "127.0.0.1", port, SECRET, 2, proc, log_path, argv)
    setup_or_fail(wait_listening, handle)
    try:
        yield handle
    finally:
        stop_server(handle)
        proc.stdout.close()
        proc.stderr.close()


def _one_connection(server, i):
    """Connection number i, from one of SOURCES, one of four kinds: each
    makes the server log a line or two at debug level."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(ppwire.SOCKET_TIMEOUT)
        sock.bind((SOURCES[i % len(SOURCES)], 0))
        sock.connect((server.host, server.port))
        kind = i % 4
        ppwire.recv_frame(sock)
        nonce = ppwire.recv_frame(sock)
        if kind == 0:
            return  # leaves mid-handshake
        if kind == 1:
            ppwire.send_frame(sock, ppwire.answer(nonce, "wrong secret"))
            assert ppwire.recv_frame(sock) == b"FAILED"
            return
        ppwire.send_frame(sock, ppwire.answer(nonce, server.secret))
        assert ppwire.recv_frame(sock) == b"OK"
        if kind == 2:
            ppwire.send_frame(sock, "STAT")
            assert int(ppwire.recv_frame(sock)) == server.nworkers
        else:
            ppwire.send_frame(sock, "EXEC")
    finally:
        sock.close()


class _Reader:
    """Reads a pipe on a thread from now on, keeping what it read."""

    def __init__(self, pipe):
        self.chunks = []
        self.thread = threading.Thread(target=self._run, args=(pipe,), daemon=True)
        self.thread.start()

    def _run(self, pipe):
        while True:
            try:
                chunk = os.read(pipe.fileno(), 65536)
            except (OSError, ValueError):  # closed by the fixture
                return
            if not chunk:
                return
            self.chunks.append(chunk)

    def text(self):
        return b"".join(self.chunks).decode(errors="replace")


@pytest.mark.better_than_ppft(
    reason="ppft's ppserver writes its log with blocking writes to stderr and stops "
    "serving once a pipe nobody reads is full"
)
@pytest.mark.timeout(600)
def test_unread_output_pipes_do_not_stop_the_server(unread_server):
    """With stdout and stderr full and never read: 4000 connections from
    three source addresses (mid-handshake, wrong secret, STAT, EXEC), 500
    jobs through a ppft client and SIGUSR1s are all served; once the pipes
    are read again, the log says how many lines it dropped and the
    statistics table comes out."""
    server = unread_server
    for i in range(CONNECTIONS):
        _one_connection(server, i)
        if i % 50 == 0:
            os.kill(server.proc.pid, signal.SIGUSR1)
    assert wait_until(lambda: _full(server, server.proc.stderr, "stderr-writer"),
                      timeout=WAIT), (
        "stderr never filled up: %d of %d bytes"
        % (_pending(server.proc.stderr), _capacity(server.proc.stderr)))

    def stdout_full():
        os.kill(server.proc.pid, signal.SIGUSR1)
        return _full(server, server.proc.stdout, "stdout-writer")

    assert wait_until(stdout_full, timeout=WAIT, interval=0.05), (
        "stdout never filled up: %d of %d bytes"
        % (_pending(server.proc.stdout), _capacity(server.proc.stdout)))

    js = connect_client(server)
    try:
        jobs = [js.submit(tagged_add, (i,)) for i in range(JOBS)]
        for _ in range(3):
            os.kill(server.proc.pid, signal.SIGUSR1)
        assert [job() for job in jobs] == [(i, i + 1) for i in range(JOBS)]
    finally:
        close_client(js)

    assert server.proc.poll() is None, "the server exited (code %s)" % server.proc.returncode
    assert sp.raw_job(server, "add", sp.ADD_SOURCE, (40, 2))[0] == 42
    assert sp.stat_workers(server) == server.nworkers

    # Read the pipes again: what was queued comes out, then the notice.
    errors, tables = _Reader(server.proc.stderr), _Reader(server.proc.stdout)
    notice = "log lines dropped: stderr was not being read"
    assert wait_until(lambda: notice in errors.text(), timeout=WAIT), (
        "no drop notice once stderr is read; its last lines:\n%s"
        % "\n".join(errors.text().splitlines()[-10:]))
    line = next(l for l in errors.text().splitlines() if notice in l)
    assert " - pp - WARNING - " in line, line
    assert int(line.split(" - WARNING - ")[1].split()[0]) > 0, line

    before = tables.text().count("Job execution statistics:")
    os.kill(server.proc.pid, signal.SIGUSR1)
    assert wait_until(
        lambda: tables.text().count("Job execution statistics:") > before, timeout=WAIT
    ), "no statistics table once stdout is read:\n%s" % tables.text()[-2000:]
    assert sp.raw_job(server, "add", sp.ADD_SOURCE, (1, 2))[0] == 3
