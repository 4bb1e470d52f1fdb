"""Workers as processes, and the processes jobs start: a worker is known
dead when it exits even while a child of its job holds its pipes; stopping
or replacing a worker takes its process group along; nothing a job started
(in the worker's group, or detached with setsid and a double fork) outlives
the server; workers are first in line for the OOM killer; a worker that
runs on costs no wait4; workers are recycled after --max-jobs-per-worker
jobs; and a running job whose client left has its worker replaced (unless
--keep-abandoned).

Each test starts its own server (conftest's ``launch``) and speaks the raw
protocol (ppwire) with jobs shipped as source, so the same jobs run on ppft
and pp 1.7.0 workers. Processes a job starts carry a unique marker as their
argv[0] (``exec -a``) and are looked for in /proc. No wall-clock
thresholds: waits are bounded only so that a server that never gets there
fails; where promptness matters the bound is far shorter than the child's
life (a child sleeps 600 s, the answer must come within 60 s).
"""

import collections
import os
import shutil
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

import ppwire
import serverprocs as sp
from faulthelpers import assert_died_text
from pphelpers import IMPL, close_client, connect_client
from procs import cmdline, exists, is_gone, stat_fields, wait_for_pool, wait_until, zombie_children

# A job's child sleeps this long: far past every bounded wait below.
CHILD_LIFE = 600
# How long an answer may take where it must come before the child exits.
PROMPT = 60.0

better = pytest.mark.better_than_ppft

# Starts `sleep CHILD_LIFE` with argv[0] = marker as a child of the worker,
# holding the worker's stdin, stdout and stderr (inherited), in the
# worker's process group or, with escape=True, in a session of its own;
# once it runs (the end of a close-on-exec pipe), the worker dies:
# os._exit(3), or SIGKILL of itself.
HOLD_AND_DIE_SOURCE = (
    "def hold_and_die(marker, seconds, escape, how):\n"
    "    import os, signal\n"
    "    r, w = os.pipe()\n"
    "    if os.fork() == 0:\n"
    "        try:\n"
    "            if escape:\n"
    "                os.setsid()\n"
    "            os.execvp('sleep', [marker, str(seconds)])\n"
    "        finally:\n"
    "            os._exit(127)\n"
    "    os.close(w)\n"
    "    os.read(r, 1)\n"
    "    if how == 'kill':\n"
    "        os.kill(os.getpid(), signal.SIGKILL)\n"
    "    os._exit(3)\n"
)

# Starts `sleep` with argv[0] = marker and returns the worker's pid once it
# runs (the end of a close-on-exec pipe): as a plain child of the worker
# (same process group), or detached (setsid in a child, which forks the
# sleeper and exits: the classic daemon double fork), in which case the
# sleeper is orphaned at once.
SPAWN_SOURCE = (
    "def spawn(marker, seconds, detach):\n"
    "    import os\n"
    "    r, w = os.pipe()\n"
    "    pid = os.fork()\n"
    "    if pid == 0:\n"
    "        try:\n"
    "            if detach:\n"
    "                os.setsid()\n"
    "                if os.fork() != 0:\n"
    "                    os._exit(0)\n"
    "            os.execvp('sleep', [marker, str(seconds)])\n"
    "        finally:\n"
    "            os._exit(127)\n"
    "    os.close(w)\n"
    "    os.read(r, 1)\n"
    "    os.close(r)\n"
    "    if detach:\n"
    "        os.waitpid(pid, 0)\n"
    "    return os.getpid()\n"
)

# Sleeps `seconds`, with marker files: `path`.start (the worker's pid) as it
# begins, `path`.end if it runs to its end.
MARKED_SLEEP_SOURCE = (
    "def marked_sleep(path, seconds):\n"
    "    import os, time\n"
    "    for suffix in ('start', 'end'):\n"
    "        with open(path + '.tmp', 'w') as f:\n"
    "            f.write(str(os.getpid()))\n"
    "        os.rename(path + '.tmp', path + '.' + suffix)\n"
    "        if suffix == 'start':\n"
    "            time.sleep(seconds)\n"
    "    return os.getpid()\n"
)


def new_marker():
    return "pptest-%s" % uuid.uuid4().hex[:12]


def marked(marker):
    """Pids of live processes whose argv[0] is `marker`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            argv = cmdline(int(entry))
            if argv and argv[0] == marker and not is_gone(int(entry)):
                found.append(int(entry))
    return found


def wait_marked(marker, server):
    """The one process carrying `marker`, once it runs (bounded wait)."""
    found = wait_until(lambda: marked(marker), timeout=PROMPT)
    assert found, "no process %s was started by the job\n%s" % (marker, server.log_tail())
    assert len(found) == 1, found
    return found[0]


def run_job(server, name, source, args):
    """One job over a fresh raw EXEC connection; returns (result, output)."""
    sock = ppwire.open_session(server.host, server.port, server.secret, "EXEC")
    sock.settimeout(PROMPT)
    try:
        ppwire.send_job(sock, ppwire.function_package(name, [source]), args)
        return ppwire.recv_result(sock)
    except OSError as exc:  # a timeout included
        raise AssertionError("no answer to %s%r: %s\n%s" % (name, args, exc, server.log_tail()))
    finally:
        sock.close()


def worker_pid(server):
    return run_job(server, "worker_pid", sp.PID_SOURCE, ())[0]


def sigterm_and_wait(server):
    os.kill(server.proc.pid, signal.SIGTERM)
    code = sp.wait_exit(server.proc)
    assert code == 0, "exit code %r after SIGTERM\n%s" % (code, server.log_tail())


def assert_none_left(markers, server):
    left = {}

    def none():
        left.clear()
        left.update({m: marked(m) for m in markers if marked(m)})
        return not left

    assert wait_until(none, timeout=PROMPT), (
        "processes started by jobs outlived the server: %s\n%s" % (left, server.log_tail()))


@better(reason="ppft's server never notices a dead worker, let alone one whose pipes are held")
@pytest.mark.parametrize("how, said", [("exit", "exit code 3"), ("kill", "signal 9")])
@pytest.mark.parametrize("escape", [False, True], ids=["same-group", "setsid"])
def test_worker_death_is_seen_while_a_child_holds_its_pipes(launch, how, said, escape):
    """A job forks a child that keeps the worker's stdin and stdout open for
    600 s, then its worker dies (os._exit(3) or SIGKILL). The client gets the
    worker-died answer, naming how, within 60 s; a child left in the
    worker's group is gone with it; the next job runs on a new worker. A
    child that left the group with setsid is not waited for either, and the
    server's stop takes it along."""
    server = launch(nworkers=1)
    old = wait_for_pool(server)
    launch.workers.extend(old)
    marker = new_marker()
    result, text = run_job(server, "hold_and_die", HOLD_AND_DIE_SOURCE,
                           (marker, CHILD_LIFE, escape, how))
    assert result is None
    assert_died_text(text, how=(said,))
    if escape:
        assert marked(marker), "the detached child should run on (until the server stops)"
    else:
        assert wait_until(lambda: not marked(marker), timeout=PROMPT), (
            "the child in the dead worker's process group still runs\n%s" % server.log_tail())

    new = wait_for_pool(server, exclude=old)
    assert worker_pid(server) in new
    sigterm_and_wait(server)
    assert_none_left([marker], server)


@better(reason="ppft's server leaves jobs' children running when it stops")
def test_nothing_a_job_started_outlives_the_server(launch, tmp_path):
    """Two workers. Job 1 leaves a plain child (in the worker's process
    group); job 2 detaches one (setsid, double fork: it is orphaned at once
    and, the server being a child subreaper, becomes the server's child);
    job 3 starts a child and keeps running. SIGTERM: exit 0, and none of
    the three children is left."""
    # Job 3 never ends by itself: SIGTERM's drain waits for it until
    # --drain-timeout (default 20 s) runs out, which test_stopping.py tests;
    # a short one spares those seconds here.
    server = launch("--drain-timeout", 1, nworkers=2)
    launch.workers.extend(wait_for_pool(server))
    plain, detached, running = new_marker(), new_marker(), new_marker()
    run_job(server, "spawn", SPAWN_SOURCE, (plain, CHILD_LIFE, False))
    run_job(server, "spawn", SPAWN_SOURCE, (detached, CHILD_LIFE, True))
    wait_marked(plain, server)
    orphan = wait_marked(detached, server)
    assert wait_until(lambda: (stat_fields(orphan) or (None, None))[1] == server.proc.pid,
                      timeout=PROMPT), (
        "the detached child %d was not reparented to the server (parent %r)"
        % (orphan, stat_fields(orphan)))

    busy = ppwire.open_session(server.host, server.port, server.secret, "EXEC")
    try:
        both = "def both(marker, seconds, path):\n" + "".join(
            "    " + line + "\n" for line in (
                "spawn(marker, seconds, False)",
                "return marked_sleep(path, seconds)",
            ))
        ppwire.send_job(busy, ppwire.function_package(
            "both", [SPAWN_SOURCE, MARKED_SLEEP_SOURCE, both]),
            (running, CHILD_LIFE, str(tmp_path / "busy")))
        wait_marked(running, server)
        assert wait_until(lambda: (tmp_path / "busy.start").exists(), timeout=PROMPT)
        sigterm_and_wait(server)
    finally:
        busy.close()
    assert_none_left([plain, detached, running], server)


@better(reason="ppft's server does not stop a replaced worker's process group")
def test_replacing_a_worker_stops_its_process_group(launch):
    """With -r every job gets a fresh worker: the child a job left in its
    worker's group ends when that worker is replaced, while the server
    runs on."""
    server = launch("-r", nworkers=1)
    marker = new_marker()
    first = run_job(server, "spawn", SPAWN_SOURCE, (marker, CHILD_LIFE, False))[0]
    launch.workers.append(first)
    assert wait_until(lambda: not marked(marker), timeout=PROMPT), (
        "the job's child outlived its replaced worker %d\n%s" % (first, server.log_tail()))
    assert worker_pid(server) != first
    assert server.proc.poll() is None


@better(reason="without a subreaper the orphan goes to init")
def test_orphans_are_reaped_while_the_server_runs(launch):
    """A detached child that exits on its own while the server runs (it
    became the server's child) is reaped: no zombie is left behind."""
    server = launch(nworkers=1)
    launch.workers.extend(wait_for_pool(server))
    marker = new_marker()
    run_job(server, "spawn", SPAWN_SOURCE, (marker, 3, True))
    orphans = set()

    def gone():
        orphans.update(marked(marker))
        return orphans and not marked(marker)

    # Either it was seen and ended, or it ended before it could be seen.
    wait_until(gone, timeout=PROMPT)
    assert wait_until(lambda: not zombie_children(server.proc.pid), timeout=PROMPT), (
        "zombie children of the server: %s\n%s"
        % (sorted(zombie_children(server.proc.pid)), server.log_tail()))
    assert not any(exists(pid) for pid in orphans), orphans
    assert worker_pid(server)


# Jobs run while the server is traced for wait4: enough that one wait4 per
# job (as when every job's wait on its worker began with one) stands far
# above the few a stray exit could cost.
TRACED_JOBS = 200


def traced(pid):
    """Whether every thread of `pid` is traced."""
    try:
        tasks = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return False
    for task in tasks:
        try:
            status = Path("/proc/%d/task/%s/status" % (pid, task)).read_text()
        except OSError:
            return False
        if "\nTracerPid:\t0\n" in status:
            return False
    return True


@better(reason="ppft's server starts no worker by fork")
@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_no_wait4_while_no_process_exits(launch, tmp_path, start):
    """A stream of jobs that start no process costs the server no wait4:
    it learns of a worker's exit from its pidfd, and reaps it then only.
    Counted by strace attached to the server (all its threads) over 200
    jobs on one connection, after the workers are up."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (scripts/test.sh installs Debian's as root)")
    server = launch("--worker-start", start, nworkers=2)
    launch.workers.extend(wait_for_pool(server))
    sock = ppwire.open_session(server.host, server.port, server.secret, "EXEC")
    sock.settimeout(PROMPT)
    add = ppwire.function_package("add", [sp.ADD_SOURCE])
    ppwire.send_job(sock, add, (1, 2))
    assert ppwire.recv_result(sock)[0] == 3
    out = tmp_path / "strace.out"
    tracer = subprocess.Popen(
        [strace, "-f", "-qq", "-e", "trace=wait4", "-o", str(out), "-p", str(server.proc.pid)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        if not wait_until(lambda: traced(server.proc.pid) or tracer.poll() is not None,
                          timeout=PROMPT) or tracer.poll() is not None:
            pytest.skip("strace cannot attach here: %s"
                        % tracer.communicate(timeout=PROMPT)[1].decode(errors="replace"))
        for i in range(TRACED_JOBS):
            ppwire.send_job(sock, add, (i, 1), cached=True)
            assert ppwire.recv_result(sock)[0] == i + 1
    finally:
        sock.close()
        tracer.send_signal(signal.SIGINT)
        tracer.communicate(timeout=PROMPT)
    calls = [line for line in out.read_text().splitlines() if "wait4(" in line]
    assert len(calls) < TRACED_JOBS // 10, (
        "%d wait4 calls over %d jobs; the first: %s\n%s"
        % (len(calls), TRACED_JOBS, calls[:5], server.log_tail()))
    assert server.proc.poll() is None


def oom_score_adj(pid):
    return int(Path("/proc/%d/oom_score_adj" % pid).read_text())


@better(reason="ppft's workers share the server's oom_score_adj")
def test_workers_rank_above_the_server_for_the_oom_killer(launch):
    """Every worker's oom_score_adj is higher than the server's, so memory
    pressure costs a worker, not the server and everyone's jobs."""
    server = launch(nworkers=2)
    workers = wait_for_pool(server)
    launch.workers.extend(workers)
    mine = oom_score_adj(server.proc.pid)
    theirs = {pid: oom_score_adj(pid) for pid in workers}
    assert all(adj > mine for adj in theirs.values()), (mine, theirs)


def pid_runs(pids):
    """[(pid, how many in a row)], in order."""
    runs = []
    for pid in pids:
        if runs and runs[-1][0] == pid:
            runs[-1][1] += 1
        else:
            runs.append([pid, 1])
    return [tuple(r) for r in runs]


@better(reason="ppft's server has no --max-jobs-per-worker")
def test_max_jobs_per_worker_recycles_workers_between_jobs(launch):
    """--max-jobs-per-worker 3, one worker: ten jobs in a row on one
    connection are all answered, three per worker process (the last one
    alone); then a real client's twelve jobs at once are all answered too,
    none lost to a recycling, no worker running more than three."""
    server = launch("--max-jobs-per-worker", "3", nworkers=1)
    sock = ppwire.open_session(server.host, server.port, server.secret, "EXEC")
    sock.settimeout(PROMPT)
    package = ppwire.function_package("worker_pid", [sp.PID_SOURCE])
    pids = []
    try:
        for i in range(10):
            ppwire.send_job(sock, package, (), cached=i > 0)
            pids.append(ppwire.recv_result(sock)[0])
    finally:
        sock.close()
    runs = pid_runs(pids)
    assert [n for _, n in runs] == [3, 3, 3, 1], runs
    assert len({pid for pid, _ in runs}) == 4, runs
    launch.workers.extend(pid for pid, _ in runs)

    js = connect_client(server)
    try:
        jobs = [js.submit(job_and_pid, (i,)) for i in range(12)]
        results = [job() for job in jobs]
    finally:
        close_client(js)
    assert [i for i, _ in results] == list(range(12)), results
    counts = collections.Counter(pid for _, pid in results)
    assert max(counts.values()) <= 3, counts
    assert sum(counts.values()) == 12


def job_and_pid(i):
    import os

    return i, os.getpid()


@better(reason="ppft's server lets the abandoned job run to its end")
def test_abandoned_running_job_frees_its_worker(launch, tmp_path):
    """One worker. A client starts a 600 s job and disconnects: its worker is
    stopped (pid gone) and a fresh one takes the slot, so the next client's
    job is answered within 60 s, by the new worker; the abandoned job never
    ran to its end."""
    server = launch(nworkers=1)
    busy, old = sp.start_marked_nap(server, tmp_path / "abandoned", seconds=CHILD_LIFE)
    launch.workers.append(old)
    busy.close()
    assert wait_until(lambda: is_gone(old), timeout=PROMPT), (
        "the worker %d of the abandoned job still runs\n%s" % (old, server.log_tail()))
    new = wait_for_pool(server, exclude={old})
    assert worker_pid(server) in new


def test_keep_abandoned_lets_the_job_finish_on_its_worker(launch, tmp_path):
    """--keep-abandoned (ppft's behaviour, so ppft's own server is held to
    it without the flag): a client starts a 2 s job and disconnects; the job
    runs to its end on the same worker, which stays, and serves the next
    job."""
    flags = ("--keep-abandoned",) if IMPL == "rust" else ()
    server = launch(*flags, nworkers=1)
    before = wait_for_pool(server)
    launch.workers.extend(before)
    path = tmp_path / "kept"
    sock = ppwire.open_session(server.host, server.port, server.secret, "EXEC")
    try:
        ppwire.send_job(sock, ppwire.function_package("marked_sleep", [MARKED_SLEEP_SOURCE]),
                        (str(path), 2.0))
        assert wait_until(lambda: Path(str(path) + ".start").exists(), timeout=PROMPT), (
            server.log_tail())
    finally:
        sock.close()
    runner = int(Path(str(path) + ".start").read_text())
    assert wait_until(lambda: Path(str(path) + ".end").exists(), timeout=PROMPT), (
        "the abandoned job did not run to its end\n%s" % server.log_tail())
    assert not is_gone(runner)
    assert worker_pid(server) == runner
    assert wait_for_pool(server) == before
