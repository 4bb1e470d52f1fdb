"""Fixtures for the ppserver compat suite (helpers live in pphelpers.py).

- ``ppserver`` (module scope): the server under test (``PPSERVER_IMPL``=rust
  or python), started on a free port of 127.0.0.1 with a known secret, in
  compat-tests/ with PYTHONPATH=compat-tests/ (workers import job functions
  from the test modules: see pphelpers.start_server).
  A test module sets the worker count with ``PPSERVER_WORKERS = N``
  (default 2) and can add flags with ``PPSERVER_FLAGS = (...)``.
- ``pp_client``: a fully connected in-process ppft client, destroyed after
  the test (more: ``pphelpers.connect_client`` / ``close_client``).
- ``launch``: ``launch(*flags, name=..., nworkers=1, **kw)`` starts the
  server under test with any flags (pphelpers.start_server, without
  PPSERVER_DEBUG's -d), every one stopped after the test; pids appended to
  ``launch.workers`` are SIGKILLed then too, in case they outlived it.
- ``@pytest.mark.better_than_ppft(reason=...)``: behaviour where the server
  under test is deliberately better than ppft's own; skipped for python.
- ``pytestmark = pytest.mark.server_behaviour`` (a module): the server's own
  behaviour, the same whatever the client family (flags, signals, limits,
  hostile peers...): collected by every family, run only by the reference
  family (``REFERENCE_FAMILY``, ppft 1.7.8) and deselected in the others,
  unless ``PPSERVER_ALL_FAMILIES=1``. ``@pytest.mark.family_specific`` on a
  test of such a module keeps it in every family: its outcome depends on the
  family's client or workers.
"""

import os

import pytest

import pphelpers
import procs
from pphelpers import FAMILY, IMPL, REFERENCE_FAMILY, setup_or_fail

if IMPL not in ("rust", "python"):
    raise pytest.UsageError("PPSERVER_IMPL must be 'rust' or 'python', not %r" % IMPL)


def pytest_report_header(config):
    if runs_server_behaviour():
        once = "run here"
    else:
        once = "deselected (the %s run covers them)" % REFERENCE_FAMILY
    return ["ppserver under test: %s" % pphelpers.describe_impl(),
            "tests marked server_behaviour: %s" % once]


def runs_server_behaviour():
    """Whether this run includes the server_behaviour tests: with the
    reference family, or when PPSERVER_ALL_FAMILIES=1 asks for them."""
    return FAMILY == REFERENCE_FAMILY or os.environ.get("PPSERVER_ALL_FAMILIES") == "1"


def pytest_collection_modifyitems(config, items):
    """Outside the reference family, deselect the server_behaviour tests
    (those not marked family_specific): the reference family's run covers
    them."""
    if runs_server_behaviour():
        return
    kept, dropped = [], []
    for item in items:
        once = (item.get_closest_marker("server_behaviour") is not None
                and item.get_closest_marker("family_specific") is None)
        (dropped if once else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def pytest_runtest_setup(item):
    marker = item.get_closest_marker("better_than_ppft")
    if marker is not None and IMPL == "python":
        reason = marker.kwargs.get("reason") or (marker.args[0] if marker.args else "")
        pytest.skip("deliberately better than ppft's server: %s" % reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Attach the tail of the server's log to every failed test's report."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        server = getattr(item, "funcargs", {}).get("ppserver")
        if server is not None:
            report.sections.append(
                ("ppserver log tail (%s)" % server.log_path, server.log_tail())
            )


@pytest.fixture(scope="module")
def ppserver(request, tmp_path_factory):
    """Start the server under test for one test module; yields a ServerHandle
    (host, port, secret, nworkers, proc, log_path). Stops it afterwards and
    fails the module's teardown if the server had exited on its own."""
    nworkers = int(getattr(request.module, "PPSERVER_WORKERS", pphelpers.DEFAULT_WORKERS))
    flags = getattr(request.module, "PPSERVER_FLAGS", ())
    logdir = tmp_path_factory.mktemp("ppserver-" + request.module.__name__)
    handle = setup_or_fail(pphelpers.start_server, nworkers, logdir / "server.log", *flags)
    try:
        yield handle
    finally:
        exited_early = pphelpers.stop_server(handle)
    assert exited_early is None, "server exited on its own (code %s) during %s; log:\n%s" % (
        exited_early,
        request.module.__name__,
        handle.log_tail(),
    )


@pytest.fixture
def launch(tmp_path):
    """launch(*flags, **kw) -> a started server (pphelpers.start_server on a
    free port of 127.0.0.1, one worker unless nworkers= says otherwise, log
    tmp_path/NAME.log); stopped afterwards, and any worker pids noted in
    `launch.workers` are killed if they outlived it."""
    started = []

    def start(*flags, name=None, nworkers=1, **kwargs):
        name = name or "server%d" % len(started)
        handle = setup_or_fail(pphelpers.start_server, nworkers, tmp_path / (name + ".log"),
                               *flags, debug=False, **kwargs)
        started.append(handle)
        return handle

    start.workers = []
    yield start
    for handle in started:
        pphelpers.stop_server(handle)
    for pid in start.workers:
        procs.sigkill(pid)


@pytest.fixture
def pp_client(ppserver):
    """A fully connected in-process ppft client, destroyed after the test."""
    js = setup_or_fail(pphelpers.connect_client, ppserver)
    yield js
    pphelpers.close_client(js)

