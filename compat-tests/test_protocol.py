"""Raw-socket checks of the wire protocol (docs/protocol.md), without the
ppft client: handshake frames, the STAT loop, the N/H package cache on EXEC
connections, and where workers find modules."""

import hashlib
import os
import string

import ppwire
from pphelpers import CLIENT_VERSION, IMPL, setup_or_fail, start_server, stop_server


def square(x):
    return x * x


SHOUT_SOURCE = (
    "def shout(word, times):\n"
    "    print('shouting ' + word)\n"
    "    return (word.upper() + '!') * times\n"
)
ADD_SOURCE = "def add(a, b):\n    return a + b\n"


def test_handshake_sends_version_then_letters_nonce(ppserver):
    """The server speaks first: the version frame (equal to the installed
    client's __version__, which clients compare for equality), then a nonce
    of >= 16 ASCII letters, fresh for every connection."""
    nonces = []
    for _ in range(2):
        sock = ppwire.connect(ppserver.host, ppserver.port)
        try:
            version = ppwire.recv_frame(sock)
            nonce = ppwire.recv_frame(sock)
        finally:
            sock.close()
        assert version == CLIENT_VERSION.encode("ascii")
        text = nonce.decode("ascii")
        assert len(text) >= 16, nonce
        assert set(text) <= set(string.ascii_letters), nonce
        nonces.append(nonce)
    assert nonces[0] != nonces[1], "the same nonce twice: %r" % nonces


def test_stat_connection_answers_every_frame(ppserver):
    """STAT: the worker count as a decimal string, then a float string
    (parseable by float(), >= 0) for every frame the client sends."""
    sock = ppwire.open_session(ppserver.host, ppserver.port, ppserver.secret, "STAT")
    try:
        ncpus = ppwire.recv_frame(sock)
        assert ncpus.isdigit(), ncpus
        assert int(ncpus) == ppserver.nworkers
        for request in ("TIME", "TIME", "anything at all", "TIME"):
            ppwire.send_frame(sock, request)
            reply = ppwire.recv_frame(sock).decode("ascii")
            assert float(reply) >= 0.0, reply
    finally:
        sock.close()


def test_exec_new_then_cached_packages(ppserver):
    """EXEC: a package sent as N + sfunc runs; the same package later sent
    as H + md5(sfunc) on that connection runs again with new arguments;
    packages interleave; the result is the worker's (result, stdout)."""
    shout = ppwire.function_package("shout", [SHOUT_SOURCE])
    add = ppwire.function_package("add", [ADD_SOURCE])
    sock = ppwire.open_session(ppserver.host, ppserver.port, ppserver.secret, "EXEC")
    try:
        ppwire.send_job(sock, shout, ("hey", 2))
        result, out = ppwire.recv_result(sock)
        assert result == "HEY!HEY!"
        assert "shouting hey" in out

        ppwire.send_job(sock, shout, ("ho", 3), cached=True)
        result, out = ppwire.recv_result(sock)
        assert result == "HO!HO!HO!"
        assert "shouting ho" in out

        ppwire.send_job(sock, add, (2, 40))
        assert ppwire.recv_result(sock)[0] == 42
        ppwire.send_job(sock, shout, ("x", 1), cached=True)
        assert ppwire.recv_result(sock)[0] == "X!"
        ppwire.send_job(sock, add, ([1], [2]), cached=True)
        assert ppwire.recv_result(sock)[0] == [1, 2]
    finally:
        sock.close()


def test_unknown_hash_fails_only_that_job(pp_client, ppserver):
    """H + a hash the connection never sent as N: ppft's server closes that
    connection; this one answers the job with None and the reason and the
    connection goes on (pp 1.7.0's client, which keeps its send cache when
    it reconnects, would resend that H forever). Either way a ppft client
    and another raw connection keep working."""
    assert pp_client.submit(square, (7,))() == 49

    add = ppwire.function_package("add", [ADD_SOURCE])
    bad = ppwire.open_session(ppserver.host, ppserver.port, ppserver.secret, "EXEC")
    try:
        unknown = hashlib.md5(os.urandom(32)).hexdigest()
        ppwire.send_frame(bad, b"H" + unknown.encode("ascii"))
        ppwire.send_frame(bad, ppwire.pickled_args((1, 2)))
        if IMPL == "python":
            assert ppwire.is_closed(bad), "ppft's server answered an unknown package hash"
        else:
            result, text = ppwire.recv_result(bad)
            assert result is None and "unknown package" in text, text
            ppwire.send_job(bad, add, (1, 2))
            assert ppwire.recv_result(bad)[0] == 3, "the connection goes on"
    finally:
        bad.close()

    good = ppwire.open_session(ppserver.host, ppserver.port, ppserver.secret, "EXEC")
    try:
        ppwire.send_job(good, add, (20, 22))
        assert ppwire.recv_result(good)[0] == 42
    finally:
        good.close()
    assert [pp_client.submit(square, (i,))() for i in range(6)] == [0, 1, 4, 9, 16, 25]


def test_huge_frame_before_auth_is_refused(pp_client, ppserver):
    """A frame header announcing ~2**63 bytes in place of the nonce answer
    gets the connection closed (ppft's server fails to allocate and drops it;
    ours caps the payload size before authentication); the server keeps
    serving others."""
    sock = ppwire.connect(ppserver.host, ppserver.port)
    try:
        ppwire.recv_frame(sock)
        ppwire.recv_frame(sock)
        sock.sendall(ppwire.HEADER.pack(2**63 - 1) + b"x" * 64)
        assert ppwire.is_closed(sock)
    finally:
        sock.close()
    assert pp_client.submit(square, (12,))() == 144


PROBE_SOURCE = (
    "def probe():\n"
    "    import cwd_probe_module\n"
    "    return cwd_probe_module.VALUE\n"
)


def test_workers_import_modules_from_server_cwd(tmp_path):
    """Like ppft's server, the server puts its working directory on its
    workers' PYTHONPATH: a module that exists only in the server's cwd is
    importable by a job (server started with no PYTHONPATH at all)."""
    cwd = tmp_path / "servercwd"
    cwd.mkdir()
    (cwd / "cwd_probe_module.py").write_text("VALUE = 'found in the server cwd'\n")
    server = setup_or_fail(start_server, 1, tmp_path / "server.log", cwd=cwd, pythonpath=None)
    try:
        sock = ppwire.open_session(server.host, server.port, server.secret, "EXEC")
        try:
            ppwire.send_job(sock, ppwire.function_package("probe", [PROBE_SOURCE]), ())
            result, out = ppwire.recv_result(sock)
        finally:
            sock.close()
        assert result == "found in the server cwd", "worker output:\n%s\nserver log:\n%s" % (
            out,
            server.log_tail(),
        )
    finally:
        stop_server(server)
