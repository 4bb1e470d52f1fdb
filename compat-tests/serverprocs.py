"""Server command lines that are expected to exit, and raw protocol
shortcuts, for the flag, signal and autodiscovery tests.

Those tests start servers with command lines the ``ppserver`` fixture does
not use (``-t``, ``-c``, no ``-s``...): through conftest's ``launch``
fixture (pphelpers.start_server) or pphelpers.launch with
pphelpers.server_command; they watch its processes with procs.py.
``run_to_exit`` runs a command line that is expected to exit by itself. No
wall-clock thresholds: every wait here is a generous upper bound for
something to happen, never a check that it happened fast.
"""

import shlex
import subprocess
from pathlib import Path

import ppwire
from pphelpers import HERE, STARTUP_TIMEOUT, server_env
from procs import wait_until

DEFAULT_SECRET = "epo20pdosl;dksldkmm"  # pp's public default secret
EXIT_TIMEOUT = 60.0  # seconds for a server to exit once it should


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
    if not wait_until(lambda: Path(path).exists(), timeout=STARTUP_TIMEOUT):
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
