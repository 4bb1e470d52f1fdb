"""Helpers for the fault-tolerance and limits tests (test_faults.py,
test_limits.py, test_leaks.py): look at the server process from outside
(its worker children, open fds, memory), wait for things to happen within a
bounded time, and start extra servers with extra command-line flags.

Linux only: everything here reads /proc. Nothing here asserts timing: the
waits are bounded only so that a server that never gets there fails the test
instead of hanging it.
"""

import os
import shlex
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pphelpers
import ppwire
from pphelpers import IMPL, HERE, SetupError, ServerHandle

WORKER_MODULES = ("ppft", "pp._worker")

# Text our server puts in (None, text) when a job's worker died.
DIED_WORDS = ("worker", "died")


# --- /proc ---------------------------------------------------------------------


def stat_fields(pid):
    """(state, ppid) of a process from /proc/<pid>/stat, or None if gone."""
    try:
        data = Path("/proc/%d/stat" % pid).read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm may contain spaces and parentheses: split after the last ')'.
    rest = data[data.rindex(b")") + 2:].split()
    return rest[0].decode(), int(rest[1])


def children(pid):
    """{child pid: state letter} of every child of `pid`, zombies included.
    (/proc/<pid>/task/*/children is not always compiled in: scan /proc.)"""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = stat_fields(int(entry))
        if fields is not None and fields[1] == pid:
            found[int(entry)] = fields[0]
    return found


def cmdline(pid):
    try:
        raw = Path("/proc/%d/cmdline" % pid).read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def is_worker_cmdline(argv):
    """`python -u -m ppft` (or pp._worker): a pp worker process."""
    return "-m" in argv and argv.index("-m") + 1 < len(argv) and \
        argv[argv.index("-m") + 1] in WORKER_MODULES


def worker_pids(server):
    """Live (not zombie) worker processes of the server."""
    return {
        pid
        for pid, state in children(server.proc.pid).items()
        if state != "Z" and is_worker_cmdline(cmdline(pid))
    }


def zombie_children(server):
    return {pid for pid, state in children(server.proc.pid).items() if state == "Z"}


def fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def fd_targets(pid):
    """What the process's fds point at (for messages about a leak)."""
    out = []
    for fd in sorted(os.listdir("/proc/%d/fd" % pid), key=int):
        try:
            out.append("%s -> %s" % (fd, os.readlink("/proc/%d/fd/%s" % (pid, fd))))
        except OSError:
            pass
    return out


def status_kib(pid, field):
    """A `kB` field of /proc/<pid>/status (VmRSS, VmSize, VmHWM...)."""
    for line in Path("/proc/%d/status" % pid).read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rss_kib(pid):
    return status_kib(pid, "VmRSS")


def exists(pid):
    """True while `pid` exists at all (a zombie still exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- bounded waits -------------------------------------------------------------


def wait_until(probe, what, timeout=30.0, interval=0.05):
    """Call probe() until it returns something truthy; return that. After
    `timeout` seconds fail with `what` and the last value probe returned."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("%s (still not the case after %.0f s; last: %r)"
                                 % (what, timeout, value))
        time.sleep(interval)


def wait_for_pool(server, exclude=(), timeout=60.0):
    """Wait until the server has exactly its nworkers live worker processes,
    none of them in `exclude`, and no zombie children; return their pids."""
    exclude = set(exclude)
    last = {}

    def probe():
        pids = worker_pids(server)
        last["pids"], last["zombies"] = pids, zombie_children(server)
        return len(pids) == server.nworkers and not (pids & exclude) and not last["zombies"]

    try:
        wait_until(probe, "pool of %d workers (excluding %s)" % (server.nworkers, sorted(exclude)),
                   timeout)
    except AssertionError as exc:
        raise AssertionError("%s; workers %s, zombies %s" % (
            exc, sorted(last.get("pids", ())), sorted(last.get("zombies", ()))))
    return last["pids"]


def wait_settled(probe, limit, what, timeout=30.0):
    """Wait until probe() <= limit (e.g. an fd count drifting back to its
    baseline as the server notices closed connections); returns the value."""
    seen = []

    def ok():
        seen.append(probe())
        return seen[-1] <= limit

    try:
        wait_until(ok, "%s: want <= %s" % (what, limit), timeout, interval=0.2)
    except AssertionError as exc:
        raise AssertionError("%s; last values %s" % (exc, seen[-10:])) from None
    return seen[-1]


def finished_within(job, timeout):
    """Wait for a ppft job (its `finished` flag) for at most `timeout` s."""
    deadline = time.monotonic() + timeout
    while not job.finished:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# --- servers with extra flags ----------------------------------------------------


def start_server(nworkers, log_path, extra_args=(), debug=False, secret=pphelpers.SECRET,
                 host="127.0.0.1"):
    """Like pphelpers.start_server (same cwd, PYTHONPATH and secret), with
    extra command-line flags (e.g. -r, --max-connections 4) and -d on demand.
    The command line echoed at the top of the log has the secret masked, so
    tests can check that the server itself never logs it."""
    port = pphelpers.free_port(host)
    argv = pphelpers.server_argv(host, port, secret, nworkers) + list(extra_args)
    if debug and "-d" not in argv:
        argv.append("-d")
    shown = ["***" if a == secret else a for a in argv]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(HERE)
    with open(log_path, "wb") as logf:
        logf.write(("$ %s\n" % shlex.join(shown)).encode())
        logf.flush()
        proc = subprocess.Popen(argv, cwd=str(HERE), env=env, stdin=subprocess.DEVNULL,
                                stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    handle = ServerHandle(IMPL, host, port, secret, nworkers, proc, Path(log_path), argv)
    deadline = time.monotonic() + pphelpers.STARTUP_TIMEOUT
    while True:
        if proc.poll() is not None:
            error = "server exited with code %s at startup" % proc.returncode
            break
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return handle
        except OSError:
            pass
        if time.monotonic() > deadline:
            error = "server did not accept connections on %s" % handle.id
            break
        time.sleep(0.1)
    pphelpers.stop_server(handle)
    raise SetupError("%s\n--- server log ---\n%s" % (error, handle.log_tail()))


class ExtraServer:
    """Context manager around start_server; on exit stops the server, kills
    any worker it left behind and fails if the server had died by itself."""

    def __init__(self, nworkers, log_path, extra_args=(), debug=False):
        self.args = (nworkers, log_path, extra_args, debug)
        self.handle = None

    def __enter__(self):
        self.handle = pphelpers.setup_or_fail(start_server, *self.args)
        return self.handle

    def __exit__(self, *exc):
        stop_server_and_workers(self.handle)
        if exc[0] is not None:
            # Shown by pytest under "Captured stdout" of the failed test.
            print("--- ppserver log tail (%s) ---\n%s" % (self.handle.log_path,
                                                       self.handle.log_tail()))
        else:
            assert not getattr(self.handle, "died_early", False), (
                "server exited on its own during the test; log:\n" + self.handle.log_tail())
        return False


def stop_server_and_workers(server):
    """pphelpers.stop_server, plus SIGKILL to workers still around (our
    server puts each worker in its own process group, so killpg on the
    server's group does not reach them; PDEATHSIG normally does)."""
    workers = worker_pids(server) if server.proc.poll() is None else set()
    server.died_early = pphelpers.stop_server(server) is not None
    for pid in workers:
        if not is_worker_cmdline(cmdline(pid)):
            continue  # gone already (and its pid maybe reused)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --- raw clients ---------------------------------------------------------------


def exec_session(server):
    return ppwire.open_session(server.host, server.port, server.secret, "EXEC")


def run_raw_job(server, sfunc, args, timeout=ppwire.SOCKET_TIMEOUT):
    """One job on a fresh EXEC connection; returns the unpickled answer."""
    sock = exec_session(server)
    try:
        sock.settimeout(timeout)
        ppwire.send_job(sock, sfunc, args)
        return ppwire.recv_result(sock)
    finally:
        sock.close()


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


class Killer(threading.Thread):
    """Background thread that SIGKILLs a random worker of `server` every
    `every` seconds until stopped; remembers the pids it killed."""

    def __init__(self, server, every, rng):
        super().__init__(daemon=True)
        self.server, self.every, self.rng = server, every, rng
        self.killed = []
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.wait(self.every):
            pids = sorted(worker_pids(self.server))
            if not pids:
                continue
            victim = self.rng.choice(pids)
            try:
                os.kill(victim, signal.SIGKILL)
                self.killed.append(victim)
            except ProcessLookupError:
                pass

    def stop(self):
        self._stop_event.set()
        self.join(10)
