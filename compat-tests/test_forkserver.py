"""The fork-server (``--worker-start fork``, the default): workers forked
from one Python process that has the worker module (and ``--preload``)
imported, in place of a fresh interpreter each.

A forked worker must be indistinguishable from a spawned one: what a job
sees of its process (argv, path, cwd, environment, __main__'s names, signal
handling, descriptors, process group, parent, limits, death signal) is
compared between a server of each kind; only ``--preload``'s thread-count
variables may differ. Two forked workers never start with the same random
state, numpy's global generator included. A fork-server that dies is
started again and no job is lost; one that cannot run leaves the workers
spawned, and the log says why; a ``--preload`` module that cannot be
imported is a startup error. A fork that fails (the fork-server in a pids
cgroup of its own, as root) leaves it no descriptor; one out of
descriptors is started again. One that SIGKILL cannot end (frozen with the
cgroup v1 freezer, as root) holds up no worker start past the fork
timeout, nor the server's stop, and is reaped once it can die.

The rest of the suite runs with the fork-server too, since it is the
default; scripts/test.sh runs the suite once more with
``--worker-start spawn`` (PPSERVER_WORKER_START). Jobs are shipped as source
over the raw protocol (ppwire), so the same jobs run on ppft and pp 1.7.0
workers. No wall-clock thresholds: every wait is a generous upper bound.
"""

import contextlib
import errno
import os
import resource
import signal
import sys
import threading
import time

import pytest

import pphelpers
import serverprocs as sp
from pphelpers import server_env
import ppwire
from procs import (exists, fd_count, fd_targets, forkserver_pids, is_gone, sigkill,
                   wait_for_pool, wait_until)

pytestmark = [
    pytest.mark.server_behaviour,
    pytest.mark.better_than_ppft(reason="ppft's server starts every worker as a new interpreter"),
]

# What a job sees of its process. Descriptors are told by kind (a pipe's
# inode differs from worker to worker); the pid, parent and group by how
# they relate.
STATE_SOURCE = (
    "def worker_state():\n"
    "    import ctypes, os, resource, signal, sys\n"
    "    names = globals()\n"
    "    def handler(signum):\n"
    "        h = signal.getsignal(signum)\n"
    "        return getattr(h, 'name', None) or getattr(h, '__name__', None) or repr(h)\n"
    "    status = {}\n"
    "    with open('/proc/self/status') as f:\n"
    "        for line in f:\n"
    "            key, _, value = line.partition(':')\n"
    "            status[key] = value.strip()\n"
    "    fds = {}\n"
    "    for fd in os.listdir('/proc/self/fd'):\n"
    "        try:\n"
    "            target = os.readlink('/proc/self/fd/' + fd)\n"
    "        except OSError:\n"
    "            continue\n"
    "        fds[int(fd)] = target.split(':')[0].split('/')[-1] if ':' in target else 'file'\n"
    "    deathsig = ctypes.c_int(0)\n"
    "    ctypes.CDLL(None).prctl(2, ctypes.byref(deathsig))\n"
    "    with open('/proc/self/oom_score_adj') as f:\n"
    "        oom = f.read().strip()\n"
    "    with open('/proc/self/comm') as f:\n"
    "        comm = f.read().strip()\n"
    "    return {\n"
    "        'pid': os.getpid(), 'ppid': os.getppid(), 'pgid': os.getpgid(0),\n"
    "        'sid': os.getsid(0), 'argv': list(sys.argv), 'path': list(sys.path),\n"
    "        'cwd': os.getcwd(), 'environ': dict(os.environ), 'names': sorted(names),\n"
    "        'handlers': {n: handler(getattr(signal, n)) for n in\n"
    "                     ('SIGTERM', 'SIGINT', 'SIGHUP', 'SIGPIPE', 'SIGCHLD', 'SIGUSR1')},\n"
    "        'ignored': status['SigIgn'], 'caught': status['SigCgt'],\n"
    "        'blocked': status['SigBlk'], 'fds': sorted(fds.items()),\n"
    "        'deathsig': deathsig.value, 'oom_score_adj': oom, 'comm': comm,\n"
    "        'nofile': resource.getrlimit(resource.RLIMIT_NOFILE),\n"
    "        'unbuffered': sys.__stdout__.write_through,\n"
    "        'modules': sorted(m for m in ('numpy', 'numpy.random', 'json') if m in sys.modules),\n"
    "    }\n"
)
# The random state a worker starts with, before anything drew from it.
DRAWS_SOURCE = (
    "def draws():\n"
    "    import hashlib, os, random, sys\n"
    "    state = hashlib.sha256(repr(random.getstate()).encode()).hexdigest()\n"
    "    np = sys.modules.get('numpy.random')\n"
    "    np_state = np and hashlib.sha256(np.get_state()[1].tobytes()).hexdigest()\n"
    "    return os.getpid(), state, np_state\n"
)
# How long the server waits after a failed start of the fork-server before
# it tries again (src/workers/forkserver.rs).
RESTART_PAUSE = 30.0
# The variables the fork-server sets to 1 with --preload unless set.
THREAD_VARIABLES = {"OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                    "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "BLIS_NUM_THREADS"}


def _state(server):
    state, out = sp.raw_job(server, "worker_state", STATE_SOURCE, ())
    assert state is not None, out
    return state


def _startup_line(server):
    return server.logged("listening on")


def _add(server):
    result, out = sp.raw_job(server, "add", sp.ADD_SOURCE, (40, 2))
    assert result == 42, (out, server.log_tail())
    return result


def _add_within(server, seconds):
    """One job over a raw connection that waits up to `seconds` for its
    answer (the usual bound is 30 s)."""
    sock = ppwire.open_session(server.host, server.port, server.secret, "EXEC")
    try:
        sock.settimeout(seconds)
        ppwire.send_job(sock, ppwire.function_package("add", [sp.ADD_SOURCE]), (40, 2))
        result, out = ppwire.recv_result(sock)
    finally:
        sock.close()
    assert result == 42, (out, server.log_tail())


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


@contextlib.contextmanager
def _v1_cgroup(controller, pid):
    """`pid` moved into a new cgroup of the cgroup v1 `controller`
    hierarchy, whose directory is yielded; on the way out a freezer is
    thawed, `pid` moved back (if it still runs) and the cgroup removed.
    Skips without root or without that hierarchy."""
    root = os.path.join("/sys/fs/cgroup", controller)
    if os.geteuid() != 0 or not os.path.exists(os.path.join(root, "cgroup.procs")):
        pytest.skip("needs root and the cgroup v1 %s hierarchy at %s" % (controller, root))
    path = os.path.join(root, "ppserver-test-%d-%d" % (os.getpid(), pid))
    os.mkdir(path)
    try:
        _write(os.path.join(path, "cgroup.procs"), str(pid))
        yield path
    finally:
        if controller == "freezer":
            _write(os.path.join(path, "freezer.state"), "THAWED")
        try:
            _write(os.path.join(root, "cgroup.procs"), str(pid))
        except OSError as e:
            if e.errno != errno.ESRCH:
                raise

        def removed():
            try:
                os.rmdir(path)
            except OSError as e:
                # EBUSY while a process that left it is still on its way out.
                return e.errno == errno.ENOENT
            return True

        assert wait_until(removed, timeout=30), "cannot remove %s" % path


def _freeze(cgroup):
    _write(os.path.join(cgroup, "freezer.state"), "FROZEN")

    def frozen():
        with open(os.path.join(cgroup, "freezer.state")) as f:
            return f.read().strip() == "FROZEN"

    wait_until(frozen, "the freezer cgroup frozen")


@pytest.mark.family_specific
def test_a_forked_worker_is_what_a_spawned_one_is(launch):
    """Side by side, a server with the fork-server and one with
    --worker-start spawn: every field of what a job sees is the same, but
    for the pid (each worker leads its own process group, a child of its
    server)."""
    forked_server = launch(nworkers=1, name="fork")
    spawned_server = launch("--worker-start", "spawn", nworkers=1, name="spawn")
    assert "workers forked from a fork-server" in _startup_line(forked_server)
    assert "workers spawned" in _startup_line(spawned_server)
    assert forkserver_pids(forked_server) and not forkserver_pids(spawned_server)
    forked, spawned = _state(forked_server), _state(spawned_server)
    for state, server in ((forked, forked_server), (spawned, spawned_server)):
        assert state["ppid"] == server.proc.pid, "a child of the server, not of the fork-server"
        assert state["pgid"] == state["pid"], "its own process group"
        assert state["sid"] == os.getsid(server.proc.pid), "the server's session"
        assert state["deathsig"] == 9, "SIGKILL when the server dies"
        assert state["comm"] != "ppserver-fork"
        assert [kind for _, kind in state["fds"]][:3] == ["pipe"] * 3, state["fds"]
    for key in sorted(forked):
        if key not in ("pid", "ppid", "pgid", "sid"):
            assert forked[key] == spawned[key], (key, forked[key], spawned[key])


def test_preloaded_modules_are_there_and_only_thread_variables_differ(launch):
    """--preload numpy.random,json: a job on a forked worker finds both
    imported; its environment is a spawned worker's but for the
    thread-count variables set to 1, and one the user set keeps its value."""
    env = server_env({"OMP_NUM_THREADS": "3"})
    forked_server = launch("--preload", "numpy.random,json", nworkers=1, name="fork", env=env)
    spawned_server = launch("--worker-start", "spawn", nworkers=1, name="spawn", env=env)
    assert "with numpy.random, json preloaded" in _startup_line(forked_server)
    forked, spawned = _state(forked_server), _state(spawned_server)
    assert forked["modules"] == ["json", "numpy", "numpy.random"], forked["modules"]
    assert "numpy" not in spawned["modules"]
    differ = {k for k in set(forked["environ"]) | set(spawned["environ"])
              if forked["environ"].get(k) != spawned["environ"].get(k)}
    assert differ == THREAD_VARIABLES - {"OMP_NUM_THREADS"}, differ
    assert all(forked["environ"][k] == "1" for k in differ)
    assert forked["environ"]["OMP_NUM_THREADS"] == spawned["environ"]["OMP_NUM_THREADS"] == "3"
    for key in ("argv", "path", "cwd", "names", "handlers", "fds"):
        assert forked[key] == spawned[key], (key, forked[key], spawned[key])


def test_forked_workers_never_start_with_the_same_random_state(launch):
    """-r: every job gets a fresh forked worker. The random module's state
    and numpy's global generator's, read before anything draws, differ
    from worker to worker."""
    server = launch("-r", "--preload", "numpy.random", nworkers=2)
    seen = [sp.raw_job(server, "draws", DRAWS_SOURCE, ())[0] for _ in range(12)]
    assert None not in seen, server.log_tail()
    pids = {pid for pid, _, _ in seen}
    assert len(pids) == len(seen), "a fresh worker for every job (-r)"
    assert len({state for _, state, _ in seen}) == len(seen), seen
    assert None not in {np for _, _, np in seen}, "numpy.random is preloaded"
    assert len({np for _, _, np in seen}) == len(seen), seen


def test_a_fork_server_that_dies_is_started_again_and_no_job_is_lost(launch):
    """The fork-server is SIGKILLed; the workers it forked go on, and with
    -r every job needs a new worker: 16 jobs from 8 clients at once are all
    answered with their result, by workers of a new fork-server."""
    server = launch("-r", nworkers=2)
    (first,) = wait_until(lambda: forkserver_pids(server), "a fork-server")
    workers = wait_for_pool(server)
    sigkill(first)
    assert wait_until(lambda: is_gone(first), timeout=30)
    assert wait_for_pool(server) == workers, "its workers live on"
    results = []

    def client():
        for _ in range(2):
            results.append(sp.raw_job(server, "add", sp.ADD_SOURCE, (40, 2))[0])

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == [42] * 16, (results, server.log_tail())
    (second,) = wait_until(lambda: forkserver_pids(server), "a new fork-server")
    assert second != first
    server.logged("fork-server started again")
    assert "spawned instead" not in server.log()


def test_a_new_worker_never_shows_as_a_second_fork_server(launch):
    """With -r every job forks a worker, which the fork-server forks twice
    so that the server adopts it. The worker must carry a worker's name by
    the time it is the server's child: a watcher reading the server's
    children while 200 jobs run never sees two named ppserver-fork (the
    test above, and anything that finds the fork-server by name, would
    take the wrong process)."""
    server = launch("-r", nworkers=2)
    wait_until(lambda: forkserver_pids(server), "a fork-server")
    seen = []
    done = threading.Event()

    def watch():
        while not done.is_set():
            pids = forkserver_pids(server)
            if len(pids) > 1:
                seen.append(pids)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        results = []

        def client():
            for _ in range(50):
                results.append(sp.raw_job(server, "add", sp.ADD_SOURCE, (40, 2))[0])

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        done.set()
        watcher.join(timeout=30)
    assert results == [42] * 200, server.log_tail()
    assert not seen, "two processes named ppserver-fork: %s" % seen[:5]


def test_failed_forks_cost_the_fork_server_no_descriptors(launch):
    """The fork-server in a pids cgroup that lets it fork nothing
    (pids.max = 1): with -r every job needs a new worker, which is spawned
    as the fork fails, and the fork-server's descriptors are as many as
    before (each failed fork used to leave its pid pipe open, until its
    table was full)."""
    server = launch("-r", nworkers=1)
    (pid,) = wait_until(lambda: forkserver_pids(server), "a fork-server")
    wait_for_pool(server)
    before = fd_count(pid)
    with _v1_cgroup("pids", pid) as cgroup:
        _write(os.path.join(cgroup, "pids.max"), "1")
        for _ in range(5):
            _add(server)
        wait_for_pool(server)
        after = fd_count(pid)
        assert forkserver_pids(server) == [pid], "the same fork-server"
    assert "a worker is spawned instead of forked" in server.log(), server.log_tail()
    assert after <= before, (before, after, fd_targets(pid))


def test_a_fork_server_out_of_descriptors_is_started_again(launch):
    """The fork-server's open-file limit lowered to 3 (prlimit), so that it
    cannot take a request's descriptors: it says so, the server starts it
    again, and the next workers are forked by the new one, none spawned."""
    if os.geteuid() != 0:
        pytest.skip("needs root to lower another process's limit")
    server = launch("-r", nworkers=1)
    (first,) = wait_until(lambda: forkserver_pids(server), "a fork-server")
    wait_for_pool(server)
    resource.prlimit(first, resource.RLIMIT_NOFILE, (3, 3))
    for _ in range(3):
        _add(server)
    assert wait_until(lambda: "fork-server started again" in server.log()), server.log_tail()
    assert "spawned instead" not in server.log(), server.log_tail()
    assert wait_until(lambda: is_gone(first)), "the old fork-server is stopped"
    assert wait_until(lambda: [p for p in forkserver_pids(server) if p != first]), \
        "a new fork-server"


def test_a_fork_server_that_cannot_be_killed_holds_up_no_worker_start(launch):
    """The fork-server frozen (the cgroup v1 freezer: as a process stuck in
    the kernel, SIGKILL does not end it): with -r each job needs a new
    worker, and every job is answered, the first start spawning its worker
    once the fork timed out (10 s), the next forked by a new fork-server.
    Thawed, the old one dies and is reaped; the server stops cleanly."""
    server = launch("-r", nworkers=1)
    (frozen,) = wait_until(lambda: forkserver_pids(server), "a fork-server")
    wait_for_pool(server)
    with _v1_cgroup("freezer", frozen) as cgroup:
        _freeze(cgroup)
        for _ in range(3):
            _add_within(server, 90)
        assert [p for p in forkserver_pids(server) if p != frozen], server.log_tail()
    assert wait_until(lambda: not exists(frozen)), "the thawed fork-server reaped"
    log = server.log()
    assert "hung (no answer within" in log, server.log_tail()
    assert "fork-server started again" in log, server.log_tail()
    server.proc.send_signal(signal.SIGTERM)
    assert sp.wait_exit(server.proc) == 0, server.log_tail()


def test_the_server_stops_though_its_fork_server_cannot_be_killed(launch):
    """The fork-server frozen as above when the server is told to stop:
    the server exits all the same, and the fork-server dies once thawed."""
    server = launch(nworkers=1)
    (frozen,) = wait_until(lambda: forkserver_pids(server), "a fork-server")
    wait_for_pool(server)
    with _v1_cgroup("freezer", frozen) as cgroup:
        _freeze(cgroup)
        server.proc.send_signal(signal.SIGTERM)
        code = sp.wait_exit(server.proc)
    assert code == 0, server.log_tail()
    assert wait_until(lambda: is_gone(frozen)), "the thawed fork-server ended"


def _python_wrapper(tmp_path, fails_when):
    """A --python that runs this interpreter, but exits with code 3 when it
    is started as the fork-server and `fails_when` (a shell test) holds."""
    marker = tmp_path / "forkserver-started"
    wrapper = tmp_path / "python"
    wrapper.write_text(
        "#!/bin/sh\n"
        "case \"$3\" in *_forkserver*)\n"
        "    echo started >> '%s.count'\n"
        "    if %s; then echo 'no fork-server here' >&2; exit 3; fi\n"
        "    touch '%s';;\n"
        "esac\n"
        "exec '%s' \"$@\"\n" % (marker, fails_when.replace("MARKER", "'%s'" % marker),
                               marker, sys.executable))
    wrapper.chmod(0o755)
    return str(wrapper)


def test_workers_are_spawned_when_the_fork_server_cannot_start(launch, tmp_path):
    """An interpreter that cannot run the fork-server: the server spawns
    its workers, says why once, and serves."""
    python = _python_wrapper(tmp_path, "true")
    server = launch("-r", nworkers=2, python=python)
    assert "workers spawned" in _startup_line(server)
    log = server.log()
    assert log.count("workers are spawned, not forked: the fork-server exited at startup") == 1, log
    for _ in range(4):
        _add(server)
    assert not forkserver_pids(server)
    assert server.log().count("not forked") == 1, "said once"


def test_a_fork_server_that_cannot_be_started_again_leaves_workers_spawned(launch, tmp_path):
    """The fork-server starts, is killed, and cannot start again: the next
    workers are spawned, the log says so once, and every job is answered."""
    python = _python_wrapper(tmp_path, "[ -e MARKER ]")
    server = launch("-r", nworkers=1, python=python)
    (first,) = wait_until(lambda: forkserver_pids(server), "a fork-server")
    _add(server)
    sigkill(first)
    killed = time.monotonic()
    assert wait_until(lambda: is_gone(first), timeout=30)
    for _ in range(4):
        _add(server)
    # One more try per pause, should the jobs outlast one (a loaded machine).
    pauses = int((time.monotonic() - killed) // RESTART_PAUSE)
    server.logged("a worker is spawned instead of forked")
    log = server.log()
    assert log.count("a worker is spawned instead of forked") == 1, log
    assert "no fork-server here" in log or "fork-server cannot start" in log, log
    starts = (tmp_path / "forkserver-started.count").read_text().split()
    assert 2 <= len(starts) <= 2 + pauses, (
        "one failed start again, then a pause, not one per worker: %d starts" % len(starts))


def test_a_preload_module_that_cannot_be_imported_is_a_startup_error():
    """The operator asked for it: the server does not start, and says which
    module and why."""
    argv = pphelpers.server_command("-p", pphelpers.free_port(), "-w", "1", "-s", "x",
                                    "--preload", "json,no_such_module_for_ppserver")
    code, out, err = sp.run_to_exit(argv)
    assert code != 0, (out, err)
    assert "cannot import no_such_module_for_ppserver (--preload)" in err, err
    assert "ModuleNotFoundError" in err, err


def test_with_spawn_preload_is_ignored_with_a_warning(launch):
    server = launch("--worker-start", "spawn", "--preload", "json", nworkers=1)
    _add(server)
    server.logged("--preload json has no effect with --worker-start spawn")
