"""Open files: the server raises its open-file soft limit to the hard one
and gives workers the original back; budgets that the limit cannot hold
are lowered to fit (or, given explicitly, refused at startup); the
metrics port caps its connections. Under each, a flood of silent sockets
from 127.0.0.2 must leave room for a client on 127.0.0.1 and for a worker
to be replaced.

Each server starts under its own RLIMIT_NOFILE (soft:hard), set by a
small exec wrapper in place of `prlimit --nofile=...`. The floods keep
their sockets open, and open one again for every one the server closes,
so the server is under constant pressure; they are counted in this
process, whose own soft limit is raised for them.

No wall-clock thresholds: every wait is a generous upper bound against a
hang (a scrape's timeout is a bound for a server that would never answer,
not a measure of speed).
"""

import resource
import selectors
import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

import pphelpers
import serverprocs as sp
from procs import fd_count, sigkill, wait_for_pool, wait_until, worker_pids

pytestmark = [
    pytest.mark.server_behaviour,
    # Descriptor counts of its own servers under floods of sockets: one
    # test at a time under xdist.
    pytest.mark.xdist_group("openfiles"),
    pytest.mark.better_than_ppft(
        reason="ppft's server keeps the soft limit it is given and has no budgets"),
]

FLOODER = "127.0.0.2"
FLOOD = 1500            # silent sockets against the client port
METRICS_FLOOD = 1000    # idle sockets against the metrics port
LOW = 512               # the limit under which the default budgets cannot fit
SOFT = 256              # the soft limit a login shell might give
# The hard limit the wide tests use: this machine allows 20000.
_, OUR_HARD = resource.getrlimit(resource.RLIMIT_NOFILE)
HARD = 20000 if OUR_HARD == resource.RLIM_INFINITY else min(20000, OUR_HARD)
SCRAPE_TIMEOUT = 20.0   # seconds a scrape may take before it counts as unanswered
SCRAPES = 24            # one every half second: longer than the port's timeouts
NWORKERS = 2

# Run as `python -c SETLIMIT SOFT HARD PROGRAM ARGS...`: sets the limits,
# then becomes the program (same pid), as `prlimit --nofile=S:H` would.
SETLIMIT = ("import os, resource, sys; "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2]))); "
            "os.execv(sys.argv[3], sys.argv[3:])")


def worker_nofile(nap):
    """A job: its worker's pid and open-file limits (soft, hard)."""
    import os
    import resource
    import time
    time.sleep(nap)
    return os.getpid(), tuple(resource.getrlimit(resource.RLIMIT_NOFILE))


def square(x):
    return x * x


# --- servers under a limit ------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def room_for_the_floods():
    """This process holds a flood and a client at once: raise its own soft
    limit for them (restored afterwards)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4 * FLOOD
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip("the hard open-file limit %d is too low for a %d-socket flood" % (hard, FLOOD))
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def limited_command(soft, hard, *flags, nworkers=NWORKERS, port):
    """The server's command line under RLIMIT_NOFILE soft:hard."""
    server = pphelpers.server_command("-i", "127.0.0.1", "-p", port, "-w", nworkers,
                                      "-s", pphelpers.SECRET, *flags)
    return [sys.executable, "-c", SETLIMIT, str(soft), str(hard), *server]


@pytest.fixture
def limited(tmp_path):
    """limited(soft, hard, *flags) -> a started server (pphelpers.launch)
    whose open-file limit was soft:hard when it started; stopped after the
    test."""
    started = []

    def start(soft, hard, *flags, nworkers=NWORKERS):
        port = pphelpers.free_port()
        argv = limited_command(soft, hard, *flags, nworkers=nworkers, port=port)
        handle = pphelpers.setup_or_fail(
            pphelpers.launch, argv, tmp_path / ("server%d.log" % len(started)), port=port,
            nworkers=nworkers)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        pphelpers.stop_server(handle)


def open_files_limits(pid):
    """(soft, hard) "Max open files" of a process, from /proc/PID/limits."""
    for line in Path("/proc/%d/limits" % pid).read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-file limit in /proc/%d/limits" % pid)


def startup_line(server):
    """The startup line, which the log thread writes a moment after the
    socket listens."""
    return server.logged("listening on")


# --- a flood that holds its sockets -----------------------------------------------


class HeldFlood(threading.Thread):
    """Keeps `size` connections from `source` to `port` open, sending
    nothing: each one the server closes (or that fails) is opened again at
    once. Non-blocking connects through epoll, so a server that stops
    accepting cannot stall the flood, and more than select's 1024 sockets
    fit. Counts the connections opened, and those the server closed
    before sending a byte (`refused`) or after (`timed_out`)."""

    def __init__(self, port, size, source=FLOODER, host="127.0.0.1"):
        super().__init__(daemon=True)
        self.addr, self.size, self.source = (host, port), size, source
        self.opened = self.refused = self.timed_out = 0
        self.error = None
        self._stop_event = threading.Event()

    def _open(self, sel, received):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.bind((self.source, 0))
        sock.connect_ex(self.addr)  # EINPROGRESS; a failure shows as readable
        sel.register(sock, selectors.EVENT_READ)
        received[sock] = 0
        self.opened += 1

    def run(self):
        sel = selectors.DefaultSelector()
        received = {}  # socket -> bytes the server sent on it
        try:
            while not self._stop_event.is_set():
                while len(received) < self.size:
                    self._open(sel, received)
                for key, _ in sel.select(timeout=0.05):
                    sock = key.fileobj
                    try:
                        data = sock.recv(4096)
                    except BlockingIOError:
                        continue
                    except OSError:  # refused, reset
                        data = b""
                    if data:
                        received[sock] += len(data)
                        continue
                    if received.pop(sock):
                        self.timed_out += 1
                    else:
                        self.refused += 1
                    sel.unregister(sock)
                    sock.close()
        except Exception as exc:  # reported by stop()
            self.error = exc
        finally:
            for sock in received:
                sock.close()
            sel.close()

    def stop(self):
        self._stop_event.set()
        self.join(30)
        assert self.error is None, "the flood failed: %r" % (self.error,)

    def counts(self):
        return "opened %d, refused %d, timed out %d" % (self.opened, self.refused,
                                                       self.timed_out)


def wait_for_pressure(server, flood, soft_limit):
    """Wait (bounded) until the flood is in place: all its sockets opened,
    and the server either turning away as many as the flood holds or out
    of descriptors (a server without budgets that fit)."""
    def pressed():
        if flood.error:
            return True
        return flood.opened >= flood.size and (
            flood.refused + flood.timed_out >= flood.size
            or fd_count(server.proc.pid) >= soft_limit - 8)

    wait_until(pressed, "the flood to be in place (%s)" % flood.counts(), timeout=60)
    assert flood.error is None, "the flood failed: %r" % (flood.error,)


# --- what jobs see ---------------------------------------------------------------


def nofile_seen_by_jobs(js, rounds=1):
    """{worker pid: (soft, hard)} from 2 jobs per worker at once, `rounds`
    times, so every worker runs some."""
    seen = {}
    for _ in range(rounds):
        jobs = [js.submit(worker_nofile, (0.3,)) for _ in range(2 * NWORKERS)]
        for job in jobs:
            result = job()
            assert result is not None, "a job failed"
            pid, limits = result
            seen.setdefault(pid, set()).add(limits)
    return seen


def kill_a_worker_and_wait_for_its_replacement(server):
    """SIGKILL one worker; wait (bounded) for the pool to be full again
    without it. Returns the pids of the workers new since the kill."""
    before = wait_for_pool(server)
    victim = sorted(before)[0]
    assert sigkill(victim)
    return wait_for_pool(server, exclude={victim}) - before


def jobs_run_from_a_client(server, n=20):
    js = pphelpers.connect_client(server)
    try:
        jobs = [js.submit(square, (i,)) for i in range(n)]
        assert [job() for job in jobs] == [i * i for i in range(n)]
    finally:
        pphelpers.close_client(js)


# --- the tests -------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_the_soft_limit_is_raised_and_every_worker_gets_the_original_back(limited):
    """Started under 256:HARD, the server's own soft limit is HARD (in
    /proc/PID/limits); jobs on the first workers and on a replacement for
    a killed one see 256:HARD, as under ppft's server."""
    server = limited(SOFT, HARD)
    assert open_files_limits(server.proc.pid) == (HARD, HARD), server.log_tail()
    assert "lowered" not in startup_line(server), "the defaults fit under %d" % HARD
    js = pphelpers.connect_client(server)
    try:
        first = nofile_seen_by_jobs(js)
        replacements = kill_a_worker_and_wait_for_its_replacement(server)
        assert replacements
        seen = {}
        wait_until(lambda: seen.update(nofile_seen_by_jobs(js)) or replacements & set(seen),
                   "a job on the replacement worker %s" % sorted(replacements), timeout=120)
    finally:
        pphelpers.close_client(js)
    for pid, limits in list(first.items()) + list(seen.items()):
        assert limits == {(SOFT, HARD)}, "worker %d saw %s" % (pid, limits)


@pytest.mark.timeout(300)
def test_a_flood_leaves_room_for_a_client_and_a_replacement_under_a_raised_limit(limited):
    """Started under 256:HARD, while 1,500 silent sockets from 127.0.0.2
    are held and reopened: a worker killed is replaced, and a client on
    127.0.0.1 logs in and gets its jobs, which still see 256."""
    server = limited(SOFT, HARD)
    flood = HeldFlood(server.port, FLOOD)
    flood.start()
    try:
        wait_for_pressure(server, flood, SOFT)
        kill_a_worker_and_wait_for_its_replacement(server)
        js = pphelpers.connect_client(server)
        try:
            jobs = [js.submit(square, (i,)) for i in range(20)]
            assert [job() for job in jobs] == [i * i for i in range(20)]
            seen = nofile_seen_by_jobs(js)
        finally:
            pphelpers.close_client(js)
    finally:
        flood.stop()
    print("flood: %s" % flood.counts())
    assert all(limits == {(SOFT, HARD)} for limits in seen.values()), seen


@pytest.mark.timeout(300)
def test_budgets_shrink_to_fit_a_low_hard_limit_and_still_leave_room(limited):
    """Started under 512:512, where the default budgets (4096 + 1024)
    cannot fit: the startup line says they were lowered, and under the same
    flood a worker killed is replaced and a client gets its jobs."""
    server = limited(LOW, LOW)
    line = startup_line(server)
    assert "open-file limit %d: lowered --max-connections to " % LOW in line, line
    assert "--max-handshakes to " in line, line
    assert open_files_limits(server.proc.pid) == (LOW, LOW)
    flood = HeldFlood(server.port, FLOOD)
    flood.start()
    try:
        wait_for_pressure(server, flood, LOW)
        kill_a_worker_and_wait_for_its_replacement(server)
        jobs_run_from_a_client(server)
        assert fd_count(server.proc.pid) < LOW
    finally:
        flood.stop()
    print("flood: %s; %s" % (flood.counts(), line))


def test_a_given_budget_that_cannot_fit_is_a_startup_error():
    """--max-connections 4096 under 512:512 stops the server at startup
    with a message naming the flag, its value and the limit."""
    argv = limited_command(LOW, LOW, "--max-connections", "4096",
                           port=pphelpers.free_port())
    code, out, err = sp.run_to_exit(argv)
    text = out + err
    assert code != 0, text
    assert "--max-connections 4096" in text and "open-file limit is %d" % LOW in text, text


def scrape(port):
    """GET /metrics (from 127.0.0.1, loopback's own source address); the
    page, or the error if it was not answered within SCRAPE_TIMEOUT."""
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port,
                                    timeout=SCRAPE_TIMEOUT) as response:
            return response.read().decode()
    except OSError as exc:
        return exc


@pytest.mark.timeout(300)
def test_the_metrics_port_answers_and_jobs_run_while_idle_sockets_flood_it(limited):
    """Under a 512 descriptor limit, 1,000 idle connections from 127.0.0.2
    held (and reopened) on the metrics port: scrapes from 127.0.0.1, one
    every half second for longer than the port's timeouts, are all
    answered (each within a generous bound), the server never comes near
    its limit nor fails an accept, and a client's jobs run."""
    metrics_port = pphelpers.free_port()
    server = limited(LOW, LOW, "--metrics", "127.0.0.1:%d" % metrics_port)
    flood = HeldFlood(metrics_port, METRICS_FLOOD)
    flood.start()
    fds = []
    try:
        wait_for_pressure(server, flood, LOW)
        pages = []
        for _ in range(SCRAPES):
            pages.append(scrape(metrics_port))
            fds.append(fd_count(server.proc.pid))
            if not isinstance(pages[-1], str):
                break  # failed: no need to wait out the others' bounds
            time.sleep(0.5)
        failed = [p for p in pages if not isinstance(p, str)]
        assert not failed, "%d of %d scrapes unanswered: %r (flood: %s)" % (
            len(failed), SCRAPES, failed[:3], flood.counts())
        assert all("ppserver_jobs_received_total" in p for p in pages)
        jobs_run_from_a_client(server)
        fds.append(fd_count(server.proc.pid))
    finally:
        flood.stop()
    print("flood: %s; server descriptors %d to %d" % (flood.counts(), min(fds), max(fds)))
    assert max(fds) < LOW - 32, "the flood took the server to %d descriptors" % max(fds)
    # Read once the server has exited (SIGTERM: it writes out its log as it
    # exits): a failed accept the log thread had not written yet counts too.
    assert pphelpers.stop_server(server) is None, server.log_tail()
    failures = [l for l in server.log().splitlines() if "accept failed" in l]
    assert not failures, failures[:3]
