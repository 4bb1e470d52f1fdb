"""Authentication: sha1(nonce + secret) must match, or the client is refused."""

import json

import ppwire
from pphelpers import IMPL, finish_client_script, run_client_script

# This module's server sees a dozen wrong answers from 127.0.0.1: past the
# first four, the login throttle (timed in test_hostile.py) would delay
# each by up to 0.25 s. They only need to fail.
PPSERVER_FLAGS = ("--login-delay", "0.01") if IMPL == "rust" else ()


def double(x):
    return 2 * x


def _answer_nonce(server, make_answer):
    """Connect, read version and nonce, send make_answer(nonce); return the
    server's reply and whether it then closed the connection."""
    sock = ppwire.connect(server.host, server.port)
    try:
        ppwire.recv_frame(sock)  # version
        nonce = ppwire.recv_frame(sock)
        ppwire.send_frame(sock, make_answer(nonce))
        reply = ppwire.recv_frame(sock)
        return reply, ppwire.is_closed(sock)
    finally:
        sock.close()


def test_wrong_secret_refused_right_secret_keeps_working(pp_client, ppserver):
    """A client answering the nonce with a wrong secret gets FAILED and then
    EOF; a correctly authenticated client works before and after."""
    assert pp_client.submit(double, (21,))() == 42

    wrong_answers = {
        "secret with an extra char": lambda n: ppwire.answer(n, ppserver.secret + "x"),
        "empty secret": lambda n: ppwire.answer(n, ""),
        "pp's default secret": lambda n: ppwire.answer(n, "epo20pdosl;dksldkmm"),
        "40 zeros": lambda n: "0" * 40,
        "right hash, upper case": lambda n: ppwire.answer(n, ppserver.secret).upper(),
    }
    for label, make_answer in wrong_answers.items():
        reply, closed = _answer_nonce(ppserver, make_answer)
        assert reply == b"FAILED", label
        assert closed, "server kept the refused connection open (%s)" % label

    assert [pp_client.submit(double, (i,))() for i in range(5)] == [0, 2, 4, 6, 8]


def test_right_secret_gets_ok(ppserver):
    """The correct answer gets OK, and the connection stays open for the
    connection type (here STAT answers with the worker count)."""
    sock = ppwire.connect(ppserver.host, ppserver.port)
    try:
        _, _, reply = ppwire.handshake(sock, ppserver.secret)
        assert reply == b"OK"
        ppwire.send_frame(sock, "STAT")
        assert ppwire.recv_frame(sock) == str(ppserver.nworkers).encode()
    finally:
        sock.close()


def test_ppft_client_with_wrong_secret_gets_no_workers(pp_client, ppserver):
    """An unmodified ppft client with the wrong secret (separate process)
    ends up with no connection to the server, while the right-secret client
    keeps working."""
    proc = run_client_script("wrong_secret_client.py", ppserver.id, "not-the-secret")
    code, out, err = finish_client_script(proc)
    assert code == 0, "client script failed (%s)\nstdout:\n%s\nstderr:\n%s" % (code, out, err)
    report = json.loads(out.strip().splitlines()[-1])
    assert report == {"active_nodes": {"local": 0}, "in_stats": False}, (report, err)
    assert "Authentication failed" in err

    assert pp_client.submit(double, (50,))() == 100
