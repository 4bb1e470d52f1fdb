"""Every byte of a large argument checked by content.

Client processes (the family's real pp client) send jobs whose arguments
are 1 to 8 MiB of os.urandom; each job answers the sha256 of what its
worker received, and the client compares it with the sha256 of what it
sent. This runs under a --memory-limit small enough that frames wait for
room, while raw clients leave in the middle of sending a large frame or
before their answer, and
- with workers SIGKILLed at random (phase one), or
- with jobs running past --job-timeout (phase two).
Every answer must be the right hash, or None with the server's reason
(the worker died, the job timed out); never a wrong hash, never none.

Large frames are where the server takes its zero-copy path (their own
mappings, vmsplice into the worker's pipe, mappings reused), so a page
reused too early would show up here as a wrong hash.
"""

import os
import random
import threading

import pytest

import ppwire
from faulthelpers import Killer, server_alive
from pphelpers import json_reports, run_client_script
from procs import wait_for_pool

pytestmark = pytest.mark.better_than_ppft(
    reason="ppft's server has no --memory-limit or --job-timeout")

MIB = 1 << 20
LIMIT = "24M"  # an 8 MiB frame fits, three do not: frames wait for room
CLIENTS = ("red", "green", "blue")
SCRIPT_TIMEOUT = 600


class Leavers(threading.Thread):
    """Raw clients that leave mid-job, in turn: one closes in the middle
    of an 8 MiB argument frame, the next after sending a whole job but
    before its answer. Counts how many of each it managed."""

    def __init__(self, server):
        super().__init__(daemon=True)
        self.server = server
        self.mid_send = self.before_answer = 0
        self.errors = []
        self._stop_event = threading.Event()
        self.package = ppwire.function_package(
            "nap", ["def nap(blob):\n    import time\n    time.sleep(0.5)\n"
                    "    return len(blob)\n"])

    def run(self):
        turn = 0
        while not self._stop_event.wait(0.3):
            try:
                sock = ppwire.open_session(self.server.host, self.server.port,
                                           self.server.secret, "EXEC")
            except OSError as exc:
                self.errors.append(exc)
                continue
            try:
                ppwire.send_frame(sock, b"N" + self.package)
                args = ppwire.pickled_args((os.urandom(8 * MIB),))
                if turn % 2 == 0:
                    sock.sendall(ppwire.HEADER.pack(len(args)) + args[: len(args) // 3])
                    self.mid_send += 1
                else:
                    ppwire.send_frame(sock, args)
                    self.before_answer += 1
            except OSError:
                pass  # the server may still be reading: leaving is the point
            finally:
                sock.close()
            turn += 1

    def stop(self):
        self._stop_event.set()
        self.join(30)


def run_clients(server, tmp_path, phase, njobs, nap, slow_every=0, slow_nap=0):
    """Runs one client process per tag at once; returns their reports."""
    barrier = tmp_path / phase
    barrier.mkdir()
    procs = [run_client_script("integrity_jobs.py", server.id, server.secret,
                               "%s-%s" % (phase, tag), njobs, barrier, len(CLIENTS),
                               nap, slow_every, slow_nap)
             for tag in CLIENTS]
    reports = json_reports(procs, timeout=SCRIPT_TIMEOUT)
    for report in reports:
        assert report["bad"] == [], report
        assert report["ok"] + sum(report["none"].values()) == report["njobs"] == njobs, report
    return reports


def count(reports, reason):
    return sum(r["none"].get(reason, 0) for r in reports)


def test_random_arguments_come_back_hashed_right_under_kills_timeouts_and_leavers(
        launch, tmp_path):
    server = launch("--memory-limit", LIMIT, "--job-timeout", "3", nworkers=2)
    wait_for_pool(server)

    # Phase one: workers killed at random while jobs run.
    killer = Killer(server, every=1.0, rng=random.Random(7))
    leavers = Leavers(server)
    killer.start()
    leavers.start()
    try:
        killed_phase = run_clients(server, tmp_path, "kill", njobs=8, nap=0.3)
    finally:
        killer.stop()
        leavers.stop()
    assert killer.killed, "the test killed no worker"
    assert count(killed_phase, "worker died") >= 1, (
        "no job hit a killed worker (%d kills): the phase proved nothing" % len(killer.killed))
    assert sum(r["ok"] for r in killed_phase) >= 1, killed_phase

    # Phase two: every third job outlives --job-timeout.
    wait_for_pool(server, exclude=killer.killed)
    leavers = Leavers(server)
    leavers.start()
    try:
        timed_phase = run_clients(server, tmp_path, "timeout", njobs=6, nap=0.1,
                                  slow_every=3, slow_nap=10)
    finally:
        leavers.stop()
    assert count(timed_phase, "job timeout") >= 1, timed_phase
    assert sum(r["ok"] for r in timed_phase) >= 1, timed_phase

    assert leavers.mid_send >= 1 and leavers.before_answer >= 1, (
        leavers.mid_send, leavers.before_answer, leavers.errors)
    assert server_alive(server)
    sent = sum(r["bytes"] for r in killed_phase + timed_phase)
    assert sent > 100 * MIB, "only %d bytes sent: too little to prove much" % sent
