"""Every ppserver flag, with real server processes and real clients.

Each test starts its own server(s) on free ports of 127.0.0.1 (conftest's
``launch`` fixture, or pphelpers.launch). Flags that ppft's own ppserver has
(-t -k -P -f -d -r -n) are also checked against it with PPSERVER_IMPL=python;
the others (-c, which needs configobj there, --secret-file, PPSERVER_SECRET,
--python, --pp-version and the command-line checks) are ours alone. No
wall-clock thresholds: waits are generous upper bounds, and the only time
comparisons are lower bounds ("did not exit before -t seconds"), which a slow
machine cannot break.
"""

import subprocess
import sys
import time

import pytest

import pphelpers
import ppwire
import serverprocs as sp
from pphelpers import (
    FAMILY,
    IMPL,
    STARTUP_TIMEOUT,
    close_client,
    connect_client,
    free_port,
    rust_binary,
    server_command,
    server_env,
    setup_or_fail,
    stop_server,
)
from procs import held_connections, wait_until

# The server's own behaviour, whatever the client family: run with the
# ppft 1.7.8 family only (conftest.py deselects it in the others).
pytestmark = pytest.mark.server_behaviour

ours_only = pytest.mark.skipif(
    IMPL == "python", reason="not a flag (or behaviour) of ppft's own ppserver"
)


def pid_and_square(x):
    import os

    return os.getpid(), x * x


def triple(x):
    return 3 * x


def log_lines(server):
    """The server's output lines (without the command line we logged)."""
    return server.log().splitlines()[1:]


def assert_clean_failure(code, out, err, *needles):
    """A command line refused the way a user should see it: non-zero exit,
    a message naming what is wrong, no panic."""
    assert code not in (0, None), "exited %r\nstdout:\n%s\nstderr:\n%s" % (code, out, err)
    assert "panicked" not in err, err
    for needle in needles:
        assert needle in err, "%r not in the error message:\n%s" % (needle, err)


# --- -t: exit when no client has been connected for that long ---------------


def test_t_exits_when_no_client_connects(launch):
    """With -t 2 and no client at all, the server exits by itself with code 0,
    and not before 2 s have passed."""
    started = time.monotonic()
    server = launch("-t", 2, wait=False)
    code = sp.wait_exit(server.proc)
    waited = time.monotonic() - started
    assert code == 0, "server still running or failed (%r)\n%s" % (code, server.log_tail())
    assert waited >= 2.0, "exited after %.2f s, before the -t 2 limit" % waited


def _authenticated_stat(server):
    """Open and authenticate a STAT connection as soon as the server listens.
    Returns the socket, or None if the server exited (with code 0: it did
    what -t says) before it could be done."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            assert server.proc.returncode == 0, server.log_tail()
            return None
        try:
            sock = ppwire.open_session(server.host, server.port, server.secret, "STAT")
            assert int(ppwire.recv_frame(sock)) == server.nworkers
            return sock
        except (OSError, ppwire.ClosedError):
            time.sleep(0.02)
    raise AssertionError("could not open a STAT connection\n%s" % server.log_tail())


def test_t_does_not_exit_while_a_client_is_connected(launch):
    """With -t 2, a server with a client connected for 7 s keeps running (and
    running jobs) the whole time; once the client leaves it exits with code 0,
    not before 2 s later."""
    for attempt in range(3):
        server = launch("-t", 2, nworkers=1, wait=False)
        guard = _authenticated_stat(server)
        if guard is not None:
            break
        # The machine stalled for longer than -t between the server's start
        # and our connection: the server rightly exited. Try again.
    else:
        pytest.fail("never got a client connected within -t 2 of the server's start")
    try:
        js = connect_client(server)
        try:
            held_until = time.monotonic() + 7.0
            n = 0
            while time.monotonic() < held_until:
                assert server.proc.poll() is None, (
                    "server exited (%s) with clients connected\n%s"
                    % (server.proc.returncode, server.log_tail())
                )
                assert js.submit(triple, (n,))() == 3 * n
                n += 1
                time.sleep(0.5)
        finally:
            close_client(js)
    finally:
        guard.close()
    left = time.monotonic()
    code = sp.wait_exit(server.proc)
    waited = time.monotonic() - left
    assert code == 0, "server did not exit after its clients left (%r)\n%s" % (
        code, server.log_tail())
    assert waited >= 2.0 - 0.1, "exited %.2f s after the last client left" % waited


# --- -k: socket timeout ------------------------------------------------------


def test_k_closes_idle_connections_not_busy_ones(launch):
    """With -k 2, EXEC and STAT connections that stay idle are closed by the
    server, while a connection whose job runs longer than that (4 s) still
    gets its result and then runs the next job."""
    server = launch("-k", 2, nworkers=2)
    idle_exec = ppwire.open_session(server.host, server.port, server.secret, "EXEC")
    idle_stat = ppwire.open_session(server.host, server.port, server.secret, "STAT")
    busy = ppwire.open_session(server.host, server.port, server.secret, "EXEC")
    try:
        assert int(ppwire.recv_frame(idle_stat)) == 2
        ppwire.send_job(busy, ppwire.function_package("nap", [sp.NAP_SOURCE]), (4,))
        assert ppwire.is_closed(idle_exec), "idle EXEC connection not closed"
        assert ppwire.is_closed(idle_stat), "idle STAT connection not closed"
        assert ppwire.recv_result(busy)[0] == 4, "the long job lost its result"
        ppwire.send_job(busy, ppwire.function_package("add", [sp.ADD_SOURCE]), (2, 3))
        assert ppwire.recv_result(busy)[0] == 5
    finally:
        for sock in (idle_exec, idle_stat, busy):
            sock.close()


@pytest.mark.family_specific  # how each family's client reconnects and resends
@pytest.mark.skipif(
    FAMILY == "pp-1.7.0" and pphelpers.IMPL == "python",
    reason="pp 1.7.0's client keeps its package send cache across reconnects, so on a "
    "connection the server dropped it resends jobs as H+hash the new connection never "
    "saw; pp 1.7.0's own server closes it and the client retries forever (ours keeps "
    "packages server-wide, as ppft's server does)",
)
def test_k_client_idle_for_longer_still_gets_its_jobs_done(launch):
    """With -k 2, a client idle for longer has its connections dropped; its
    next jobs are still all done (it reconnects: its own fault tolerance,
    which needs the server to serve the new connections normally)."""
    server = launch("-k", 2, nworkers=2)
    js = connect_client(server)
    try:
        assert [js.submit(triple, (i,))() for i in range(3)] == [0, 3, 6]
        # Idle past -k: wait until the server has dropped every connection.
        wait_until(lambda: not held_connections(server),
                   "the server to drop the idle client's connections", timeout=30)
        jobs = [js.submit(triple, (i,)) for i in range(10)]
        assert [job() for job in jobs] == [3 * i for i in range(10)]
    finally:
        close_client(js)


# --- -P: pid file --------------------------------------------------------------


def test_P_writes_the_server_pid(launch, tmp_path):
    """-P writes the server's pid to the file (its removal at exit is checked
    with the stop signals, test_signals.py)."""
    pid_file = tmp_path / "ppserver.pid"
    server = launch("-P", pid_file)
    assert wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), timeout=60), (
        "no pid file\n%s" % server.log_tail())
    assert int(pid_file.read_text().strip()) == server.proc.pid


def test_the_pid_file_and_startup_line_are_written_before_the_port_accepts(launch, tmp_path):
    """A launcher that waits for the port, then reads the pid file and the
    startup line, finds both: the server listens only once they are written
    (the log by a thread of its own, flushed first). Checked at once, with
    no wait: that order is the promise under test."""
    pid_file = tmp_path / "ppserver.pid"
    server = launch("-P", pid_file)  # returns once the port accepts
    assert pid_file.read_text() == "%d\n" % server.proc.pid
    assert "ppserver listening on 127.0.0.1:%d with " % server.port in server.log(), (
        server.log_tail())


# --- -f and -d: logging -------------------------------------------------------

DEFAULT_FORMAT_MARKS = (" - DEBUG - ", " - INFO - ", " - WARNING - ", " - ERROR - ")


def _some_traffic(server):
    assert sp.stat_workers(server) == server.nworkers
    assert sp.raw_job(server, "add", sp.ADD_SOURCE, (1, 2))[0] == 3


def test_f_custom_log_format(launch):
    """-f "PPLOG %(levelname)s %(message)s" with -d: the debug lines about a
    client's connections come out in that format, and no line in the default
    format does."""
    server = launch("-d", "-f", "PPLOG %(levelname)s %(message)s")
    _some_traffic(server)
    assert wait_until(
        lambda: any(line.startswith("PPLOG DEBUG ") for line in log_lines(server)), timeout=30
    ), server.log_tail()
    for line in log_lines(server):
        assert not any(mark in line for mark in DEFAULT_FORMAT_MARKS), line


@ours_only
def test_f_bad_format_is_refused(tmp_path):
    """-f with an unknown field exits non-zero naming -f, without a panic."""
    argv = server_command("-i", "127.0.0.1", "-p", free_port(), "-f", "%(bogus)s")
    assert_clean_failure(*sp.run_to_exit(argv), "-f")


def test_d_adds_debug_lines(launch):
    """Only the server started with -d logs debug lines for the same client
    traffic."""
    quiet = launch(name="quiet")
    loud = launch("-d", name="loud")
    _some_traffic(quiet)
    _some_traffic(loud)
    assert wait_until(lambda: " - DEBUG - " in loud.log(), timeout=30), loud.log_tail()
    # Once it has exited (SIGTERM: it writes out its log as it exits), every
    # line the quiet server had about that traffic is in its log.
    stop_server(quiet)
    assert " - DEBUG - " not in quiet.log(), quiet.log_tail()


# --- -c: config file ------------------------------------------------------------

FILE_SECRET = "secret from the config; file"


def _config(tmp_path, port, pid_file, extra_general=""):
    conf = tmp_path / "ppserver.conf"
    conf.write_text(
        "# ppserver config\n"
        "[general]\n"
        "secret = %s\n"
        "workers = 3\n"
        "debug = true\n"
        "pid_file = %s\n"
        "%s"
        "\n"
        "[network]\n"
        "interface = 127.0.0.1\n"
        "port = %d\n"
        "socket_timeout = 600\n" % (FILE_SECRET, pid_file, extra_general, port)
    )
    return conf


def _launch_with_config(tmp_path, name, flags, port, secret, nworkers):
    argv = server_command(*flags)
    return setup_or_fail(pphelpers.launch, argv, tmp_path / (name + ".log"), port=port,
                         secret=secret, nworkers=nworkers)


@ours_only
def test_c_config_file_is_honoured(tmp_path):
    """-c FILE alone: the file's port, secret, worker count, debug and pid file
    are used (a client with the file's secret runs jobs; STAT says 3 workers;
    the default secret is refused)."""
    port = free_port()
    pid_file = tmp_path / "from-config.pid"
    conf = _config(tmp_path, port, pid_file)
    server = _launch_with_config(tmp_path, "config", ["-c", conf], port, FILE_SECRET, 3)
    try:
        assert sp.stat_workers(server) == 3
        assert sp.handshake_reply(server, sp.DEFAULT_SECRET) == b"FAILED"
        js = connect_client(server)
        try:
            assert [js.submit(triple, (i,))() for i in range(6)] == [0, 3, 6, 9, 12, 15]
        finally:
            close_client(js)
        assert wait_until(lambda: pid_file.exists(), timeout=60), server.log_tail()
        assert int(pid_file.read_text().strip()) == server.proc.pid
        assert wait_until(lambda: " - DEBUG - " in server.log(), timeout=30), (
            "debug = true in the file was ignored")
    finally:
        stop_server(server)


@ours_only
def test_c_later_flags_override_the_file(tmp_path):
    """Flags after -c override the file (-w, -s); flags before it are
    replaced by the file's values, as in ppft."""
    port = free_port()
    conf = _config(tmp_path, port, tmp_path / "unused.pid")
    server = _launch_with_config(
        tmp_path, "after", ["-c", conf, "-w", "1", "-s", "flag secret"], port, "flag secret", 1
    )
    try:
        assert sp.stat_workers(server) == 1
        assert sp.handshake_reply(server, FILE_SECRET) == b"FAILED"
        assert sp.raw_job(server, "add", sp.ADD_SOURCE, (20, 22))[0] == 42
    finally:
        stop_server(server)

    port = free_port()
    conf = _config(tmp_path, port, tmp_path / "unused.pid")
    server = _launch_with_config(tmp_path, "before", ["-w", "1", "-c", conf], port,
                                 FILE_SECRET, 3)
    try:
        assert sp.stat_workers(server) == 3
    finally:
        stop_server(server)


@ours_only
@pytest.mark.parametrize(
    "line, key",
    [("workers = many\n", "workers"), ("proto = 11\n", "proto"), ("restart = maybe\n", "restart")],
)
def test_c_invalid_value_is_refused(tmp_path, line, key):
    """A value that does not parse exits non-zero, naming the key."""
    conf = _config(tmp_path, free_port(), tmp_path / "x.pid", extra_general=line)
    code, out, err = sp.run_to_exit(server_command("-c", conf))
    assert_clean_failure(code, out, err, key)


# --- -r: restart workers after each job ------------------------------------------


def test_r_restarts_the_worker_after_each_job(launch):
    """-r with one worker: five jobs in a row give correct results from five
    different worker processes; without -r they all run in the same one."""
    for flags, expect_distinct in ((("-r",), 5), ((), 1)):
        server = launch(*flags, nworkers=1)
        js = connect_client(server)
        try:
            results = [js.submit(pid_and_square, (i,))() for i in range(5)]
        finally:
            close_client(js)
        assert [square for _, square in results] == [0, 1, 4, 9, 16]
        pids = [pid for pid, _ in results]
        assert len(set(pids)) == expect_distinct, (flags, pids)


# --- -n: pickle protocol of results -----------------------------------------------


@pytest.mark.family_specific  # the family's workers pickle the results
@pytest.mark.parametrize("proto", [2, 3, 4, 5])
def test_n_sets_the_result_pickle_protocol(launch, proto):
    """-n PROTO: the result frame a client gets is a pickle of that protocol
    (it starts with PROTO opcode 0x80 and the protocol number)."""
    server = launch("-n", proto)
    sock = ppwire.open_session(server.host, server.port, server.secret, "EXEC")
    try:
        ppwire.send_job(sock, ppwire.function_package("add", [sp.ADD_SOURCE]), (40, 2))
        frame = ppwire.recv_frame(sock)
    finally:
        sock.close()
    assert frame[:2] == b"\x80" + bytes([proto]), frame[:16]
    assert ppwire.dill.loads(frame)[0] == 42


# --- the secret: --secret-file and PPSERVER_SECRET --------------------------------


def _secret_works(server, secret):
    assert sp.handshake_reply(server, secret) == b"OK"
    assert sp.handshake_reply(server, sp.DEFAULT_SECRET) == b"FAILED"
    js = connect_client(server, secret=secret)
    try:
        assert js.submit(triple, (14,))() == 42
    finally:
        close_client(js)


@ours_only
def test_secret_file(launch, tmp_path):
    """--secret-file: the file's first line is the secret."""
    secret = "secret from a file; with spaces"
    path = tmp_path / "secret"
    path.write_text(secret + "\nthe second line is not part of it\n")
    server = launch("--secret-file", path, with_secret=False, secret=secret)
    _secret_works(server, secret)


@ours_only
def test_secret_from_environment(launch):
    """PPSERVER_SECRET is the secret when no flag gives one."""
    secret = "secret from the environment"
    server = launch(with_secret=False, secret=secret,
                    env=server_env({"PPSERVER_SECRET": secret}))
    _secret_works(server, secret)


# --- --pp-version --------------------------------------------------------------------


@ours_only
def test_pp_version_is_what_the_version_frame_says(launch):
    """--pp-version X: X is the first frame of every connection."""
    server = launch("--pp-version", "9.8.7.test")
    sock = ppwire.connect(server.host, server.port)
    try:
        assert ppwire.recv_frame(sock) == b"9.8.7.test"
    finally:
        sock.close()


@ours_only
def test_jobs_are_answered_when_no_worker_can_start(launch, tmp_path):
    """--worker-module naming a worker that exits at once: the server keeps
    retrying it (with backoff) and, with no worker running, answers queued
    jobs with None and a message instead of leaving the client waiting."""
    fake = tmp_path / "brokenworker"
    fake.mkdir()
    (fake / "__init__.py").write_text("__version__ = %r\n" % pphelpers.CLIENT_VERSION)
    (fake / "__main__.py").write_text("import sys\nsys.exit(3)\n")
    server = launch("--worker-module", "brokenworker", nworkers=2, cwd=tmp_path,
                    pythonpath=(tmp_path,))
    for args in ((1, 2), (3, 4)):
        result, out = sp.raw_job(server, "add", sp.ADD_SOURCE, args)
        assert result is None, "a job ran although no worker could start"
        assert "no worker process could be started" in out, out
    assert server.proc.poll() is None, "the server gave up and exited"


# --- refused command lines -------------------------------------------------------------


@ours_only
def test_python_without_pp_says_what_to_install(tmp_path):
    """--python with an interpreter that has neither ppft nor pp (a bare venv)
    exits non-zero with a message naming what to install; so does one that
    cannot run Python at all (/usr/bin/false)."""
    venv = tmp_path / "bare-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    bare = venv / "bin" / "python"
    for module in ("ppft", "pp"):
        probe = subprocess.run([str(bare), "-c", "import " + module], capture_output=True,
                               env=server_env(), timeout=60)
        assert probe.returncode != 0, "the bare venv can import %s" % module
    for python in (bare, "/usr/bin/false"):
        argv = [str(rust_binary()), "-i", "127.0.0.1", "-p", str(free_port()), "--python",
                str(python)]
        assert_clean_failure(*sp.run_to_exit(argv), str(python), "pip install", "ppft")


@ours_only
@pytest.mark.parametrize(
    "flags, named",
    [
        (["-w", "0"], "-w"),
        (["-p", "notaport"], "-p"),
        (["--bogus"], "--bogus"),
        (["-n", "9"], "-n"),
        (["-k", "0"], "-k"),
        (["-t", "soon"], "-t"),
        (["--secret-file", "/nonexistent/ppserver-secret"], "--secret-file"),
    ],
)
def test_bad_flag_is_refused(flags, named):
    """A bad flag or value exits non-zero with a message naming the flag, and
    no panic."""
    argv = [str(rust_binary()), "-i", "127.0.0.1", "-p", str(free_port()), "--python",
            sys.executable, *flags]
    assert_clean_failure(*sp.run_to_exit(argv, timeout=30), named)
