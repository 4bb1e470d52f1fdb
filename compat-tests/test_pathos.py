"""pathos starts the server and uses it, the way pathos users do.

``pathos.core.serve("ppserver", port=PORT)`` runs ``~/bin/ppserver.py -p
PORT`` through ``/bin/sh -c``, in the background, with the server's stdout
and stderr on one pipe. It then waits 2 s for output: if nothing appears it
sleeps 2 s more and returns; if anything appears it reads the pipe *to EOF*,
that is until the server exits, so a server that prints anything at start
hangs ``core.serve`` for as long as it runs. No secret is passed (pathos
never passes one), so the server uses pp's default secret.

Here HOME is a temporary directory whose ``bin/ppserver.py`` is a symlink to
the server under test (for ``PPSERVER_IMPL=python``: a script running ppft's
own server), PATH starts with this venv's bin (the server's default worker
interpreter ``python3`` is then this venv's, which has ppft) and PYTHONPATH
is compat-tests/ (the workers import ``square`` from this module). The test
asserts that ``core.serve`` returns with no output from the server, that
``ParallelPool(nodes=0, servers=("localhost:PORT",)).map`` gets every square
from it, and that the server stops on SIGTERM. ``core.serve`` runs in a
thread with a bound: if it hangs, what it launched is killed (which ends its
read) and the test fails saying what the server printed.

Needs pathos, which requires ppft 1.7.8: scripts/test.sh runs this module
with its own venv (requirements-pathos.txt); skipped in the others.
"""

import os
import signal
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("pathos", reason="pathos is not installed here "
                    "(its venv: compat-tests/requirements-pathos.txt)")

from pathos import core  # noqa: E402
from pathos.pp import ParallelPool  # noqa: E402

import procs  # noqa: E402
from pphelpers import HERE, IMPL, SetupError, free_port, rust_binary  # noqa: E402

SERVE_TIMEOUT = 30.0  # seconds; core.serve itself takes about 4 s
pytestmark = pytest.mark.timeout(180)


def square(x):
    return x * x


def _install_ppserver(home):
    """HOME/bin/ppserver.py: what core.serve runs."""
    target = home / "bin" / "ppserver.py"
    target.parent.mkdir(parents=True)
    if IMPL == "python":
        target.write_text('#!/bin/sh\nexec "%s" -m ppft.server "$@"\n' % sys.executable)
        target.chmod(0o755)
    else:
        binary = rust_binary().resolve()
        if not binary.exists():
            raise SetupError("ppserver binary not found at %s" % binary)
        target.symlink_to(binary)
    return target


def _launched():
    """What core.serve started: descendants of this process whose command
    line names bin/ppserver.py (the shell, the server), and theirs (the
    server's workers)."""
    found = []

    def walk(pid, inside):
        for child in procs.children(pid):
            started = inside or any("bin/ppserver.py" in arg for arg in procs.cmdline(child))
            if started:
                found.append(child)
            walk(child, started)

    walk(os.getpid(), False)
    return found


def _kill_launched():
    """SIGKILL what core.serve started (the server's workers included)."""
    for pid in _launched():
        procs.sigkill(pid)


def _serve(port):
    """core.serve in a thread; returns (thread, box): box gets "launcher"
    (pathos's Pipe) or "error" when it returns."""
    box = {}

    def run():
        try:
            box["launcher"] = core.serve("ppserver", port=port)
        except BaseException as exc:  # reported by the test
            box["error"] = exc

    thread = threading.Thread(target=run, name="pathos-serve", daemon=True)
    thread.start()
    return thread, box


def _output(launcher):
    """What the server printed, as pathos read it (None if nothing)."""
    response = getattr(launcher, "_response", None)
    if isinstance(response, bytes):
        response = response.decode(errors="replace")
    return response


@pytest.fixture
def pathos_home(tmp_path, monkeypatch, request):
    """A temporary HOME with bin/ppserver.py, and the environment the
    server inherits from core.serve (see the module doc); whatever core.serve
    started is killed afterwards."""
    home = tmp_path / "home"
    try:
        _install_ppserver(home)
    except SetupError as exc:
        pytest.fail(str(exc), pytrace=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("PATH", os.pathsep.join([str(Path(sys.executable).parent),
                                                os.environ.get("PATH", "")]))
    monkeypatch.setenv("PYTHONPATH", str(HERE))
    monkeypatch.delenv("PPSERVER_SECRET", raising=False)
    # pathos hands sys.stdin to the shell it starts; pytest's has no fd.
    devnull = open(os.devnull)
    request.addfinalizer(devnull.close)
    monkeypatch.setattr(sys, "stdin", devnull)
    request.addfinalizer(_kill_launched)
    return home


def test_pathos_serves_ppserver_and_maps_on_it(pathos_home):
    """core.serve starts ~/bin/ppserver.py -p PORT and returns with no
    output; ParallelPool(nodes=0, servers=("localhost:PORT",)).map(square,
    range(10)) returns every square; SIGTERM stops the server."""
    port = free_port("0.0.0.0")
    thread, box = _serve(port)
    thread.join(SERVE_TIMEOUT)
    if thread.is_alive():
        _kill_launched()  # ends pathos's read of the server's output
        thread.join(SERVE_TIMEOUT)
        pytest.fail(
            "pathos.core.serve('ppserver', port=%d) did not return within %.0f s: the server "
            "wrote to stdout/stderr within pathos's 2 s window, so pathos read its output "
            "until EOF, i.e. until the server exited (it was killed). Output:\n%s"
            % (port, SERVE_TIMEOUT, _output(box.get("launcher"))), pytrace=False)
    assert "error" not in box, "core.serve raised %r" % (box["error"],)
    launcher = box["launcher"]
    assert _output(launcher) in (None, ""), (
        "the server printed at start (pathos logs it as an invalid response):\n%s"
        % _output(launcher))

    # core.serve started `/bin/sh -c "~/bin/ppserver.py -p PORT"`; the
    # server is the shell itself if the shell exec'd it, else its child.
    shell = launcher.pid()
    server = shell
    if not any("ppserver.py" in arg for arg in procs.cmdline(shell)[:1]):
        kids = procs.live_children(shell)
        assert len(kids) == 1, "shell %d (%s) has children %s" % (
            shell, procs.cmdline(shell), kids)
        server = kids[0]
    assert procs.cmdline(server)[-2:] == ["-p", str(port)], procs.cmdline(server)

    pool = ParallelPool(nodes=0, servers=("localhost:%d" % port,))
    try:
        assert pool.map(square, range(10)) == [x * x for x in range(10)]
    finally:
        pool.close()
        pool.join()
        pool.clear()

    os.kill(server, signal.SIGTERM)
    assert procs.wait_until(lambda: procs.is_gone(server), timeout=60), (
        "the server did not stop within 60 s of SIGTERM")
    try:
        launcher.kill()  # pathos's own cleanup: SIGTERM + reap the shell it started
    except (ProcessLookupError, ChildProcessError):
        pass  # already reaped
