"""The server as a process that other tools start: pathos, ssh loops and
batch scripts read its output, wait for it to be ready, send it SIGHUP.

- On a pipe (a launcher reading its output) the server prints nothing at
  startup and in normal operation, like ppft's; -v shows the startup line,
  -q shows errors only. The default-secret warning waits for a client.
- --ready-file is written once the server can run jobs, holds host:port
  (useful with -p 0) and goes away when the server stops.
- SIGHUP is ignored if it was ignored at start (nohup).
- A client of another pp version leaves without a word; the server says
  why, once per host.
- pp 1.7.0's own server flags: -q, PP_SECRET, -n defaulting to 4.

No wall-clock thresholds: every wait is a generous upper bound.
"""

import os
import shlex
import signal
import subprocess
import sys
import threading
import time

import pytest

import pphelpers
import ppwire
import serverprocs as sp
from pphelpers import CLIENT, HERE, IMPL, SECRET, WORKER_MODULE, free_port, server_env
from procs import signal_masks, wait_until

# The server's own behaviour, whatever the client family: run with the
# ppft 1.7.8 family only (conftest.py deselects it in the others).
pytestmark = pytest.mark.server_behaviour

better_than_ppft = pytest.mark.better_than_ppft

PP170 = WORKER_MODULE == "pp._worker"
SILENCE = 3.0  # seconds of output watched for the silence checks


class PipedServer:
    """A server whose stdout and stderr are one pipe, read by a thread into
    `output`, as pathos and ssh read a server they launched."""

    def __init__(self, argv, env=None, shell_prefix=None):
        self.argv = [str(a) for a in argv]
        cmd = self.argv
        if shell_prefix:
            cmd = ["sh", "-c", "%s; exec %s" % (shell_prefix, shlex.join(self.argv))]
        self.proc = subprocess.Popen(
            cmd, cwd=str(HERE), env=env or server_env(), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=pphelpers.default_sighup)
        self.chunks = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        while True:
            data = self.proc.stdout.read1(65536)
            if not data:
                return
            self.chunks.append(data)

    def output(self):
        return b"".join(self.chunks).decode(errors="replace")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=pphelpers.STOP_GRACE)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        self.reader.join(timeout=10)


@pytest.fixture
def piped():
    started = []

    def start(*flags, secret=SECRET, env=None, shell_prefix=None, port=None):
        port = port or free_port()
        base = ["-i", "127.0.0.1", "-p", port, "-w", 1]
        if secret is not None:
            base += ["-s", secret]
        server = PipedServer(pphelpers.server_command(*base, *flags), env=env,
                             shell_prefix=shell_prefix)
        server.port = port
        server.secret = secret if secret is not None else sp.DEFAULT_SECRET
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def _handle(server):
    """A ServerHandle-like view of a PipedServer for the raw-protocol helpers."""
    return pphelpers.ServerHandle(IMPL, "127.0.0.1", server.port, server.secret, 1,
                                  server.proc, HERE / "unused.log")


def _wait_job(server):
    """Run a job, retrying (bounded) while the server is not listening yet;
    returns its result. Only whole sessions: a bare connect-and-close would
    make ppft's server print a traceback."""
    handle = _handle(server)
    result = []

    def attempt():
        if handle.proc.poll() is not None:
            raise AssertionError("server exited with %s; output:\n%s"
                                 % (handle.proc.returncode, server.output()))
        try:
            result.append(sp.raw_job(handle, "add", sp.ADD_SOURCE, (40, 2))[0])
            return True
        except ConnectionRefusedError:
            return False

    assert wait_until(attempt, timeout=pphelpers.STARTUP_TIMEOUT), (
        "server never accepted connections; output:\n%s" % server.output())
    return result[0]


def test_silent_on_a_pipe(piped):
    """Started with its output on a pipe, the server prints nothing at
    startup nor while it serves a job, as ppft's server does."""
    if IMPL == "python" and PP170:
        pytest.skip("pp 1.7.0's own server prints a banner at startup (this one stays "
                    "silent, as ppft's does, whatever the worker package)")
    server = piped()
    assert _wait_job(server) == 42
    # Stopped (SIGTERM, which prints nothing either) and read to its end:
    # output that would come late counts too.
    server.stop()
    assert server.output() == "", server.output()


@better_than_ppft(reason="ppft's server never says it uses the default secret")
def test_default_secret_warning_waits_for_a_client(piped, tmp_path):
    """With the default secret (pathos passes none) and a pipe, nothing is
    printed at startup; the warning about the secret comes when the first
    client connects."""
    ready = tmp_path / "ready"
    server = piped("--ready-file", ready, secret=None)
    assert wait_until(lambda: ready.exists() or server.proc.poll() is not None, timeout=60)
    assert ready.exists(), server.output()
    # What pathos does: watch the output for a few seconds after the start.
    time.sleep(SILENCE)
    assert server.output() == "", server.output()
    assert _wait_job(server) == 42
    assert wait_until(lambda: "default secret" in server.output(), timeout=30), (
        server.output())
    # Stopped and read to its end: the warning, once, is all it printed (a
    # line written at startup, however late it reached the pipe, would
    # come before it).
    server.stop()
    lines = server.output().splitlines()
    assert len(lines) == 1 and "default secret" in lines[0], server.output()


@better_than_ppft(reason="ppft's server has no -v")
def test_verbose_shows_the_startup_line_on_a_pipe(piped):
    server = piped("-v")
    assert _wait_job(server) == 42
    assert wait_until(lambda: "listening on" in server.output(), timeout=30), server.output()


@better_than_ppft(reason="ppft's server has no -q (pp 1.7.0's has)")
def test_quiet_shows_no_warnings(launch):
    """-q on a log file: no startup line, and a failed login (a warning)
    is not logged either."""
    server = launch("-q")
    assert sp.handshake_reply(server, "wrong secret") == b"FAILED"
    assert sp.raw_job(server, "add", sp.ADD_SOURCE, (1, 2))[0] == 3
    # Once it has exited (SIGTERM, which logs nothing under -q either), a
    # line the log thread had not written yet would be in the log.
    assert pphelpers.stop_server(server) is None, "the server exited by itself"
    lines = server.log().splitlines()[1:]  # the first line is the command
    assert lines == [], lines


@better_than_ppft(reason="ppft's server has no --ready-file")
def test_ready_file_with_a_port_picked_by_the_system(launch, tmp_path):
    """-p 0 --ready-file F: F appears once the server can run jobs, holds
    host:port where it listens, and is gone after SIGTERM."""
    ready = tmp_path / "ready"
    argv = pphelpers.server_command("-i", "127.0.0.1", "-p", 0, "-w", 1, "-s", SECRET,
                                    "--ready-file", ready)
    server = pphelpers.launch(argv, tmp_path / "server.log", wait=False)
    try:
        assert wait_until(lambda: ready.exists() or server.proc.poll() is not None,
                          timeout=60)
        assert ready.exists(), server.log_tail()
        host, port = ready.read_text().strip().rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0, ready.read_text()
        server.port = int(port)
        assert sp.raw_job(server, "add", sp.ADD_SOURCE, (20, 22))[0] == 42
        server.proc.send_signal(signal.SIGTERM)
        assert sp.wait_exit(server.proc) == 0, server.log_tail()
        assert not ready.exists(), "ready file left behind"
    finally:
        pphelpers.stop_server(server)


@better_than_ppft(reason="ppft's server has no --ready-file")
def test_ready_file_names_the_host_when_listening_everywhere(launch, tmp_path):
    import socket

    ready = tmp_path / "ready"
    server = launch("--ready-file", ready, host="0.0.0.0")
    assert wait_until(lambda: ready.exists(), timeout=60), server.log_tail()
    assert ready.read_text().strip() == "%s:%d" % (socket.gethostname(), server.port)


@better_than_ppft(reason="ppft's server has no --ready-file")
def test_no_ready_file_when_no_worker_can_start(tmp_path):
    ready = tmp_path / "ready"
    code, out, err = sp.run_to_exit(
        [str(pphelpers.rust_binary()), "-p", str(free_port()), "-s", SECRET,
         "--ready-file", str(ready), "--python", "/bin/false"])
    assert code != 0, (out, err)
    assert not ready.exists()


@better_than_ppft(reason="ppft's server dies on SIGHUP")
def test_sighup_stays_ignored_under_nohup(piped):
    """Started with SIGHUP ignored (as nohup does), the server keeps
    ignoring it and serving."""
    server = piped(shell_prefix="trap '' HUP")
    assert _wait_job(server) == 42
    # Ignored, not handled: the kernel discards a SIGHUP sent now, so there
    # is nothing left to happen later.
    ignored, caught = signal_masks(server.proc.pid)
    assert signal.SIGHUP in ignored and signal.SIGHUP not in caught, (ignored, caught)
    os.kill(server.proc.pid, signal.SIGHUP)
    assert _wait_job(server) == 42
    assert server.proc.poll() is None, "SIGHUP stopped a server started under nohup"


# Leaves once its connection thread has said (logged) that the versions
# differ, or after 60 s: a fixed nap could end before that thread ran.
MISMATCH_CLIENT = """
import logging, sys, time
import {module} as pp
said = []
class Said(logging.Handler):
    def emit(self, record):
        said.append(record.getMessage())
logging.basicConfig()  # the client's errors still reach stderr
logging.getLogger().addHandler(Said())
js = pp.Server(ncpus=0, ppservers=("127.0.0.1:%s" % sys.argv[1],), secret=sys.argv[2])
deadline = time.monotonic() + 60
while not any("mismatch" in m.lower() for m in said) and time.monotonic() < deadline:
    time.sleep(0.02)
js.destroy()
"""


@pytest.mark.family_specific  # each family's client leaves in its own way
@better_than_ppft(reason="ppft's server logs nothing when a client leaves silently")
def test_a_client_of_another_version_is_named_once(launch, tmp_path):
    """A real client that finds another pp version advertised leaves without
    a word; the server warns, naming the version, once for that host."""
    server = launch("--pp-version", "0.0.0-other")
    script = tmp_path / "client.py"
    script.write_text(MISMATCH_CLIENT.format(module=CLIENT.__name__))
    for _ in range(2):
        done = subprocess.run([sys.executable, str(script), str(server.port), SECRET],
                              cwd=str(HERE), capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)
        assert "mismatch" in (done.stdout + done.stderr).lower(), done
    assert wait_until(lambda: "another version" in server.log(), timeout=30), (
        server.log_tail())
    warnings = [l for l in server.log().splitlines() if "another version" in l]
    assert len(warnings) == 1, warnings
    assert "0.0.0-other" in warnings[0]


@pytest.mark.family_specific  # PP_SECRET counts with pp 1.7.0's workers only
@better_than_ppft(reason="only pp 1.7.0's server reads PP_SECRET")
def test_pp_secret_only_for_pp170_workers(launch):
    """PP_SECRET is the secret when the workers are pp 1.7.0's (whose
    clients read it too); with ppft workers it is ignored, since ppft and
    pathos clients never read it."""
    env = server_env({"PP_SECRET": "shared via PP_SECRET"})
    server = launch(with_secret=False, secret="shared via PP_SECRET", env=env)
    if PP170:
        assert sp.handshake_reply(server, "shared via PP_SECRET") == b"OK"
        assert sp.raw_job(server, "add", sp.ADD_SOURCE, (2, 3))[0] == 5
        js = pphelpers.connect_client(server)
        try:
            assert js.submit(sum, ([1, 2, 3],))() == 6
        finally:
            pphelpers.close_client(js)
    else:
        assert sp.handshake_reply(server, "shared via PP_SECRET") == b"FAILED"
        assert sp.handshake_reply(server, sp.DEFAULT_SECRET) == b"OK"


@pytest.mark.family_specific  # the default depends on the family's workers
def test_result_pickle_protocol_defaults_like_the_familys_server(launch):
    """-n defaults to 2 with ppft workers and 4 with pp 1.7.0's, as each
    family's own server does: the worker pickles results with it."""
    server = launch()
    sock = ppwire.open_session(server.host, server.port, server.secret, "EXEC")
    try:
        ppwire.send_job(sock, ppwire.function_package("add", [sp.ADD_SOURCE]), (1, 1))
        raw = ppwire.recv_frame(sock)
    finally:
        sock.close()
    assert raw[:2] == (b"\x80\x04" if PP170 else b"\x80\x02"), raw[:16]
