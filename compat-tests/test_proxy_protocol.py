"""--proxy-protocol: behind HAProxy (Debian's ``haproxy``, TCP mode, with
``send-proxy`` and with ``send-proxy-v2``), the server sees the client's
address from the PROXY header, not HAProxy's; a header from an address not
in the list is not honoured; a listed address that sends no header is
closed.

Addresses, all on loopback: the server listens on 127.0.0.1 with
``--proxy-protocol 127.0.0.1``; HAProxy listens on 127.0.0.1 and connects
to the server from 127.0.0.1; the real ppft client connects to HAProxy
from 127.0.0.5. ppft's client has no way to choose its source address, so
while a test runs, ``socket.socket.connect`` in this process first binds a
socket bound for HAProxy's port to 127.0.0.5 (``client_source``); the
client itself is unchanged and sends what it always sends, as a client on
another host would. That is test scaffolding around the real client: an
``LD_PRELOAD`` shim would reach into every process, and a network
namespace per client needs routes to HAProxy and root; a patch limited to
one destination in one process touches nothing else the test does.

HAProxy runs with a config written to the test's temp dir, started by the
test and stopped after it. Skipped if ``haproxy`` is not installed
(scripts/test.sh installs it when it runs as root with apt-get). Every
wait is a bounded wait for a condition; no timing is asserted.
"""

import os
import shutil
import socket
from pathlib import Path

import pytest

import pphelpers
import ppwire
from pphelpers import ServerHandle, close_client, connect_client, free_port
from procs import wait_until

# The server's own behaviour, whatever the client family: run with the
# ppft 1.7.8 family only (conftest.py deselects it in the others).
pytestmark = [
    pytest.mark.server_behaviour,
    pytest.mark.timeout(120),
    pytest.mark.better_than_ppft(reason="ppft's server has no --proxy-protocol"),
]

CLIENT = "127.0.0.5"  # the client's address, through HAProxy
PROMPT = 60.0  # bound of every wait for something the server should do soon

HAPROXY_CONFIG = """\
global
    maxconn 256

defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h

frontend pp
    bind 127.0.0.1:{port}
    default_backend ppserver

backend ppserver
    server s1 {server.host}:{server.port} {send_proxy}
"""


def square(x):
    return x * x


def _haproxy():
    for path in (shutil.which("haproxy"), "/usr/sbin/haproxy"):
        if path and os.access(path, os.X_OK):
            return path
    pytest.skip("haproxy is not installed (scripts/test.sh installs Debian's as root)")


@pytest.fixture
def haproxy(tmp_path):
    """haproxy(server, send_proxy) -> a handle on HAProxy in front of
    `server`, its backend line ending in `send_proxy`; stopped after the
    test. The handle has the server's secret and workers, for
    connect_client."""
    binary = _haproxy()
    started = []

    def start(server, send_proxy):
        port = free_port()
        config = Path(tmp_path) / ("haproxy-%d.cfg" % port)
        config.write_text(HAPROXY_CONFIG.format(port=port, server=server,
                                                send_proxy=send_proxy))
        # -db: stay in the foreground, so stop_server's SIGTERM stops it.
        handle = pphelpers.launch([binary, "-db", "-f", str(config)],
                                  Path(tmp_path) / ("haproxy-%d.log" % port),
                                  port=port, secret=None, env=dict(os.environ))
        started.append(handle)
        return ServerHandle(handle.impl, handle.host, port, server.secret, server.nworkers,
                            handle.proc, handle.log_path, handle.argv)

    yield start
    for handle in started:
        pphelpers.stop_server(handle)


@pytest.fixture
def client_source(monkeypatch):
    """client_source(host, port): from now on, sockets of this process that
    connect to host:port do so from CLIENT (see the module's docstring)."""
    real_connect = socket.socket.connect

    def start(host, port):
        def connect(self, address):
            if (self.family == socket.AF_INET and isinstance(address, tuple)
                    and address[:2] == (host, port)):
                self.bind((CLIENT, 0))
            return real_connect(self, address)

        monkeypatch.setattr(socket.socket, "connect", connect)

    return start


def _server(launch, *flags):
    """A one-worker server with -d (its debug lines name each connection's
    peer) and --metrics."""
    metrics_port = free_port()
    server = launch("-d", "--metrics", "127.0.0.1:%d" % metrics_port, *flags)
    server.metrics_port = metrics_port
    return server


def _status(server):
    return pphelpers.metrics_get(server.metrics_port, "/status")[1]


def _refused(server, reason):
    page = pphelpers.metrics_get(server.metrics_port, "/metrics")[1]
    samples = pphelpers.metric_samples(page)
    return samples.get(("ppserver_connections_refused_total", '{reason="%s"}' % reason), 0)


def _clients(status):
    """The /status lines about client addresses: {address: line}."""
    lines = status.split("\nclients (", 1)[-1].splitlines()[1:]
    return {line.split(":")[0].strip(): line for line in lines if line.startswith("  ")}


def _log_lines(server, *words):
    return [line for line in server.log().splitlines() if all(w in line for w in words)]


@pytest.mark.parametrize("send_proxy", ["send-proxy", "send-proxy-v2"])
def test_the_client_behind_haproxy_is_seen_by_its_own_address(launch, haproxy, client_source,
                                                              send_proxy):
    """--proxy-protocol 127.0.0.1 --allow 127.0.0.5: a ppft client from
    127.0.0.5 through HAProxy is admitted and its jobs run; /status lists
    its connections under 127.0.0.5 and none under HAProxy's 127.0.0.1;
    the log names 127.0.0.5."""
    server = _server(launch, "--proxy-protocol", "127.0.0.1", "--allow", CLIENT)
    balancer = haproxy(server, send_proxy)
    client_source(balancer.host, balancer.port)
    js = connect_client(balancer)
    try:
        assert js.submit(square, (7,))() == 49
        seen = {}

        def shown_as_the_client():
            seen["status"] = _status(server)
            clients = _clients(seen["status"])
            return (CLIENT in clients and " 0 EXEC" not in clients[CLIENT]
                    and "127.0.0.1" not in clients)

        assert wait_until(shown_as_the_client, timeout=PROMPT), (
            "%s\n%s" % (seen.get("status"), server.log_tail()))
    finally:
        close_client(js)
    assert server.logged("PROXY header: client %s:" % CLIENT)
    assert _log_lines(server, CLIENT + ":", "EXEC connection"), server.log_tail()
    assert _refused(server, "proxy_header") == 0


def test_a_client_outside_allow_behind_haproxy_is_refused(launch, haproxy, client_source):
    """--proxy-protocol 127.0.0.1 --allow 127.0.0.9: the ppft client from
    127.0.0.5 through HAProxy is closed before a byte (HAProxy's own
    address is not what --allow is checked against), and the refusal is
    logged under 127.0.0.5."""
    server = _server(launch, "--proxy-protocol", "127.0.0.1", "--allow", "127.0.0.9")
    balancer = haproxy(server, "send-proxy-v2")
    client_source(balancer.host, balancer.port)
    js = connect_client(balancer, wait=False)
    try:
        refused = wait_until(lambda: _log_lines(server, CLIENT + ":", "--allow"),
                             timeout=PROMPT)
        assert refused, server.log_tail()
        assert _refused(server, "not_allowed") >= 1
        # Refused before the version: the client can never have logged in.
        assert js.autopp_list.get(balancer.id, 0) == 0
    finally:
        close_client(js)
    raw = ppwire.connect(balancer.host, balancer.port)
    try:
        assert raw.getsockname()[0] == CLIENT
        assert ppwire.is_closed(raw), "the server talked to a client outside --allow"
    finally:
        raw.close()
    assert CLIENT not in _clients(_status(server))


def test_a_header_from_an_unlisted_address_is_not_honoured(launch):
    """--proxy-protocol 127.0.0.2: a raw client from 127.0.0.1 that sends
    a PROXY header naming 10.9.9.9 and then the handshake is not taken for
    10.9.9.9: the header's bytes are read as its answer to the nonce, it is
    never told OK, and the log names 127.0.0.1, never 10.9.9.9."""
    server = _server(launch, "--proxy-protocol", "127.0.0.2")
    sock = socket.create_connection((server.host, server.port), timeout=PROMPT,
                                    source_address=("127.0.0.1", 0))
    try:
        sock.sendall(b"PROXY TCP4 10.9.9.9 127.0.0.1 40000 %d\r\n" % server.port)
        try:
            _, _, reply = ppwire.handshake(sock, server.secret)
        except (ppwire.ClosedError, OSError):  # closed before or after the nonce
            reply = None
        assert reply != b"OK"
        assert ppwire.is_closed(sock)
    finally:
        sock.close()
    assert wait_until(lambda: _log_lines(server, "127.0.0.1:", "closed"), timeout=PROMPT), (
        server.log_tail())
    assert "10.9.9.9" not in server.log()
    assert "10.9.9.9" not in _status(server)


def test_a_listed_address_without_a_header_is_closed_and_logged(launch):
    """--proxy-protocol 127.0.0.1: a ppft client connecting straight to the
    server from 127.0.0.1 sends no header (it waits for the version): it
    is closed after the header's 3 s without a byte, logged, and counted as
    proxy_header; a raw client that sends other bytes first is closed at
    once the same way."""
    server = _server(launch, "--proxy-protocol", "127.0.0.1")
    js = connect_client(server, wait=False)
    try:
        assert wait_until(lambda: _log_lines(server, "no complete PROXY header in time"),
                          timeout=PROMPT), server.log_tail()
        assert js.autopp_list.get(server.id, 0) == 0
    finally:
        close_client(js)
    raw = ppwire.connect(server.host, server.port)
    try:
        raw.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        assert ppwire.is_closed(raw), "the server talked to a listed peer without a header"
    finally:
        raw.close()
    assert wait_until(lambda: _log_lines(server, "127.0.0.1:", "sent no PROXY header"),
                      timeout=PROMPT), server.log_tail()
    assert wait_until(lambda: _refused(server, "proxy_header") >= 2, timeout=PROMPT)
