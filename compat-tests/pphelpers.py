"""Helpers shared by the compat tests: start/stop the server under test (any
command line, one launcher) and connect real ppft clients to it.

The server under test is chosen by ``PPSERVER_IMPL``:

- ``rust`` (default): the binary at ``$PPSERVER_BIN`` (default
  ``<repo>/target/release/ppserver``), run as
  ``ppserver -i 127.0.0.1 -p PORT -w N -s SECRET --python <sys.executable>``.
- ``python``: ppft's own network server, ``<sys.executable> -m ppft.server``,
  used to check that the suite itself is right.

``PPSERVER_DEBUG=1`` adds ``-d`` (debug log level) to the command line of the
servers start_server starts (not where a test passes debug=False, e.g. the
tests of -d itself).

Client families: the suite runs with whichever pp client this interpreter
has, ``ppft`` (1.7.8, or 1.6.6.4, which also installs a ``pp`` package) or
else pp 1.7.0's ``pp``: ``CLIENT`` is that module, ``FAMILY`` names it
(``ppft-1.7.8``, ``ppft-1.6.6.4``, ``pp-1.7.0``; ``ppft-1.7.8-pypy`` under
PyPy, ``INTERPRETER``) and ``CLIENT_VERSION`` is the version the server must
advertise. The server's workers run with this same interpreter, so they are
of the same family.
"""

import importlib
import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import procs

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

IMPL = os.environ.get("PPSERVER_IMPL", "rust").strip().lower()


def _import_client():
    for name in ("ppft", "pp"):
        try:
            return importlib.import_module(name)
        except ImportError:
            pass
    raise ImportError("neither ppft nor pp is installed in %s" % sys.executable)


# The pp client family under test: the ppft module, else pp 1.7.0's pp.
CLIENT = _import_client()
CLIENT_VERSION = CLIENT.__version__
# The interpreter of the clients and (the same) of the workers: "cpython", or
# "pypy" for the PyPy family, whose FAMILY says so ("ppft-1.7.8-pypy"): tests
# that run once, with CPython's ppft 1.7.8, compare FAMILY to "ppft-1.7.8".
INTERPRETER = sys.implementation.name
FAMILY = "%s-%s" % (CLIENT.__name__, CLIENT_VERSION) + (
    "" if INTERPRETER == "cpython" else "-" + INTERPRETER)
# The family that also runs the tests of the server's own behaviour (the
# modules marked server_behaviour; conftest deselects them in the others).
REFERENCE_FAMILY = "ppft-1.7.8"
# The module the server's workers run (python -u -m ...).
WORKER_MODULE = "ppft" if CLIENT.__name__ == "ppft" else "pp._worker"

# Non-trivial secret with punctuation and a space, like pp's default secret.
SECRET = "compat;secret 0f pp-tests"
DEFAULT_WORKERS = 2

STARTUP_TIMEOUT = 30.0  # seconds for the server to accept connections
LOG_TIMEOUT = 30.0  # seconds for a line the server logs to reach its log
CONNECT_TIMEOUT = 60.0  # seconds for a ppft client to open all its connections
STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL
SCRIPT_TIMEOUT = 90.0  # seconds for a client subprocess to finish


class SetupError(Exception):
    """The server or a client could not be brought up; message says why."""


def setup_or_fail(func, *args, **kwargs):
    """Call func; turn a SetupError into a plain pytest failure (no traceback,
    the message carries the server log)."""
    import pytest

    try:
        return func(*args, **kwargs)
    except SetupError as exc:
        message = str(exc)
    pytest.fail(message, pytrace=False)


def rust_binary():
    return Path(os.environ.get("PPSERVER_BIN", REPO / "target" / "release" / "ppserver"))


def python_server_module():
    """The module that runs the family's own Python ppserver."""
    return "ppft.server" if CLIENT.__name__ == "ppft" else "pp.cli"


def describe_impl():
    if IMPL == "python":
        impl = "python (%s -m %s)" % (sys.executable, python_server_module())
    else:
        impl = "rust (%s)" % rust_binary()
    return "%s; clients and workers: %s" % (impl, FAMILY)


@dataclass
class ServerHandle:
    """The running server under test."""

    impl: str
    host: str
    port: int
    secret: str
    nworkers: int
    proc: subprocess.Popen
    log_path: Path
    argv: list = field(default_factory=list)
    died_early: bool = False  # set by stop_server: had it exited by itself?

    @property
    def id(self):
        """The key ppft's client uses for this server in get_stats()."""
        return "%s:%d" % (self.host, self.port)

    def log(self):
        try:
            return self.log_path.read_text(errors="replace")
        except OSError as exc:
            return "<cannot read server log: %s>" % exc

    def log_tail(self, lines=80):
        return "\n".join(self.log().splitlines()[-lines:])

    def logged(self, text, timeout=LOG_TIMEOUT):
        """The first line of the log holding `text`, once it is there: the
        server's log is written by a thread of its own, so a line comes a
        moment after what it tells (the startup line after the socket
        listens, a job's line after its answer). Fails the test, with the
        log's tail, if it never comes within `timeout` seconds."""
        found = procs.wait_until(
            lambda: [line for line in self.log().splitlines() if text in line], timeout=timeout)
        if not found:
            raise AssertionError("no line with %r in the server log (%s) within %.0f s\n%s"
                                 % (text, self.log_path, timeout, self.log_tail()))
        return found[0]


# free_port picks ports from LOWEST_PORT up to the kernel's ephemeral range.
LOWEST_PORT = 10000
_port_rng = random.SystemRandom()


def _ephemeral_ports():
    """The range the kernel takes clients' (and port 0's) local ports from."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host="127.0.0.1"):
    """A TCP port of `host` nothing is bound to now, for a server about to
    start. Taken at random below the ephemeral range: a port the kernel
    handed out (bind to port 0) could be given again as the local port of
    one of the many client connections that tests running beside this one
    open (pytest-xdist), before the server binds it."""
    low, _ = _ephemeral_ports()
    if low - LOWEST_PORT >= 1000:
        for _ in range(100):
            port = _port_rng.randrange(LOWEST_PORT, low)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def server_command(*flags, python=None):
    """The server under test's command line with these flags: for ``rust``
    the binary, then ``--worker-start $PPSERVER_WORKER_START`` if that is
    set (scripts/test.sh runs the suite once with ``spawn``; a test's own
    ``--worker-start`` comes later and wins), the flags, then ``--python
    <this interpreter>`` (so its workers are of this client family); for
    ``python`` the family's own Python ppserver with the flags."""
    flags = [str(f) for f in flags]
    if IMPL == "python":
        return [python or sys.executable, "-m", python_server_module(), *flags]
    binary = rust_binary()
    if not binary.exists():
        raise SetupError(
            "ppserver binary not found at %s (build it with `cargo build --release` "
            "or set PPSERVER_BIN)" % binary
        )
    start = os.environ.get("PPSERVER_WORKER_START")
    chosen = ["--worker-start", start] if start else []
    return [str(binary), *chosen, *flags, "--python", python or sys.executable]


def server_env(extra=None, pythonpath=(HERE,)):
    """The environment the suite runs servers in: PYTHONPATH = `pythonpath`
    (default compat-tests/: workers import job functions from the test
    modules; None or () removes it: ppft's client, run in the pytest process,
    rewrites os.environ["PYTHONPATH"], which must not leak into the server),
    no PPSERVER_SECRET nor PP_SECRET, unbuffered Python output (so a Python server's
    statistics reach the log), plus `extra` (a value of None removes that
    variable)."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.pop("PPSERVER_SECRET", None)
    env.pop("PP_SECRET", None)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in pythonpath)
    env["PYTHONUNBUFFERED"] = "1"
    for key, value in (extra or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def default_sighup():
    """Run in a server's child before exec: SIGHUP at its default, so the
    server handles it whether or not the suite itself runs under nohup."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def launch(argv, log_path, *, port=None, host="127.0.0.1", secret=SECRET, nworkers=0,
           env=None, cwd=HERE, wait=True):
    """Start `argv` in its own session (process group), stdin from /dev/null,
    stdout and stderr to log_path, whose first line is the command line with
    `secret` masked (so tests can check that the server itself never logs
    it). Environment: `env`, default server_env().

    With wait=True, wait (bounded, STARTUP_TIMEOUT) until it accepts TCP
    connections on host:port; if it exits or never does, stop it and raise
    SetupError with its log. Returns a ServerHandle (stop it with
    stop_server)."""
    log_path = Path(log_path)
    shown = ["***" if secret and a == secret else a for a in map(str, argv)]
    with open(log_path, "wb") as logf:
        logf.write(("$ %s\n" % shlex.join(shown)).encode())
        logf.flush()
        proc = subprocess.Popen(
            argv,
            cwd=str(cwd),
            env=server_env() if env is None else env,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=default_sighup,
        )
    handle = ServerHandle(IMPL, host, port or 0, secret, nworkers, proc, log_path, list(argv))
    if wait:
        wait_listening(handle)
    return handle


def wait_listening(handle, timeout=STARTUP_TIMEOUT):
    """Wait (bounded) until the server accepts TCP connections on its
    host:port. If it exits first or never does, stop it and raise SetupError
    with the tail of its log."""

    def state():
        if handle.proc.poll() is not None:
            return "exited"
        try:
            with socket.create_connection((handle.host, handle.port), timeout=1.0):
                return "listening"
        except OSError:
            return None

    found = procs.wait_until(state, timeout=timeout)
    if found == "listening":
        return handle
    if found == "exited":
        problem = "server exited with code %s before accepting connections" % (
            handle.proc.returncode)
    else:
        problem = "server did not accept connections on %s within %.0f s" % (handle.id, timeout)
    stop_server(handle)
    raise SetupError("%s\n--- server log (%s) ---\n%s" % (problem, handle.log_path,
                                                          handle.log_tail()))


def start_server(nworkers, log_path, *flags, host="127.0.0.1", secret=SECRET,
                 with_secret=True, debug=None, env=None, cwd=HERE, pythonpath=(HERE,),
                 wait=True, python=None):
    """Start the server under test on a free port of `host` with
    ``-i HOST -p PORT -w NWORKERS [-s SECRET] [-d]`` and `flags`, and wait
    (bounded) until it accepts TCP connections (see launch). Raises
    SetupError with the server's log if it never does.

    -d is added when `debug` is true, or when it is None (the default) and
    ``PPSERVER_DEBUG`` is set; debug=False leaves it to `flags`.
    with_secret=False leaves out ``-s`` (the secret then comes from a flag or
    the environment; `secret` is still what clients should use).

    By default the server runs in this directory with PYTHONPATH set to it.
    Job functions that ppft's client finds in an importable module (anything
    not defined in ``__main__``: these test modules, userclasses) are shipped
    as ``from module import name``, not as source, so the workers must be able
    to import this directory. ``pythonpath=None`` removes PYTHONPATH from the
    server's environment entirely (see server_env); `env` replaces the whole
    environment.
    """
    port = free_port(host)
    base = ["-i", host, "-p", port, "-w", nworkers]
    if with_secret:
        base += ["-s", secret]
    if debug is None:
        debug = bool(os.environ.get("PPSERVER_DEBUG"))
    if debug and "-d" not in flags:
        base.append("-d")
    argv = server_command(*base, *flags, python=python)
    if env is None:
        env = server_env(pythonpath=pythonpath)
    return launch(argv, log_path, port=port, host=host, secret=secret, nworkers=nworkers,
                  env=env, cwd=cwd, wait=wait)


def stop_server(handle):
    """SIGTERM, then SIGKILL after STOP_GRACE; always reap. Then kill whatever
    is left of the server's process group, and SIGKILL any of its workers
    still around (our server puts each worker in its own process group, so
    killpg on the server's group does not reach them; PDEATHSIG normally
    does). Sets handle.died_early; returns the exit code the server had
    *before* we signalled it (None if it was still running)."""
    proc = handle.proc
    workers = procs.worker_pids(handle) if proc.poll() is None else set()
    exited_early = proc.poll()
    if exited_early is None:
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    handle.died_early = exited_early is not None
    for pid in workers:
        if procs.is_worker_cmdline(procs.cmdline(pid)):  # else gone (its pid maybe reused)
            procs.sigkill(pid)
    return exited_early


# --- the --metrics pages ------------------------------------------------------------

METRIC_SAMPLE = re.compile(r'^([a-z_]+)(\{[^}]*\})? (\S+)$')


def metrics_get(port, path, accept=None):
    """GET `path` from a server's --metrics port on 127.0.0.1; returns
    (content type, body)."""
    request = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path))
    if accept:
        request.add_header("Accept", accept)
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.headers.get("Content-Type"), response.read().decode()


def metric_samples(text):
    """{(name, labels): value} of a Prometheus text page."""
    found = {}
    for line in text.splitlines():
        m = METRIC_SAMPLE.match(line)
        if m:
            found[(m.group(1), m.group(2) or "")] = float(m.group(3))
    return found


# --- ppft clients -------------------------------------------------------------


def connect_client(server, secret=None, wait=True):
    """Create an in-process client (``CLIENT``: ppft or pp) that uses only the
    server under test (ncpus=0: no local workers).

    With wait=True, block (bounded) until the client has opened its STAT
    connection and all 2*nworkers EXEC connections, so tests start from a fully
    connected client; raises SetupError otherwise.
    """
    js = CLIENT.Server(
        ncpus=0,
        ppservers=(server.id,),
        secret=server.secret if secret is None else secret,
    )
    if wait:
        want = 2 * server.nworkers
        if not procs.wait_until(lambda: js.autopp_list.get(server.id, 0) >= want,
                                timeout=CONNECT_TIMEOUT):
            have = js.autopp_list.get(server.id, 0)
            close_client(js)
            raise SetupError(
                "ppft client opened %d of %d EXEC connections to %s within %.0f s\n"
                "--- server log ---\n%s"
                % (have, want, server.id, CONNECT_TIMEOUT, server.log_tail())
            )
    return js


def _client_sockets(js):
    """The client's TCP connections (ppft keeps them in name-mangled lists)."""
    rworkers = list(getattr(js, "_Server__rworkers", []))
    rworkers += list(getattr(js, "_Server__rworkers_reserved", []))
    stats = getattr(js, "_Server__stats", {})
    rworkers += [s.rworker for s in stats.values() if getattr(s, "rworker", None)]
    return [getattr(r, "socket", None) for r in rworkers]


def close_client(js):
    """destroy() the client and close its sockets, so the server sees the
    client go away instead of keeping idle connections until process exit
    (ppft's destroy() leaves remote connections open)."""
    try:
        js.destroy()
    finally:
        for sock in _client_sockets(js):
            if sock is None:
                continue
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                sock.close()
            except OSError:
                pass


def run_client_script(name, *args):
    """Start compat-tests/clients/<name> as a separate client process."""
    return subprocess.Popen(
        [sys.executable, str(HERE / "clients" / name), *map(str, args)],
        cwd=str(HERE),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish_client_script(proc, timeout=SCRIPT_TIMEOUT):
    """Wait (bounded) for a client script; returns (returncode, stdout, stderr).
    A script that does not finish is killed and fails the test."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # a process it started holds its pipes
            out = err = "<not read: the pipes stayed open after the script was killed>"
        raise AssertionError(
            "client script %s did not finish within %s s\nstdout:\n%s\nstderr:\n%s"
            % (shlex.join(proc.args), timeout, out, err)
        )
    return proc.returncode, out, err


def json_reports(procs, timeout=SCRIPT_TIMEOUT):
    """Waits for client scripts that each print a JSON report as their last
    line, failing the test if one fails; returns the reports in order.
    Scripts still running at the end (after a failure) are killed."""
    reports = []
    try:
        for proc in procs:
            code, out, err = finish_client_script(proc, timeout=timeout)
            assert code == 0, "client failed (%s)\nstdout:\n%s\nstderr:\n%s" % (code, out, err)
            reports.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return reports
