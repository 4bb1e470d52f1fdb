"""Helpers for the fault-tolerance and limits tests (test_faults.py,
test_limits.py, test_leaks.py): extra servers with extra command-line flags,
raw clients, the worker-died answer, and a thread that kills workers at
random. Looking at the server from /proc and the bounded waits are in
procs.py.

Nothing here asserts timing: waits are bounded only so that a server that
never gets there fails the test instead of hanging it.
"""

import platform
import threading
import time

import pphelpers
import ppwire
from procs import sigkill, wait_until, worker_pids

# Text our server puts in (None, text) when a job's worker died.
DIED_WORDS = ("worker", "died")


def finished_within(job, timeout):
    """Wait for a ppft job (its `finished` flag) for at most `timeout` s."""
    return wait_until(lambda: job.finished, timeout=timeout, interval=0.02)


# --- servers with extra flags ----------------------------------------------------


class ExtraServer:
    """Context manager around pphelpers.start_server (same cwd, PYTHONPATH
    and secret) with extra command-line flags (e.g. -r, --max-connections 4)
    and -d on demand; on exit stops the server, kills any worker it left
    behind and fails if the server had died by itself."""

    def __init__(self, nworkers, log_path, extra_args=(), debug=False):
        self.args = (nworkers, log_path, *extra_args)
        self.debug = debug or None  # None: -d only if PPSERVER_DEBUG is set
        self.handle = None

    def __enter__(self):
        self.handle = pphelpers.setup_or_fail(pphelpers.start_server, *self.args,
                                              debug=self.debug)
        return self.handle

    def __exit__(self, *exc):
        pphelpers.stop_server(self.handle)
        if exc[0] is not None:
            # Shown by pytest under "Captured stdout" of the failed test.
            print("--- ppserver log tail (%s) ---\n%s" % (self.handle.log_path,
                                                       self.handle.log_tail()))
        else:
            assert not self.handle.died_early, (
                "server exited on its own during the test; log:\n" + self.handle.log_tail())
        return False


# --- raw clients ---------------------------------------------------------------


def exec_session(server):
    return ppwire.open_session(server.host, server.port, server.secret, "EXEC")


def stat_roundtrip(server):
    """Handshake, STAT, one TIME request; returns (ncpus, seconds)."""
    sock = ppwire.open_session(server.host, server.port, server.secret, "STAT")
    try:
        ncpus = int(ppwire.recv_frame(sock))
        ppwire.send_frame(sock, "TIME")
        return ncpus, float(ppwire.recv_frame(sock))
    finally:
        sock.close()


def server_alive(server):
    return server.proc.poll() is None


def assert_died_text(text, how=None):
    """The (None, text) answer for a job whose worker died: says so, and how."""
    assert isinstance(text, str), repr(text)
    low = text.lower()
    assert all(w in low for w in DIED_WORDS), "no worker-died text: %r" % text
    if how is not None:
        assert any(h.lower() in low for h in how), "text does not say how (%s): %r" % (how, text)


def running_a_job(pid):
    """True if worker `pid` is not waiting for its next job: the syscall it
    is in (/proc/PID/syscall) is anything but a read of its stdin, where
    an idle worker waits. None where that cannot be told (the file
    unreadable, a machine whose read is not syscall 0)."""
    if platform.machine() != "x86_64":
        return None
    try:
        with open("/proc/%d/syscall" % pid) as f:
            fields = f.read().split()
    except OSError:
        return None
    if not fields:
        return None
    if fields[0] == "running":
        return True
    try:
        return not (fields[0] == "0" and int(fields[1], 16) == 0)
    except (IndexError, ValueError):
        return None


class Killer(threading.Thread):
    """Background thread that SIGKILLs a worker of `server` every `every`
    seconds until stopped, chosen at random among those running a job (a
    kill of an idle worker tests nothing a job could see); remembers the
    pids it killed. A round that finds no worker busy within `every`
    seconds kills nothing; where busy cannot be told, any worker is
    chosen."""

    def __init__(self, server, every, rng):
        super().__init__(daemon=True)
        self.server, self.every, self.rng = server, every, rng
        self.killed = []
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.wait(self.every):
            victim = self._busy_worker()
            if victim is not None and sigkill(victim):
                self.killed.append(victim)

    def _busy_worker(self):
        deadline = time.monotonic() + self.every
        while not self._stop_event.is_set():
            pids = sorted(worker_pids(self.server))
            busy = [pid for pid in pids if running_a_job(pid) is not False]
            if busy:
                return self.rng.choice(busy)
            if time.monotonic() >= deadline:
                return None
            self._stop_event.wait(0.01)
        return None

    def stop(self):
        self._stop_event.set()
        self.join(10)
