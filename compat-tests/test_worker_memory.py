"""--worker-memory-limit: a worker that goes over it is stopped, its job
answered with None and the reason, and a fresh worker takes its place,
while the other worker and its job carry on.

Run twice: with the method the server picks here (a memory cgroup per
slot where it can make them: cgroup v1 as root on this test host), and
with polling (PPSERVER_WORKER_MEMORY_CGROUP=0 in the server's
environment). A job allocates and touches 1 GB under a 200M limit; the
job on the other worker waits at a gate the test opens once the first is
answered, so "meanwhile" is an order, not a time. With a cgroup, what a
job starts counts too: a job whose child touches 1 GB is answered the same
way. Waits are bounded only so that a server that never gets there fails.
"""

import os
import signal
import socket
from pathlib import Path

import pytest

import pphelpers
import serverprocs as sp
from faulthelpers import finished_within, server_alive
from procs import is_gone, wait_for_pool, wait_until

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
        return "by polling each worker's PSS every 100 ms (no cgroup: %s=0)" % ENV
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
    assert samples[("ppserver_jobs_server_answered_total", '{reason="memory_limit"}')] == 1

    # A clean stop (not stop_server's SIGKILL after a few seconds, which
    # leaves no time to remove anything): waited for with a generous bound.
    server.proc.send_signal(signal.SIGTERM)
    assert sp.wait_exit(server.proc) == 0, server.log_tail()
    made = v1_memory_dir() and v1_memory_dir() / ("ppserver-%d" % server.proc.pid)
    if made:
        assert not made.exists(), "the server left its cgroup %s behind" % made


def test_a_child_over_the_limit_stops_its_worker_too(launch, capsys):
    """With a cgroup, what a job starts counts too: a job whose child
    process touches 1 GB under 200M (the kernel kills the child, not the
    worker) is answered with the limit, its worker stopped and replaced,
    and the next job works. Polling counts the worker alone: skipped
    there."""
    server = launch("--worker-memory-limit", LIMIT, nworkers=1)
    line = "worker memory limit %s by " % LIMIT
    assert wait_until(lambda: line in server.log(), timeout=PROMPT), server.log_tail()
    if "by polling" in server.log():
        pytest.skip("no memory cgroup here: polling counts the worker process alone")
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
