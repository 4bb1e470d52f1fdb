"""--worker-memory-limit: a worker that goes over it is stopped, its job
answered with None and the reason, and a fresh worker takes its place,
while the other worker and its job carry on.

Run twice: with the method the server picks here (a memory cgroup per
slot where it can make them: cgroup v1 as root on this test host), and
with polling (PPSERVER_WORKER_MEMORY_CGROUP=0 in the server's
environment). A job allocates and touches 1 GB under a 200M limit; the
job on the other worker waits at a gate the test opens once the first is
answered, so "meanwhile" is an order, not a time. What a job starts counts
too: a job whose child touches 1 GB is answered the same way.

With a cgroup, a job that lifts its cgroup's limit or moves its worker out
of the cgroup is stopped, and the slot's next worker is held to the limit
again; cgroups a killed server left are removed when the next server
starts. Waits are bounded only so that a server that never gets there
fails.
"""

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

import pphelpers
import serverprocs as sp
from faulthelpers import finished_within, server_alive
from procs import is_gone, sigkill, wait_for_pool, wait_until

# The server's own behaviour, whatever the client family: run with the
# ppft 1.7.8 family only (conftest.py deselects it in the others).
pytestmark = [
    pytest.mark.server_behaviour,
    pytest.mark.better_than_ppft(reason="ppft's server has no --worker-memory-limit"),
]

LIMIT = "200M"
# Bound of every wait for something the server should do soon.
PROMPT = 60.0
ENV = "PPSERVER_WORKER_MEMORY_CGROUP"


def hog(path, seconds):
    """Writes the worker's pid to `path`, then holds 1 GB of touched
    memory (bytes filled with b"x": a bytearray of zeros would stay
    untouched) for `seconds`."""
    import os
    import time

    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(path + ".tmp", path)
    blob = b"x" * 10**9
    time.sleep(seconds)
    return len(blob)


def held(path, gate):
    """Writes the worker's pid to `path`, waits (at most 100 s) for the
    file `gate`, and returns the pid."""
    import os
    import time

    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(path + ".tmp", path)
    deadline = time.monotonic() + 100
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.02)
    return os.getpid()


def square(x):
    return x * x


def child_hog(seconds):
    """Starts a child process that touches 1 GB, and sleeps `seconds`
    without waiting for it (so the job does not end when the child is
    killed); returns the child's exit code."""
    import subprocess
    import sys
    import time

    child = subprocess.Popen([sys.executable, "-c", "blob = b'x' * 10**9"])
    time.sleep(seconds)
    return child.wait()


def memory_cgroup_dir(pid="self"):
    """The directory of process `pid`'s memory cgroup: its place in the
    cgroup v1 memory hierarchy, else its cgroup v2 (where the server puts
    its workers when v2 has the memory controller); None if neither is
    mounted here. Used by jobs too, on their own worker."""
    from pathlib import Path

    lines = [l.split(":", 2) for l in Path("/proc/%s/cgroup" % pid).read_text().splitlines()]
    v1 = [path for _, names, path in lines if "memory" in names.split(",")]
    v2 = [path for _, names, path in lines if names == ""]
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, right = line.split(" - ", 1)
        fields, kind = left.split(), right.split()
        if fields[3] != "/":
            continue
        if v1 and kind[0] == "cgroup" and "memory" in kind[2].split(","):
            return Path(fields[4]) / v1[0].lstrip("/")
        if not v1 and v2 and kind[0] == "cgroup2":
            return Path(fields[4]) / v2[0].lstrip("/")
    return None


LIMIT_FILES = ("memory.memsw.limit_in_bytes", "memory.limit_in_bytes",
               "memory.swap.max", "memory.max")


def lift_limit(done, seconds):
    """Writes "no limit" to the limit files of the job's own memory cgroup
    (swap first: v1 keeps memory.limit_in_bytes at or below memsw), then
    the names of the files it changed to `done`, and sleeps `seconds`."""
    import os
    import time

    here = memory_cgroup_dir()
    changed = []
    for name in LIMIT_FILES:
        try:
            (here / name).write_text("-1" if name.endswith("_in_bytes") else "max")
            changed.append(name)
        except OSError:
            pass
    with open(done + ".tmp", "w") as f:
        f.write(" ".join(changed))
    os.rename(done + ".tmp", done)
    time.sleep(seconds)
    return "lifted"


def leave_and_hog(done, seconds):
    """Moves the worker into the parent of its memory cgroup, writes the
    cgroup it is in now to `done`, touches 300 MB and holds it for
    `seconds`."""
    import os
    import time

    here = memory_cgroup_dir()
    (here.parent / "cgroup.procs").write_text(str(os.getpid()))
    with open(done + ".tmp", "w") as f:
        f.write(str(memory_cgroup_dir()))
    os.rename(done + ".tmp", done)
    blob = b"x" * (3 * 10**8)
    time.sleep(seconds)
    return len(blob)


def v1_memory_dir():
    """This process's directory in the cgroup v1 memory hierarchy (the
    server started by the suite shares it), or None."""
    try:
        own = next(line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
                   if "memory" in line.split(":", 2)[1].split(","))
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, right = line.split(" - ", 1)
            fields, kind = left.split(), right.split()
            if kind[0] == "cgroup" and "memory" in kind[2].split(",") and fields[3] == "/":
                return Path(fields[4]) / own.lstrip("/")
    except (OSError, StopIteration, IndexError):
        pass
    return None


def expected_method(method):
    """What the startup line must say of the method; None: any."""
    if method == "polling":
        return "by polling the PSS of each worker's process group every 100 ms (no cgroup: %s=0)" % ENV
    if os.geteuid() == 0 and v1_memory_dir() is not None:
        return "by cgroup v1 memory controller (%s/ppserver-" % v1_memory_dir()
    return None


def started_value(path):
    return path.exists() and int(path.read_text())


@pytest.mark.parametrize("method", ["default", "polling"])
def test_a_worker_over_the_limit_is_stopped_and_its_job_answered(launch, tmp_path, capsys, method):
    """-w 2 --worker-memory-limit 200M: a job touching 1 GB is answered
    with None and "job exceeded --worker-memory-limit of 200M on HOST", its
    worker stopped and replaced; the job on the other worker runs to its
    end on the same worker; the client's next job works; the restart is
    counted as memory_limit; the cgroups are gone once the server stops."""
    metrics_port = pphelpers.free_port()
    env = pphelpers.server_env({ENV: "0" if method == "polling" else None})
    server = launch("--worker-memory-limit", LIMIT, "--metrics", "127.0.0.1:%d" % metrics_port,
                    nworkers=2, env=env)
    line = "worker memory limit %s by " % LIMIT
    assert wait_until(lambda: line in server.log(), timeout=PROMPT), server.log_tail()
    startup = next(l for l in server.log().splitlines() if line in l)
    expected = expected_method(method)
    assert expected is None or expected in startup, startup

    before = wait_for_pool(server)
    launch.workers.extend(before)
    js = pphelpers.connect_client(server)
    try:
        gate, held_at, hog_at = tmp_path / "gate", tmp_path / "held", tmp_path / "hog"
        steady = js.submit(held, (str(held_at), str(gate)))
        steady_pid = wait_until(lambda: started_value(held_at), "the held job to start",
                                timeout=PROMPT)
        big = js.submit(hog, (str(hog_at), 30))
        hog_pid = wait_until(lambda: started_value(hog_at), "the hog to start", timeout=PROMPT)
        assert {steady_pid, hog_pid} == before, (steady_pid, hog_pid, before)

        assert finished_within(big, PROMPT), "no answer for the job over the limit\n%s" % (
            server.log_tail())
        capsys.readouterr()
        assert big() is None
        out = capsys.readouterr().out
        assert "job exceeded --worker-memory-limit of %s on %s" % (
            LIMIT, socket.gethostname()) in out, out
        assert is_gone(hog_pid), "the answer came before the worker %d was stopped" % hog_pid
        assert not steady.finished, "the held job ended before its gate opened"

        gate.touch()
        assert steady() == steady_pid
        after = wait_for_pool(server, exclude={hog_pid})
        launch.workers.extend(after)
        assert steady_pid in after, (steady_pid, after)
        assert js.submit(square, (7,))() == 49
    finally:
        pphelpers.close_client(js)
    assert server_alive(server)

    samples = pphelpers.metric_samples(pphelpers.metrics_get(metrics_port, "/metrics")[1])
    assert samples[("ppserver_worker_restarts_total", '{cause="memory_limit"}')] == 1, samples
    assert samples[("ppserver_jobs_server_answered_total", '{reason="memory_limit",user="default"}')] == 1

    # A clean stop (not stop_server's SIGKILL after a few seconds, which
    # leaves no time to remove anything): waited for with a generous bound.
    server.proc.send_signal(signal.SIGTERM)
    assert sp.wait_exit(server.proc) == 0, server.log_tail()
    made = v1_memory_dir() and v1_memory_dir() / ("ppserver-%d" % server.proc.pid)
    if made:
        assert not made.exists(), "the server left its cgroup %s behind" % made


@pytest.mark.parametrize("method", ["default", "polling"])
def test_a_child_over_the_limit_stops_its_worker_too(launch, capsys, method):
    """What a job starts counts too: a job whose child process touches
    1 GB under 200M is answered with the limit, its worker stopped and
    replaced, and the next job works. With a cgroup the kernel kills the
    child, not the worker; polling sums the PSS of the worker's process
    group."""
    env = pphelpers.server_env({ENV: "0" if method == "polling" else None})
    server = launch("--worker-memory-limit", LIMIT, nworkers=1, env=env)
    line = "worker memory limit %s by " % LIMIT
    assert wait_until(lambda: line in server.log(), timeout=PROMPT), server.log_tail()
    before = wait_for_pool(server)
    launch.workers.extend(before)
    js = pphelpers.connect_client(server)
    try:
        job = js.submit(child_hog, (30,))
        assert finished_within(job, PROMPT), "no answer\n%s" % server.log_tail()
        capsys.readouterr()
        assert job() is None
        out = capsys.readouterr().out
        assert "job exceeded --worker-memory-limit of %s on" % LIMIT in out, out
        after = wait_for_pool(server, exclude=before)
        launch.workers.extend(after)
        assert js.submit(square, (5,))() == 25
    finally:
        pphelpers.close_client(js)
    assert server_alive(server)


def cgroup_server(launch, limit, metrics_port=None):
    """A server with --worker-memory-limit `limit` and one worker, once its
    startup line is out and its worker is up; skips the test where the
    server polls (no cgroup to get out of)."""
    flags = ["--worker-memory-limit", limit]
    if metrics_port:
        flags += ["--metrics", "127.0.0.1:%d" % metrics_port]
    server = launch(*flags, nworkers=1)
    line = "worker memory limit %s by " % limit
    assert wait_until(lambda: line in server.log(), timeout=PROMPT), server.log_tail()
    if "by polling" in server.log():
        pytest.skip("no memory cgroup here: the server polls")
    launch.workers.extend(wait_for_pool(server))
    return server


def answer_text(job, capsys):
    """The text a finished job's None answer printed."""
    capsys.readouterr()
    assert job() is None, "the job ran to its end"
    return capsys.readouterr().out


def test_a_job_that_lifts_its_cgroup_limit_is_stopped_and_the_slot_keeps_the_limit(
        launch, tmp_path, capsys):
    """-w 1 --worker-memory-limit 100M: a job that writes "no limit" to its
    cgroup's limit files and stays is stopped and answered with the reason;
    the slot's next worker is held to 100M again (a job touching 1 GB is
    answered with the limit). A job that lifts the limit and returns at
    once keeps its answer (unless a check fell within it), and its worker
    is replaced all the same, so the next job is held to the limit too.
    Counted as memory_cgroup."""
    metrics_port = pphelpers.free_port()
    server = cgroup_server(launch, "100M", metrics_port)
    host = socket.gethostname()
    js = pphelpers.connect_client(server)
    try:
        done = tmp_path / "lifted"
        job = js.submit(lift_limit, (str(done), 15))
        assert finished_within(job, PROMPT), "no answer\n%s" % server.log_tail()
        changed = done.read_text().split()
        assert "memory.limit_in_bytes" in changed or "memory.max" in changed, changed
        out = answer_text(job, capsys)
        assert "limit of the worker's memory cgroup was changed" in out, out
        assert "--worker-memory-limit of 100M on %s" % host in out, out

        big = js.submit(hog, (str(tmp_path / "hog1"), 30))
        assert finished_within(big, PROMPT), "no answer\n%s" % server.log_tail()
        out = answer_text(big, capsys)
        assert "job exceeded --worker-memory-limit of 100M on %s" % host in out, out

        quick = js.submit(lift_limit, (str(tmp_path / "lifted2"), 0))
        # Mostly answered before a check falls within it: then the check
        # after its answer replaces the worker.
        caught = quick() is None
        assert caught or quick() == "lifted"
        big = js.submit(hog, (str(tmp_path / "hog2"), 30))
        assert finished_within(big, PROMPT), "no answer\n%s" % server.log_tail()
        out = answer_text(big, capsys)
        assert "job exceeded --worker-memory-limit of 100M on %s" % host in out, out
        assert js.submit(square, (6,))() == 36
    finally:
        pphelpers.close_client(js)
    assert server_alive(server)
    assert "was changed" in server.log(), server.log_tail()
    samples = pphelpers.metric_samples(pphelpers.metrics_get(metrics_port, "/metrics")[1])
    assert samples[("ppserver_worker_restarts_total", '{cause="memory_cgroup"}')] == 2, samples
    assert samples[("ppserver_jobs_server_answered_total", '{reason="memory_cgroup",user="default"}')] == 1 + caught
    assert samples[("ppserver_worker_restarts_total", '{cause="memory_limit"}')] == 2, samples


def test_a_job_that_moves_its_worker_out_of_its_cgroup_is_stopped(launch, tmp_path, capsys):
    """A job that moves its worker into the parent cgroup (no limit there)
    and touches 300 MB under 100M is stopped and answered with the reason,
    not run to its end; the slot's new worker is in the slot's cgroup."""
    server = cgroup_server(launch, "100M")
    js = pphelpers.connect_client(server)
    try:
        done = tmp_path / "left"
        job = js.submit(leave_and_hog, (str(done), 30))
        assert finished_within(job, PROMPT), "no answer\n%s" % server.log_tail()
        slot = "ppserver-%d" % server.proc.pid
        assert done.exists() and not done.read_text().endswith("worker-0"), (
            "the job did not leave its cgroup")
        out = answer_text(job, capsys)
        assert "the worker left its memory cgroup" in out, out
        assert "--worker-memory-limit of 100M on %s" % socket.gethostname() in out, out
        after = wait_for_pool(server)
        launch.workers.extend(after)
        (new,) = after
        # A worker joins its cgroup before it takes its first job.
        assert js.submit(square, (8,))() == 64
        assert slot in str(memory_cgroup_dir(new)), memory_cgroup_dir(new)
    finally:
        pphelpers.close_client(js)
    assert server_alive(server)
    assert "left its memory cgroup" in server.log(), server.log_tail()


def test_groups_left_by_a_killed_server_are_removed_at_the_next_start(launch):
    """A server killed with SIGKILL leaves its cgroup v1 groups
    (ppserver-PID/worker-N); the next server started with the limit
    removes them, and so a hand-made ppserver-PID of a pid that no process
    has (with a process in it, killed first) and one of a process that is
    not a ppserver, while a live server's group is kept."""
    base = v1_memory_dir()
    if os.geteuid() != 0 or base is None:
        pytest.skip("needs root and the cgroup v1 memory controller")
    line = "worker memory limit %s by " % LIMIT
    live = launch("--worker-memory-limit", LIMIT, name="live")
    killed = launch("--worker-memory-limit", LIMIT, name="killed")
    for server in (live, killed):
        assert wait_until(lambda: line in server.log(), timeout=PROMPT), server.log_tail()
        if "by polling" in server.log():
            pytest.skip("no memory cgroup here: the server polls")
        launch.workers.extend(wait_for_pool(server))
    workers = wait_for_pool(killed)
    killed.proc.send_signal(signal.SIGKILL)
    killed.proc.wait()
    wait_until(lambda: all(is_gone(pid) for pid in workers), "the killed server's workers to die")
    left = base / ("ppserver-%d" % killed.proc.pid)
    assert (left / "worker-0").is_dir(), "a killed server leaves its cgroups"

    gone = subprocess.Popen(["true"])
    gone.wait()
    squatter = subprocess.Popen(["sleep", "120"])
    stale = [base / ("ppserver-%d" % gone.pid), base / ("ppserver-%d" % squatter.pid)]
    try:
        for group in stale:
            group.mkdir()
        (stale[0] / "cgroup.procs").write_text(str(squatter.pid))
        new = launch("--worker-memory-limit", LIMIT, name="new")
        assert wait_until(lambda: line in new.log(), timeout=PROMPT), new.log_tail()
        wait_until(lambda: not any(g.exists() for g in [left] + stale),
                   "the stale groups %s to be removed" % [str(g) for g in [left] + stale])
        assert wait_until(lambda: squatter.poll() is not None, timeout=PROMPT), (
            "the process in a stale group was not killed")
        assert (base / ("ppserver-%d" % live.proc.pid) / "worker-0").is_dir(), (
            "a live server's group was removed")
        assert (base / ("ppserver-%d" % new.proc.pid) / "worker-0").is_dir()
        assert server_alive(live)
    finally:
        sigkill(squatter.pid)
        squatter.wait()
        for group in [left / "worker-0", left] + stale:
            try:
                group.rmdir()
            except OSError:
                pass
