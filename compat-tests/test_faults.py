"""Never hang, never lose a job: workers that die mid-job, malformed
packages that make ppft's worker exit, clients that vanish with jobs still
queued, and workers SIGKILLed at random under load. (A client that leaves
while its job runs: test_processes.py.)

Worker processes are found from outside, as the children of the server
process running `python -u -m ppft`. No wall-clock thresholds: waits are
bounded only so a server that never answers fails instead of hanging, and
the one deadline that matters (abandoned jobs) is a logical bound, a large
fraction of the time the abandoned work would take if it were run.
"""

import os
import pickle
import random
import signal

import pytest

import faultjobs
import ppwire
from common_jobs import assert_all_workers_in_parallel
from faulthelpers import Killer, assert_died_text, exec_session, finished_within
from pphelpers import json_reports, run_client_script
from procs import held_connections, wait_for_pool, wait_until

PPSERVER_WORKERS = 3

# A job whose worker died must be answered well before the job itself would
# have ended; this is a hang guard, not a speed requirement.
ANSWER_DEADLINE = 30.0

NOT_PPFT = pytest.mark.better_than_ppft(
    reason="ppft's server never notices a dead worker: the job hangs its client"
)


def _started(directory, name):
    path = directory / ("%s.start" % name)
    return path.exists() and int(path.read_text())


def _starts(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".start"))


@NOT_PPFT
def test_sigkilled_worker_answers_none_and_is_replaced(pp_client, ppserver, tmp_path, capsys):
    """SIGKILL the worker running a long job: the client gets None at once
    (the job would sleep for 10 minutes), with text saying the worker died
    and of which signal; the job is not run again; the pool is back to N
    workers with a new pid in place of the dead one; later jobs are fine."""
    before = wait_for_pool(ppserver)
    job = pp_client.submit(faultjobs.mark_and_sleep, (str(tmp_path), "victim", 600))
    victim = wait_until(lambda: _started(tmp_path, "victim"), "the job to start")
    assert victim in before, "the job ran in pid %d, not a server worker %s" % (victim, before)

    os.kill(victim, signal.SIGKILL)
    assert finished_within(job, ANSWER_DEADLINE), "no answer for the job whose worker was killed"
    capsys.readouterr()
    assert job() is None
    out = capsys.readouterr().out
    assert_died_text(out, how=("signal 9", "SIGKILL"))
    assert str(victim) in out, out

    after = wait_for_pool(ppserver, exclude={victim})
    assert len(after) == ppserver.nworkers
    assert after - before, "no new worker pid: %s -> %s" % (before, after)
    pids = assert_all_workers_in_parallel(pp_client, ppserver.nworkers)
    assert victim not in pids
    assert pids == wait_for_pool(ppserver)
    assert [pp_client.submit(faultjobs.square, (i,))() for i in range(8)] == [i * i for i in range(8)]
    assert _starts(tmp_path) == ["victim.start"], "the killed job was run again"


@NOT_PPFT
def test_os_exit_in_job_answers_none_with_exit_code(pp_client, ppserver, capsys):
    """A job calling os._exit(3): None, and the text names exit code 3;
    afterwards N jobs run in parallel on N live workers."""
    before = wait_for_pool(ppserver)
    job = pp_client.submit(faultjobs.exit_with, (3,))
    assert finished_within(job, ANSWER_DEADLINE), "no answer for a job whose worker exited"
    capsys.readouterr()
    assert job() is None
    out = capsys.readouterr().out
    assert_died_text(out, how=("exit code 3",))

    after = wait_for_pool(ppserver)
    assert len(before - after) == 1, "exactly one worker should have been replaced"
    assert_all_workers_in_parallel(pp_client, ppserver.nworkers)
    assert pp_client.submit(faultjobs.square, (11,))() == 121


class _ExitOnUnpickle(object):
    """Unpickling this runs os._exit(7) inside the worker."""

    def __reduce__(self):
        return (os._exit, (7,))


GOOD_SOURCE = "def good(x):\n    return x + 1\n"


def _malformed_jobs():
    """(what, package frame payload, args frame payload, expected exit code
    or None): packages and args that make ppft's worker give up."""
    good_pkg = ppwire.function_package("good", [GOOD_SOURCE])
    return [
        ("random bytes", b"N" + bytes(random.Random(1).randrange(256) for _ in range(300)),
         ppwire.pickled_args((1,)), None),
        ("empty package", b"N", ppwire.pickled_args((1,)), None),
        ("pickled int", b"N" + pickle.dumps(42, 2), ppwire.pickled_args((1,)), None),
        ("truncated pickle", b"N" + good_pkg[: len(good_pkg) // 2], ppwire.pickled_args((1,)), None),
        ("unknown function name", b"N" + ppwire.function_package("missing", [GOOD_SOURCE]),
         ppwire.pickled_args((1,)), None),
        ("syntax error", b"N" + ppwire.function_package("bad", ["def bad(:\n"]),
         ppwire.pickled_args((1,)), None),
        ("garbage args", b"N" + good_pkg, b"\x80\x02garbage", None),
        ("package exits on unpickle", b"N" + pickle.dumps(_ExitOnUnpickle(), 2),
         ppwire.pickled_args((1,)), 7),
        ("args exit on unpickle", b"N" + good_pkg, pickle.dumps((_ExitOnUnpickle(),), 2), 7),
    ]


@NOT_PPFT
def test_malformed_packages_get_an_answer_and_workers_are_replaced(pp_client, ppserver):
    """Packages ppft's worker cannot load (it answers (None, traceback) and
    exits, or dies outright): each gets a result frame (None, text) on the
    same connection, which stays usable; then every worker serves a normal
    client again (N jobs in parallel on N workers) and the pool is N."""
    sock = exec_session(ppserver)
    answers = []
    try:
        for what, package, args, code in _malformed_jobs():
            ppwire.send_frame(sock, package)
            ppwire.send_frame(sock, args)
            try:
                answer = ppwire.recv_result(sock)
            except ppwire.ClosedError:
                pytest.fail("%s: connection closed instead of an answer" % what)
            answers.append((what, answer))
            assert isinstance(answer, tuple) and len(answer) == 2, (what, answer)
            assert answer[0] is None, (what, answer)
            assert isinstance(answer[1], str) and answer[1].strip(), (what, answer)
            if code is not None:
                assert_died_text(answer[1], how=("exit code %d" % code,))
        # The connection still runs good jobs.
        ppwire.send_frame(sock, b"N" + ppwire.function_package("good", [GOOD_SOURCE]))
        ppwire.send_frame(sock, ppwire.pickled_args((41,)))
        assert ppwire.recv_result(sock)[0] == 42
    finally:
        sock.close()

    wait_for_pool(ppserver)
    assert_all_workers_in_parallel(pp_client, ppserver.nworkers)
    assert [pp_client.submit(faultjobs.square, (i,))() for i in range(6)] == [0, 1, 4, 9, 16, 25]


ABANDONED = 40
SLOW = 2.0

# Holds its worker until the file `gate` exists (at most 120 s), having
# written `path` (the worker's pid) once it runs. Shipped as source.
HELD_SOURCE = (
    "def held(path, gate):\n"
    "    import os, time\n"
    "    with open(path + '.tmp', 'w') as f:\n"
    "        f.write(str(os.getpid()))\n"
    "    os.rename(path + '.tmp', path)\n"
    "    deadline = time.monotonic() + 120\n"
    "    while not os.path.exists(gate) and time.monotonic() < deadline:\n"
    "        time.sleep(0.02)\n"
    "    return os.getpid()\n"
)


@pytest.mark.better_than_ppft(reason="ppft's server runs jobs whose client has gone")
def test_queued_jobs_of_vanished_clients_are_dropped(pp_client, ppserver, tmp_path):
    """Every worker is held (at a gate) while 40 raw clients each queue a
    2-second job and vanish. Once the server has seen them all gone, the
    gate opens: a new client's tiny job is answered long before the
    abandoned work could have been done (40*2/N s on N workers), and none
    of the abandoned jobs ever starts. (Held workers, not timing, keep the
    jobs queued until their clients have left: a worker free while a client
    is still there rightly takes its job.)"""
    gate = tmp_path / "gate"
    held = ppwire.function_package("held", [HELD_SOURCE])
    holders = []
    try:
        for i in range(ppserver.nworkers):
            holders.append(exec_session(ppserver))
            ppwire.send_job(holders[-1], held, (str(tmp_path / ("holder%d" % i)), str(gate)))
        wait_until(lambda: len(list(tmp_path.glob("holder?"))) == ppserver.nworkers,
                   "every worker held at the gate")
        connections = len(held_connections(ppserver))

        sfunc = ppwire.function_package(
            "mark_and_sleep", ["from faultjobs import mark_and_sleep\n"])
        for i in range(ABANDONED):
            sock = exec_session(ppserver)
            ppwire.send_job(sock, sfunc, (str(tmp_path), "gone%d" % i, SLOW))
            sock.close()
        # The server closes a connection once it has seen its client leave,
        # and with it withdraws the connection's queued job.
        wait_until(lambda: len(held_connections(ppserver)) <= connections,
                   "the server to see the %d clients gone" % ABANDONED, timeout=60)

        abandoned_work = ABANDONED * SLOW / ppserver.nworkers
        job = pp_client.submit(faultjobs.square, (9,))
        gate.touch()
        assert finished_within(job, 0.75 * abandoned_work), (
            "a new job waited behind abandoned ones (%d started)" % len(_starts(tmp_path)))
        assert job() == 81
        for sock in holders:
            assert isinstance(ppwire.recv_result(sock)[0], int)
    finally:
        gate.touch()
        for sock in holders:
            sock.close()
    # Every worker free again (N jobs at once): none ran an abandoned job.
    assert_all_workers_in_parallel(pp_client, ppserver.nworkers, seconds=0.5)
    assert _starts(tmp_path) == [], "abandoned jobs were run"


@NOT_PPFT
def test_random_sigkills_under_load_lose_no_job(ppserver, tmp_path):
    """Three client processes send 4 MB jobs while a random worker is
    SIGKILLed every second. Every job is answered: with its own correct
    result (tag, index, length and md5 of its payload), or with None and the
    worker-died text; never with another job's result, never not at all."""
    before = wait_for_pool(ppserver)
    killer = Killer(ppserver, every=1.0, rng=random.Random(42))
    procs = [
        run_client_script("big_jobs.py", ppserver.id, ppserver.secret, tag, 16, 4 << 20,
                          tmp_path, 3)
        for tag in ("red", "green", "blue")
    ]
    killer.start()
    try:
        reports = json_reports(procs)
    finally:
        killer.stop()
    for report in reports:
        assert report["bad"] == [], report
        assert report["ok"] + report["died"] == report["njobs"] == 16, report
    assert killer.killed, "the test killed no worker"
    died = sum(r["died"] for r in reports)
    assert died <= len(killer.killed), (died, killer.killed)
    assert died >= 1, "no job hit a killed worker (%d kills): the test proved nothing" % len(
        killer.killed)
    # The pool is refilled: N live workers, none of them a killed one.
    after = wait_for_pool(ppserver, exclude=killer.killed)
    assert len(after) == ppserver.nworkers
    assert set(killer.killed) & before, "no original worker was killed"
