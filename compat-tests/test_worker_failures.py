"""Workers that die are replaced (behaviour where we are deliberately better
than ppft's server, which never notices a dead worker: the next job sent to
it hangs its client forever).

After each failure, N jobs must again run in parallel on N live workers.
"""

import os
import signal
import sys

import pytest

import ppwire
from common_jobs import assert_all_workers_in_parallel
from procs import exists, wait_until

pytestmark = pytest.mark.better_than_ppft(
    reason="ppft's server does not replace dead workers; later jobs hang"
)


def describe(thing):
    return "value=%r" % (thing.value,)


def test_worker_exiting_after_unpicklable_arguments_is_replaced(
    pp_client, ppserver, tmp_path, monkeypatch, capsys
):
    """Arguments whose class the worker cannot import: ppft's worker answers
    (None, traceback) and then exits. The client gets None, the traceback is
    printed, and the server replaces the worker."""
    (tmp_path / "client_only_module.py").write_text(
        "class Thing(object):\n    def __init__(self, value):\n        self.value = value\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "client_only_module", raising=False)
    import client_only_module

    capsys.readouterr()
    assert pp_client.submit(describe, (client_only_module.Thing(5),))() is None
    out = capsys.readouterr().out
    assert "client_only_module" in out  # ModuleNotFoundError traceback

    assert_all_workers_in_parallel(pp_client, ppserver.nworkers)


DIE_SOURCE = "def die(code):\n    import os\n    os._exit(code)\n"


def test_worker_dying_mid_job_gets_an_answer_and_is_replaced(pp_client, ppserver):
    """A job whose worker dies without answering (os._exit) still gets an
    answer on its connection: a result frame (None, text), as for a failed
    job. (Closing the connection instead would make a ppft client resubmit
    the job forever.) The worker is replaced."""
    sock = ppwire.open_session(ppserver.host, ppserver.port, ppserver.secret, "EXEC")
    try:
        ppwire.send_job(sock, ppwire.function_package("die", [DIE_SOURCE]), (3,))
        try:
            answer = ppwire.recv_result(sock)
        except ppwire.ClosedError:
            pytest.fail("server closed the connection instead of answering the job")
    finally:
        sock.close()
    assert isinstance(answer, tuple) and len(answer) == 2, answer
    result, text = answer
    assert result is None
    assert isinstance(text, str)

    assert_all_workers_in_parallel(pp_client, ppserver.nworkers)


def _wait_reaped(pid, timeout=30.0):
    """Wait until `pid` no longer exists at all: dead *and* reaped by its
    parent (a zombie still answers kill(pid, 0))."""
    return wait_until(lambda: not exists(pid), timeout=timeout)


def test_worker_killed_while_idle_is_replaced(pp_client, ppserver):
    """A worker killed from outside while idle (SIGKILL) is noticed (reaped)
    by the server without waiting for a job, and replaced: once it is reaped,
    N jobs run in parallel on N live workers, none of them the killed one,
    and no job is lost to the dead worker."""
    pids = assert_all_workers_in_parallel(pp_client, ppserver.nworkers, seconds=0.5)
    victim = sorted(pids)[0]
    os.kill(victim, signal.SIGKILL)
    assert _wait_reaped(victim), "server did not reap its killed idle worker %d" % victim
    after = assert_all_workers_in_parallel(pp_client, ppserver.nworkers)
    assert victim not in after
