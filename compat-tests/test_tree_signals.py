"""A stop signal sent to every process of the server's tree at once, as
Slurm's scancel and time limit do, and systemd with KillMode=control-group:
the workers outlive it, so the drain answers the running jobs with their
real results; programs a job starts still get the default handling.

The server starts each worker through a small bootstrap that ignores
SIGTERM, SIGINT and SIGHUP with a handler in Python, then runs the worker
module as ``python -u -m MODULE`` would; what a job sees there (sys.argv,
sys.path, __main__'s names, the working directory, the environment) is
compared with a worker this test starts with plain ``-m``.

Jobs are shipped as source over the raw protocol (ppwire), so the same
jobs run on ppft and pp 1.7.0 workers. No wall-clock thresholds: the jobs
wait for a file the test creates after the signals, and every wait is a
generous upper bound.
"""

import os
import select
import signal
import subprocess
import sys

import pytest

import ppwire
import serverprocs as sp
from pphelpers import HERE, STARTUP_TIMEOUT, WORKER_MODULE, server_env
from procs import is_gone, signal_masks, wait_for_children, wait_until

pytestmark = pytest.mark.better_than_ppft(
    reason="ppft's workers die of a SIGTERM sent to the whole process tree")

# Writes the worker's pid to `path` once it runs, then waits (bounded) for
# `release` to exist, and answers with `value` and its pid.
HELD_SOURCE = (
    "def held(path, release, value):\n"
    "    import os, time\n"
    "    with open(path + '.tmp', 'w') as f:\n"
    "        f.write(str(os.getpid()))\n"
    "    os.rename(path + '.tmp', path)\n"
    "    deadline = time.time() + 300\n"
    "    while not os.path.exists(release) and time.time() < deadline:\n"
    "        time.sleep(0.05)\n"
    "    return value, os.getpid()\n"
)

# Starts a program (`sleep`, through exec) and a forked copy of the worker
# (no exec) that sleeps; returns their pids. Both stay in the worker's
# process group.
CHILDREN_SOURCE = (
    "def start_children(seconds):\n"
    "    import os, subprocess, time\n"
    "    program = subprocess.Popen(['sleep', str(seconds)])\n"
    "    forked = os.fork()\n"
    "    if forked == 0:\n"
    "        try:\n"
    "            time.sleep(seconds)\n"
    "        finally:\n"
    "            os._exit(0)\n"
    "    return program.pid, forked, os.getpid()\n"
)

# What a job sees of its interpreter.
VIEW_SOURCE = (
    "def worker_view():\n"
    "    import os, sys\n"
    "    names = globals()\n"
    "    return {\n"
    "        'argv': list(sys.argv),\n"
    "        'path': list(sys.path),\n"
    "        'cwd': os.getcwd(),\n"
    "        'environ': dict(os.environ),\n"
    "        'main_is_where_jobs_run': sys.modules['__main__'].__dict__ is names,\n"
    "        'names': sorted(names),\n"
    "        'builtins': type(names['__builtins__']).__name__,\n"
    "        'spec': getattr(names.get('__spec__'), 'name', None),\n"
    "        'unbuffered': sys.__stdout__.write_through,\n"
    "    }\n"
)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def test_sigterm_to_the_whole_tree_drains_the_running_jobs(launch, tmp_path):
    """Two jobs running; SIGTERM to the server and SIGTERM, SIGINT and
    SIGHUP to each worker at once: both jobs are answered with their real
    results by the workers that ran them, then the server exits 0 and no
    worker is left."""
    server = launch("--drain-timeout", 120, nworkers=2)
    workers = wait_for_children(server, 2)
    launch.workers.extend(workers)
    release = tmp_path / "release"
    package = ppwire.function_package("held", [HELD_SOURCE])
    socks, ran_on = [], []
    try:
        for i in range(2):
            sock = ppwire.open_session(server.host, server.port, server.secret, "EXEC")
            socks.append(sock)
            marker = tmp_path / ("running%d" % i)
            ppwire.send_job(sock, package, (str(marker), str(release), "job %d" % i))
            assert wait_until(marker.exists, timeout=STARTUP_TIMEOUT), server.log_tail()
            ran_on.append(int(marker.read_text()))
        assert sorted(ran_on) == workers, (ran_on, workers)

        os.kill(server.proc.pid, signal.SIGTERM)
        for pid in workers:
            for signum in STOP_SIGNALS:
                os.kill(pid, signum)
        assert wait_until(lambda: "draining" in server.log(), timeout=30), server.log_tail()
        release.touch()
        for i, sock in enumerate(socks):
            result, _ = ppwire.recv_result(sock)
            assert result == ("job %d" % i, ran_on[i]), (result, server.log_tail())
            with pytest.raises(ppwire.ClosedError):
                ppwire.recv_frame(sock)
    finally:
        release.touch()
        for sock in socks:
            sock.close()
    assert sp.wait_exit(server.proc) == 0, server.log_tail()
    assert "drained" in server.log(), server.log_tail()
    assert wait_until(lambda: all(is_gone(p) for p in workers), timeout=60), (
        [p for p in workers if not is_gone(p)])


def test_an_idle_worker_outlives_the_stop_signals(launch):
    """SIGTERM, SIGINT and SIGHUP to a worker waiting for its next job: the
    same worker runs that job."""
    server = launch(nworkers=1)
    (worker,) = wait_for_children(server, 1)
    launch.workers.append(worker)
    assert sp.raw_job(server, "worker_pid", sp.PID_SOURCE, ())[0] == worker
    for signum in STOP_SIGNALS:
        os.kill(worker, signum)
    assert sp.raw_job(server, "worker_pid", sp.PID_SOURCE, ())[0] == worker, server.log_tail()


def test_workers_handle_the_stop_signals_and_what_jobs_start_does_not(launch):
    """The worker handles SIGTERM, SIGINT and SIGHUP (none ignored); a
    program a job starts and a child it forks neither handle nor ignore
    SIGTERM and SIGHUP, and SIGTERM ends them."""
    server = launch(nworkers=1)
    (worker,) = wait_for_children(server, 1)
    launch.workers.append(worker)
    # Once it has run a job, the worker is past its bootstrap.
    assert sp.raw_job(server, "worker_pid", sp.PID_SOURCE, ())[0] == worker
    ignored, caught = signal_masks(worker)
    for signum in STOP_SIGNALS:
        assert signum in caught and signum not in ignored, (signum, ignored, caught)

    (program, forked, ran_on), _ = sp.raw_job(server, "start_children", CHILDREN_SOURCE, (600,))
    assert ran_on == worker
    launch.workers.extend([program, forked])
    for pid in (program, forked):
        # The job returns once they exist; the forked child restores the
        # handlers (and the program execs) a moment later.
        def settled():
            ignored, caught = signal_masks(pid)
            return all(s not in caught and s not in ignored
                       for s in (signal.SIGTERM, signal.SIGHUP))
        assert wait_until(settled, timeout=30), (pid, signal_masks(pid))
        os.kill(pid, signal.SIGTERM)
    # Both are children of the worker, which reaps neither: gone means
    # dead (a zombie), which SIGTERM at its default makes them.
    assert wait_until(lambda: is_gone(program) and is_gone(forked), timeout=60), (
        "SIGTERM did not end what the job started")
    # The worker itself is untouched and still serves.
    assert sp.raw_job(server, "add", sp.ADD_SOURCE, (40, 2))[0] == 42


def _view_under_plain_minus_m(env):
    """worker_view() run by a worker this test starts the way workers were
    started before the bootstrap: `python -u -m MODULE`, in the server's
    directory with the environment the server gives its workers, spoken to
    over its pipes as the server does."""
    proc = subprocess.Popen([sys.executable, "-u", "-m", WORKER_MODULE], cwd=str(HERE), env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        pipe = _Pipes(proc)
        assert int(ppwire.recv_frame(pipe)) == proc.pid
        ppwire.send_frame(pipe, b"2")
        ppwire.send_job(pipe, ppwire.function_package("worker_view", [VIEW_SOURCE]), ())
        view, _ = ppwire.recv_result(pipe)
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    return view


class _Pipes:
    """A worker's stdin and stdout as the socket ppwire's framing expects,
    with its bounded reads: a worker that never answers fails the test."""

    def __init__(self, proc):
        self.proc = proc

    def sendall(self, data):
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def recv(self, n):
        ready, _, _ = select.select([self.proc.stdout], [], [], ppwire.SOCKET_TIMEOUT)
        if not ready:
            raise AssertionError("the worker %d wrote nothing for %.0f s"
                                 % (self.proc.pid, ppwire.SOCKET_TIMEOUT))
        return os.read(self.proc.stdout.fileno(), n)


def test_a_job_sees_what_plain_minus_m_gives(launch):
    """sys.argv, sys.path, the working directory, the environment, the
    names in __main__ (where jobs run) and its __builtins__ are the same in
    the server's worker as in one started with plain `python -u -m`."""
    server = launch(nworkers=1)
    launch.workers.extend(wait_for_children(server, 1))
    view, out = sp.raw_job(server, "worker_view", VIEW_SOURCE, ())
    assert view is not None, out
    # The server gives its workers its own environment with PYTHONPATH
    # set to the inherited entries then its working directory: here both
    # are compat-tests/ (see pphelpers.server_env).
    plain = _view_under_plain_minus_m(server_env())
    assert view["argv"][0].endswith(("ppft/__main__.py", "pp/_worker.py")), view["argv"]
    assert view["path"][0] == str(HERE), view["path"]
    assert view["main_is_where_jobs_run"] and view["builtins"] == "module", view
    for key in sorted(plain):
        assert view[key] == plain[key], (key, view[key], plain[key])
