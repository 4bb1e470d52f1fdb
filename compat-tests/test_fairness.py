"""Operating a shared server: --job-timeout stops a runaway job's worker
and answers the job, and client hosts get fair shares of the workers
(one host's backlog does not hold another host's job back).

Each test starts its own server (conftest's ``launch``) and speaks the raw
protocol (ppwire) with jobs shipped as source, so the same jobs run on
ppft and pp 1.7.0 workers. Client hosts are loopback source addresses:
127.0.0.2 and 127.0.0.3 (every 127/8 address is local on Linux), bound
before connecting. Jobs write their start to a shared file under a lock,
so the tests check the order in which jobs started, never how long
anything took; a job that holds a worker waits for a gate file the test
creates, which makes that order deterministic. Waits are bounded only so
that a server that never gets there fails.
"""

import socket
from pathlib import Path

import pytest

import ppwire
import serverprocs as sp
from pphelpers import IMPL
from procs import is_gone, unread_from, wait_for_pool, wait_until

# The server's own behaviour, whatever the client family: run with the
# ppft 1.7.8 family only (conftest.py deselects it in the others).
pytestmark = pytest.mark.server_behaviour

# Bound of every wait for something the server should do soon.
PROMPT = 60.0
# The limit under test, and a job that would run far past it.
LIMIT = 2
OVERRUN = 10
# One host's backlog, and the length of its jobs.
BUSY_JOBS = 40
BUSY_SECONDS = 0.2

better = pytest.mark.better_than_ppft

# Starts a child (`sleep`, in the worker's process group), writes
# "<worker pid> <child pid>" to `path`, then sleeps `seconds`.
OVERRUN_SOURCE = (
    "def overrun(path, seconds):\n"
    "    import os, subprocess, time\n"
    "    child = subprocess.Popen(['sleep', str(seconds * 60)])\n"
    "    with open(path + '.tmp', 'w') as f:\n"
    "        f.write('%d %d' % (os.getpid(), child.pid))\n"
    "    os.rename(path + '.tmp', path)\n"
    "    time.sleep(seconds)\n"
    "    return 'ran to its end'\n"
)

# Appends `tag` to the file `path` (under a lock: the line order is the
# order jobs started), waits (at most 60 s) until the file `gate` exists,
# then sleeps `seconds`; returns `tag`.
STARTED_SOURCE = (
    "def started(path, gate, tag, seconds):\n"
    "    import fcntl, os, time\n"
    "    with open(path, 'a') as f:\n"
    "        fcntl.flock(f, fcntl.LOCK_EX)\n"
    "        f.write(tag + '\\n')\n"
    "        f.flush()\n"
    "        fcntl.flock(f, fcntl.LOCK_UN)\n"
    "    deadline = time.monotonic() + 60\n"
    "    while not os.path.exists(gate) and time.monotonic() < deadline:\n"
    "        time.sleep(0.02)\n"
    "    time.sleep(seconds)\n"
    "    return tag\n"
)


def exec_session_from(server, source):
    """An authenticated EXEC connection whose client address is `source`."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(PROMPT)
        sock.bind((source, 0))
        sock.connect((server.host, server.port))
        _, _, reply = ppwire.handshake(sock, server.secret)
        assert reply == b"OK", reply
        ppwire.send_frame(sock, "EXEC")
    except BaseException:
        sock.close()
        raise
    return sock


def wait_all_read(server, client_ip, connections):
    last = []

    def read():
        last[:] = unread_from(server, client_ip)
        return last[0] >= connections and last[1] == 0

    assert wait_until(read, timeout=PROMPT), (
        "the server did not read what %d connections from %s sent (found %r)\n%s"
        % (connections, client_ip, last, server.log_tail()))


def start_order(path):
    try:
        return Path(path).read_text().split()
    except FileNotFoundError:
        return []


def wait_started(path, count, server):
    assert wait_until(lambda: len(start_order(path)) >= count, timeout=PROMPT), (
        "%d jobs started, expected %d\n%s" % (len(start_order(path)), count, server.log_tail()))


def result_of(sock, server, what):
    try:
        return ppwire.recv_result(sock)
    except OSError as exc:  # a timeout included
        raise AssertionError("no answer to %s: %s\n%s" % (what, exc, server.log_tail()))


def raw_job(server, name, source, args):
    sock = exec_session_from(server, "127.0.0.1")
    try:
        ppwire.send_job(sock, ppwire.function_package(name, [source]), args)
        return result_of(sock, server, name)
    finally:
        sock.close()


@better(reason="ppft's server has no --job-timeout")
def test_a_job_past_job_timeout_is_answered_and_its_worker_replaced(launch, tmp_path):
    """--job-timeout 2, one worker: a 10 s job (which started a child) is
    answered with (None, "job exceeded --job-timeout of 2 s on <host>"); by
    then its worker and the child in its process group are gone; the next
    job runs fine, on a fresh worker."""
    server = launch("--job-timeout", LIMIT, nworkers=1)
    old = wait_for_pool(server)
    launch.workers.extend(old)
    path = tmp_path / "overrun"
    result, text = raw_job(server, "overrun", OVERRUN_SOURCE, (str(path), OVERRUN))
    assert result is None, (result, text)
    expected = "job exceeded --job-timeout of %d s on %s" % (LIMIT, socket.gethostname())
    assert expected in text, text
    worker, child = map(int, path.read_text().split())
    assert {worker} == old
    assert is_gone(worker), "the answer came before the worker %d was stopped" % worker
    assert wait_until(lambda: is_gone(child), timeout=PROMPT), (
        "the job's child %d outlived its stopped worker\n%s" % (child, server.log_tail()))

    new = wait_for_pool(server, exclude=old)
    pid, _ = raw_job(server, "worker_pid", sp.PID_SOURCE, ())
    assert pid in new and pid != worker
    assert server.proc.poll() is None


@better(reason="ppft's server serves jobs first come, first served, whatever their host")
def test_a_single_job_is_not_queued_behind_another_hosts_backlog(launch, tmp_path):
    """Two workers. Host 127.0.0.2 sends 40 jobs of 0.2 s over 40
    connections: two run (held at a gate), 38 are queued. Then host
    127.0.0.3 sends one job, and the gate opens. Hosts take turns for free
    workers, so the single job starts before all but about (workers + 1)
    of the other host's jobs, not after all 40; every job is answered."""
    server = launch(nworkers=2)
    launch.workers.extend(wait_for_pool(server))
    starts, gate = tmp_path / "starts", tmp_path / "gate"
    package = ppwire.function_package("started", [STARTED_SOURCE])
    socks = []
    try:
        single = exec_session_from(server, "127.0.0.3")
        socks.append(single)
        busy = []
        for _ in range(BUSY_JOBS):
            busy.append(exec_session_from(server, "127.0.0.2"))
            socks.append(busy[-1])
        for i, sock in enumerate(busy):
            ppwire.send_job(sock, package, (str(starts), str(gate), "busy%d" % i, BUSY_SECONDS))
        wait_started(starts, server.nworkers, server)
        wait_all_read(server, "127.0.0.2", BUSY_JOBS)
        assert len(start_order(starts)) == server.nworkers, "the gate holds every worker"

        ppwire.send_job(single, package, (str(starts), str(gate), "single", BUSY_SECONDS))
        wait_all_read(server, "127.0.0.3", 1)
        gate.touch()

        assert result_of(single, server, "the single job")[0] == "single"
        for i, sock in enumerate(busy):
            assert result_of(sock, server, "busy%d" % i)[0] == "busy%d" % i
    finally:
        for sock in socks:
            sock.close()

    order = start_order(starts)
    assert sorted(order) == sorted(["single"] + ["busy%d" % i for i in range(BUSY_JOBS)]), order
    before = order.index("single")
    assert before <= server.nworkers + 2, (
        "the single job started after %d of the other host's %d jobs: %s"
        % (before, BUSY_JOBS, order))


@pytest.mark.skipif(IMPL == "python", reason="ppft's server reads each connection on a thread "
                    "of its own: the order in which it queues jobs read together is not defined")
def test_one_host_is_served_first_come_first_served(launch, tmp_path):
    """Fair share changes nothing for a single host: two workers, eight
    connections from 127.0.0.2; the first two jobs hold the workers (at
    gates), the next six are sent one at a time, each once the server has
    read the one before; they start in the order they were sent. The first
    job holds its worker until the end, so the six take turns on the other
    one: two workers freed at the same moment would start their next jobs
    in whichever order the machine happens to run them."""
    server = launch(nworkers=2)
    launch.workers.extend(wait_for_pool(server))
    starts, gate, last_gate = tmp_path / "starts", tmp_path / "gate", tmp_path / "last-gate"
    package = ppwire.function_package("started", [STARTED_SOURCE])
    socks = []
    try:
        for _ in range(8):
            socks.append(exec_session_from(server, "127.0.0.2"))
        for i, sock in enumerate(socks):
            ppwire.send_job(sock, package, (str(starts), str(last_gate if i == 0 else gate),
                                            "job%d" % i, BUSY_SECONDS))
            if i + 1 == server.nworkers:
                wait_started(starts, server.nworkers, server)
            wait_all_read(server, "127.0.0.2", len(socks))
        gate.touch()
        for i, sock in enumerate(socks[1:], 1):
            assert result_of(sock, server, "job%d" % i)[0] == "job%d" % i
        last_gate.touch()
        assert result_of(socks[0], server, "job0")[0] == "job0"
    finally:
        for sock in socks:
            sock.close()
    order = start_order(starts)
    assert sorted(order[:2]) == ["job0", "job1"], order
    assert order[2:] == ["job%d" % i for i in range(2, 8)], order
