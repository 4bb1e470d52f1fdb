"""Run the server under test with any command line, and watch its processes.

Used by the flag, signal and autodiscovery tests, which need command lines
the ``ppserver`` fixture does not use (``-t``, ``-c``, no ``-s``...).

``server_command(*flags)`` is the command line of the server under test
(``PPSERVER_IMPL``) followed by the flags: for ``rust`` the binary with
``--python <this interpreter>`` (so its workers are of this client family);
for ``python`` the family's own Python ppserver. ``launch`` starts it with its
stdout and stderr in one log file; ``run_to_exit`` runs a command line that
is expected to exit by itself. No wall-clock thresholds: every wait here is a
generous upper bound for something to happen, never a check that it happened
fast.
"""

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import ppwire
from pphelpers import (
    HERE,
    IMPL,
    SECRET,
    STARTUP_TIMEOUT,
    ServerHandle,
    SetupError,
    free_port,
    python_server_module,
    rust_binary,
)

DEFAULT_SECRET = "epo20pdosl;dksldkmm"  # pp's public default secret
EXIT_TIMEOUT = 60.0  # seconds for a server to exit once it should


def server_command(*flags, python=None):
    """The server under test's command line with these flags."""
    flags = [str(f) for f in flags]
    if IMPL == "python":
        return [python or sys.executable, "-m", python_server_module(), *flags]
    binary = rust_binary()
    if not binary.exists():
        raise SetupError("ppserver binary not found at %s" % binary)
    return [str(binary), *flags, "--python", python or sys.executable]


def server_env(extra=None, pythonpath=(HERE,)):
    """The environment the suite runs servers in: PYTHONPATH = compat-tests/
    (workers import job functions from the test modules), unbuffered Python
    output (so a Python server's statistics reach the log), plus `extra`
    (a value of None removes that variable)."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.pop("PPSERVER_SECRET", None)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in pythonpath)
    env["PYTHONUNBUFFERED"] = "1"
    for key, value in (extra or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def launch(argv, log_path, *, port=None, host="127.0.0.1", secret=SECRET, nworkers=0,
           env=None, cwd=HERE, wait=True):
    """Start `argv` (stdout and stderr to log_path) in its own session.
    With wait=True, wait (bounded) until it accepts TCP connections on
    host:port; raises SetupError with the log if it exits or never does.
    Returns a pphelpers.ServerHandle (stop it with pphelpers.stop_server)."""
    log_path = Path(log_path)
    with open(log_path, "wb") as logf:
        logf.write(("$ %s\n" % shlex.join(argv)).encode())
        logf.flush()
        proc = subprocess.Popen(
            argv,
            cwd=str(cwd),
            env=server_env() if env is None else env,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    handle = ServerHandle(IMPL, host, port or 0, secret, nworkers, proc, log_path, list(argv))
    if wait:
        wait_listening(handle)
    return handle


def wait_listening(handle, timeout=STARTUP_TIMEOUT):
    deadline = time.monotonic() + timeout
    while True:
        code = handle.proc.poll()
        if code is not None:
            problem = "server exited with code %s before accepting connections" % code
            break
        try:
            with socket.create_connection((handle.host, handle.port), timeout=1.0):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            problem = "server did not accept connections on %s within %.0f s" % (
                handle.id, timeout)
            break
        time.sleep(0.05)
    kill_group(handle.proc)
    raise SetupError("%s\n--- server log (%s) ---\n%s" % (problem, handle.log_path,
                                                          handle.log_tail()))


def start(tmp_path, *flags, name="server", secret=SECRET, nworkers=1, with_secret=True,
          env=None, wait=True):
    """Start the server under test on a free port of 127.0.0.1 with
    `-i 127.0.0.1 -p PORT [-s secret] -w nworkers` and `flags`."""
    port = free_port()
    base = ["-i", "127.0.0.1", "-p", port, "-w", nworkers]
    if with_secret:
        base += ["-s", secret]
    argv = server_command(*base, *flags)
    return launch(argv, Path(tmp_path) / (name + ".log"), port=port, secret=secret,
                  nworkers=nworkers, env=env, wait=wait)


def run_to_exit(argv, timeout=EXIT_TIMEOUT, env=None):
    """Run a command line that should exit by itself; returns
    (returncode, stdout, stderr). One that does not exit in time is killed and
    fails the test."""
    try:
        done = subprocess.run(argv, cwd=str(HERE), env=server_env() if env is None else env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, start_new_session=True)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError("%s did not exit within %s s; output:\n%s\n%s"
                             % (shlex.join(argv), timeout, exc.stdout, exc.stderr))
    return done.returncode, done.stdout, done.stderr


def wait_exit(proc, timeout=EXIT_TIMEOUT):
    """The process's exit code, or None if it is still running after timeout."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def kill_group(proc):
    """SIGKILL the process and its process group; reap it."""
    for kill in (lambda: os.killpg(proc.pid, signal.SIGKILL), proc.kill):
        try:
            kill()
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()


def wait_until(predicate, timeout=EXIT_TIMEOUT, interval=0.05):
    """Poll predicate() until it is true (returns True) or timeout (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


# --- processes --------------------------------------------------------------


def _stat(pid):
    """(state, ppid) of a process from /proc, or None if it does not exist."""
    try:
        text = Path("/proc/%d/stat" % pid).read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1])


def children(pid):
    """Pids of the live (not zombie) child processes of `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None and st[1] == pid and st[0] != "Z":
                found.append(int(entry))
    return sorted(found)


def is_gone(pid):
    """True if the process no longer runs: it does not exist or is a zombie."""
    st = _stat(pid)
    return st is None or st[0] == "Z"


def worker_pids(server, count, timeout=STARTUP_TIMEOUT):
    """Wait (bounded) until the server has `count` live child processes (its
    workers); returns their pids."""
    found = []

    def enough():
        found[:] = children(server.proc.pid)
        return len(found) >= count

    assert wait_until(enough, timeout), "server has children %r, expected %d workers\n%s" % (
        found, count, server.log_tail())
    return found


# --- raw protocol shortcuts -------------------------------------------------

PID_SOURCE = "def worker_pid():\n    import os\n    return os.getpid()\n"
NAP_SOURCE = "def nap(seconds):\n    import time\n    time.sleep(seconds)\n    return seconds\n"
ADD_SOURCE = "def add(a, b):\n    return a + b\n"
# Writes the worker's pid to `path` once the job runs, then sleeps.
MARKED_NAP_SOURCE = (
    "def marked_nap(path, seconds):\n"
    "    import os, time\n"
    "    with open(path + '.tmp', 'w') as f:\n"
    "        f.write(str(os.getpid()))\n"
    "    os.rename(path + '.tmp', path)\n"
    "    time.sleep(seconds)\n"
    "    return seconds\n"
)


def start_marked_nap(server, path, seconds=600):
    """Open an EXEC connection and run a job that sleeps `seconds`; wait
    (bounded) until it runs on a worker; returns (socket, worker pid)."""
    sock = ppwire.open_session(server.host, server.port, server.secret, "EXEC")
    ppwire.send_job(sock, ppwire.function_package("marked_nap", [MARKED_NAP_SOURCE]),
                    (str(path), seconds))
    if not wait_until(lambda: Path(path).exists(), STARTUP_TIMEOUT):
        sock.close()
        raise AssertionError("the job never started on a worker\n%s" % server.log_tail())
    return sock, int(Path(path).read_text())


def raw_job(server, name, source, args, secret=None):
    """Run one job over a fresh raw EXEC connection; returns (result, out)."""
    sock = ppwire.open_session(server.host, server.port, secret or server.secret, "EXEC")
    try:
        ppwire.send_job(sock, ppwire.function_package(name, [source]), args)
        return ppwire.recv_result(sock)
    finally:
        sock.close()


def stat_workers(server, secret=None):
    """The worker count a STAT connection reports."""
    sock = ppwire.open_session(server.host, server.port, secret or server.secret, "STAT")
    try:
        return int(ppwire.recv_frame(sock))
    finally:
        sock.close()


def handshake_reply(server, secret):
    """The server's answer (b"OK" or b"FAILED") to a client with `secret`."""
    sock = ppwire.connect(server.host, server.port)
    try:
        return ppwire.handshake(sock, secret)[2]
    finally:
        sock.close()
