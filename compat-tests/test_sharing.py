"""Sharing a server between users (--users): workers kept to one user,
fair shares by weight, and each user's limits.

- Isolation (-w 1): what one user's job leaves in its worker (a module
  global, an attribute of builtins) is never seen by another user's job;
  a user's next job runs on in the worker that served it, and after
  another user had the slot, in a fresh worker.
- max_workers = 1 on -w 2: the user's jobs never overlap, and another
  user's job runs meanwhile.
- weight 3 against 1, both users with jobs queued: about 3 jobs to 1.
- max_queued = 2: no more than 2 of the user's jobs ever wait; every job
  is answered.
- job_timeout: one user's own limit stops its job; another user's job of
  the same length runs to its end.
- The memory budget: one user's queued arguments cannot take the whole
  --memory-limit; another user's job is still read and run.

Order of events, not durations: jobs write their start and end times to a
shared file under a lock, and the tests compare those; every wait is a
generous bound on a condition.
"""

import os
import socket
import threading
from pathlib import Path

import pytest

import pphelpers
import ppwire
from common_jobs import look, mark, span
from procs import unread_from, wait_until

pytestmark = [
    pytest.mark.server_behaviour,
    pytest.mark.better_than_ppft(reason="ppft's server has one secret and shares its workers"),
]

# Bound of every wait for something the server should do soon.
PROMPT = 60.0


def users_file(tmp_path, text):
    path = tmp_path / "users"
    path.write_text(text)
    os.chmod(path, 0o600)
    return path


def events(path):
    """[(kind, tag, time)] of the file `span` jobs wrote, in time order."""
    try:
        lines = Path(path).read_text().split("\n")
    except FileNotFoundError:
        return []
    found = [line.split() for line in lines if line]
    return sorted(((k, t, float(s)) for k, t, s in found), key=lambda e: e[2])


def intervals(path, prefix):
    """{tag: (start, end)} of the jobs whose tag starts with `prefix`."""
    spans = {}
    for kind, tag, when in events(path):
        if tag.startswith(prefix):
            spans.setdefault(tag, [None, None])[0 if kind == "S" else 1] = when
    return {tag: tuple(se) for tag, se in spans.items()}


def metric(port, name, labels=""):
    _, page = pphelpers.metrics_get(port, "/metrics")
    return pphelpers.metric_samples(page).get((name, labels))


def test_a_users_globals_are_never_seen_by_another_users_job(launch, tmp_path):
    """-w 1, users a and b. a's job leaves a module global and a builtins
    attribute; a's next job runs in the same worker and sees them; b's
    job then runs in another worker and sees neither; a's job after b's
    runs in neither b's worker nor sees b's marks."""
    path = users_file(tmp_path, "[a]\nsecret = a-secret\n[b]\nsecret = b-secret\n")
    port = pphelpers.free_port()
    server = launch("--users", path, "--metrics", "127.0.0.1:%d" % port, "-d",
                    nworkers=1, with_secret=False, secret="a-secret")
    a = pphelpers.connect_client(server, secret="a-secret")
    b = pphelpers.connect_client(server, secret="b-secret")
    try:
        first = a.submit(mark, ("a",))()
        assert a.submit(look, ())() == (first, "a", "a"), "a keeps its worker"

        pid_b, global_b, builtin_b = b.submit(look, ())()
        assert (global_b, builtin_b) == (None, None), (
            "b's job saw what a's job left in its worker\n%s" % server.log_tail())
        assert pid_b != first
        assert b.submit(mark, ("b",))() == pid_b

        pid_a, global_a, builtin_a = a.submit(look, ())()
        assert pid_a not in (pid_b, first), server.log_tail()
        assert (global_a, builtin_a) == (None, None), "a fresh worker for a"
    finally:
        pphelpers.close_client(a)
        pphelpers.close_client(b)
    assert metric(port, "ppserver_worker_restarts_total", '{cause="user_switch"}') >= 2
    server.logged("replaced by a fresh one for b's job")


def test_a_user_at_max_workers_runs_one_job_at_a_time_and_others_run_meanwhile(launch, tmp_path):
    """-w 2, a with max_workers = 1 sends four 1 s jobs; b sends one once
    a's first has started. No two of a's jobs overlap, and b's job starts
    before a's second job ends."""
    path = users_file(tmp_path, "[a]\nsecret = a-secret\nmax_workers = 1\n"
                                "[b]\nsecret = b-secret\n")
    server = launch("--users", path, nworkers=2, with_secret=False, secret="a-secret")
    log = tmp_path / "spans"
    a = pphelpers.connect_client(server, secret="a-secret")
    b = pphelpers.connect_client(server, secret="b-secret")
    try:
        a_jobs = [a.submit(span, (str(log), "a%d" % i, 1.0)) for i in range(4)]
        assert wait_until(lambda: intervals(log, "a"), timeout=PROMPT), server.log_tail()
        b_job = b.submit(span, (str(log), "b", 0.0))
        assert [j() for j in a_jobs] == ["a0", "a1", "a2", "a3"]
        assert b_job() == "b"
    finally:
        pphelpers.close_client(a)
        pphelpers.close_client(b)
    spans = sorted(intervals(log, "a").values())
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end, "two of a's jobs overlapped: %r" % spans
    b_start = intervals(log, "b")["b"][0]
    assert b_start < spans[1][1], "b's job waited for a's: %r, b at %r" % (spans, b_start)


def test_weights_share_the_workers_3_to_1(launch, tmp_path):
    """-w 2, a with weight 3 and b with weight 1, each submitting 30 jobs
    of 0.2 s over many connections: while both have jobs waiting (from
    b's first start to a's last), a starts about 3 jobs for each of b's."""
    path = users_file(tmp_path, "[a]\nsecret = a-secret\nweight = 3\n"
                                "[b]\nsecret = b-secret\nweight = 1\n")
    server = launch("--users", path, "--advertise-ncpus", "6", nworkers=2,
                    with_secret=False, secret="a-secret")
    log = tmp_path / "spans"
    a = pphelpers.connect_client(server, secret="a-secret")
    b = pphelpers.connect_client(server, secret="b-secret")
    try:
        jobs = []
        for i in range(30):
            jobs.append(a.submit(span, (str(log), "a%d" % i, 0.2)))
            jobs.append(b.submit(span, (str(log), "b%d" % i, 0.2)))
        assert all(j() for j in jobs)
    finally:
        pphelpers.close_client(a)
        pphelpers.close_client(b)
    starts = [(tag[0], when) for kind, tag, when in events(log) if kind == "S"]
    first_b = min(when for user, when in starts if user == "b")
    first_a = min(when for user, when in starts if user == "a")
    last_a = max(when for user, when in starts if user == "a")
    last_b = max(when for user, when in starts if user == "b")
    begin, end = max(first_a, first_b), min(last_a, last_b)
    count = {"a": 0, "b": 0}
    for user, when in starts:
        if begin <= when <= end:
            count[user] += 1
    assert count["b"] > 0, count
    ratio = count["a"] / count["b"]
    assert 2 <= ratio <= 4.5, "a:b = %r while both waited" % count


GATE_SOURCE = (
    "def gate(path):\n"
    "    import os, time\n"
    "    deadline = time.monotonic() + 120\n"
    "    while not os.path.exists(path) and time.monotonic() < deadline:\n"
    "        time.sleep(0.02)\n"
    "    return 'opened'\n"
)


def exec_session(server, secret):
    sock = ppwire.open_session(server.host, server.port, secret, "EXEC")
    sock.settimeout(PROMPT)
    return sock


def start_gate(server, secret, gate):
    """An EXEC connection running a job that holds its worker until the
    file `gate` exists; returns once the job has been received."""
    sock = exec_session(server, secret)
    ppwire.send_job(sock, ppwire.function_package("gate", [GATE_SOURCE]), (str(gate),))
    return sock


def test_max_queued_holds_the_users_further_jobs_unread(launch, tmp_path):
    """-w 1, a with max_queued = 2: one job holds the worker at a gate,
    nine more are sent on nine connections. Each of the nine reads the
    server's queued jobs as it starts: never more than 2; all ten are
    answered."""
    path = users_file(tmp_path, "[a]\nsecret = a-secret\nmax_queued = 2\n"
                                "[b]\nsecret = b-secret\n")
    port = pphelpers.free_port()
    server = launch("--users", path, "--metrics", "127.0.0.1:%d" % port, nworkers=1,
                    with_secret=False, secret="a-secret")
    gate = tmp_path / "gate"
    socks = []
    try:
        socks.append(start_gate(server, "a-secret", gate))
        assert wait_until(lambda: metric(port, "ppserver_jobs_running") == 1, timeout=PROMPT)
        source = ppwire.function_package(
            "queued_seen", [
                "def queued_seen(port):\n"
                "    import re, urllib.request\n"
                "    url = 'http://127.0.0.1:%d/metrics' % port\n"
                "    with urllib.request.urlopen(url, timeout=30) as r:\n"
                "        page = r.read().decode()\n"
                "    m = re.search(r'^ppserver_jobs_queued (\\S+)$', page, re.M)\n"
                "    return int(float(m.group(1)))\n"])
        for _ in range(9):
            sock = exec_session(server, "a-secret")
            socks.append(sock)
            ppwire.send_job(sock, source, (port,))
        assert wait_until(lambda: metric(port, "ppserver_jobs_queued") >= 2, timeout=PROMPT), (
            server.log_tail())
        gate.touch()
        assert ppwire.recv_result(socks[0])[0] == "opened"
        seen = [ppwire.recv_result(sock)[0] for sock in socks[1:]]
    finally:
        gate.touch()
        for sock in socks:
            sock.close()
    assert max(seen) <= 2, "queued jobs seen as each started: %r" % seen
    assert metric(port, "ppserver_jobs_received_total", '{user="a"}') == 10


NAP_SOURCE = "def nap(seconds):\n    import time\n    time.sleep(seconds)\n    return seconds\n"


def test_a_users_job_timeout_stops_its_job_and_not_another_users(launch, tmp_path):
    """a has job_timeout = 1, b none (and no --job-timeout): a's 3 s job is
    answered None with the job-timeout text, b's 3 s job runs to its end."""
    path = users_file(tmp_path, "[a]\nsecret = a-secret\njob_timeout = 1\n"
                                "[b]\nsecret = b-secret\n")
    server = launch("--users", path, nworkers=2, with_secret=False, secret="a-secret")
    results = {}

    def run(secret):
        sock = exec_session(server, secret)
        try:
            ppwire.send_job(sock, ppwire.function_package("nap", [NAP_SOURCE]), (3,))
            results[secret] = ppwire.recv_result(sock)
        finally:
            sock.close()

    threads = [threading.Thread(target=run, args=(s,)) for s in ("a-secret", "b-secret")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=PROMPT)
    result, text = results["a-secret"]
    assert result is None, results
    assert "job exceeded --job-timeout of 1 s on %s" % socket.gethostname() in text, text
    assert results["b-secret"][0] == 3, results


LENGTH_SOURCE = "def length(blob):\n    return len(blob)\n"
MIB = 1 << 20


def test_one_users_queued_arguments_leave_room_for_another_users_job(launch, tmp_path):
    """--memory-limit 16M, -w 2, a with max_workers = 1. a's job holds a
    worker at a gate, and a sends twenty jobs of 3 MiB arguments on twenty
    connections, more than the whole budget. b's small job is still read
    and run while a's wait; then the gate opens and all of a's jobs are
    answered."""
    path = users_file(tmp_path, "[a]\nsecret = a-secret\nmax_workers = 1\n"
                                "[b]\nsecret = b-secret\n")
    server = launch("--users", path, "--memory-limit", "16M", nworkers=2,
                    with_secret=False, secret="a-secret")
    gate = tmp_path / "gate"
    package = ppwire.function_package("length", [LENGTH_SOURCE])
    answers, errors = [], []

    def flood():
        try:
            sock = exec_session(server, "a-secret")
            sock.settimeout(4 * PROMPT)
            try:
                ppwire.send_job(sock, package, (b"a" * (3 * MIB),))
                answers.append(ppwire.recv_result(sock)[0])
            finally:
                sock.close()
        except Exception as exc:  # reported by the test
            errors.append(exc)

    held = start_gate(server, "a-secret", gate)
    flooders = [threading.Thread(target=flood) for _ in range(20)]
    try:
        for t in flooders:
            t.start()
        # a has filled its share: its frames wait for room.
        assert wait_until(lambda: unread_a(server) > 0, timeout=PROMPT), server.log_tail()
        sock = exec_session(server, "b-secret")
        try:
            ppwire.send_job(sock, package, (b"b" * 1000,))
            assert ppwire.recv_result(sock)[0] == 1000, server.log_tail()
        finally:
            sock.close()
    finally:
        gate.touch()
        for t in flooders:
            t.join(timeout=4 * PROMPT)
        held.close()
    assert not errors, errors
    assert answers == [3 * MIB] * 20


def unread_a(server):
    """Bytes a's connections sent that the server has not read yet."""
    return unread_from(server, "127.0.0.1")[1]
