"""Raw pp wire helpers for protocol-level tests (see docs/protocol.md).

Every message is one frame: an 8-byte big-endian unsigned length, then the
payload. These helpers speak that framing over a plain TCP socket, without the
ppft client, so tests can check exactly what the server sends and how it reacts
to what a client sends.
"""

import hashlib
import socket
import struct

try:  # ppft's clients and workers pickle with dill; pp 1.7.0 with pickle
    import dill
except ImportError:
    import pickle as dill

HEADER = struct.Struct("!Q")

# Bounded so a server that never answers fails the test instead of hanging it.
SOCKET_TIMEOUT = 30.0


class ClosedError(EOFError):
    """The peer closed the connection (clean EOF or reset)."""


def connect(host, port, timeout=SOCKET_TIMEOUT):
    """Open a TCP connection to the server under test."""
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def send_frame(sock, payload):
    """Send one frame: 8-byte big-endian length, then the payload."""
    if isinstance(payload, str):
        payload = payload.encode("ascii")
    sock.sendall(HEADER.pack(len(payload)) + payload)


def _recv_exact(sock, n):
    chunks = []
    while n:
        try:
            chunk = sock.recv(min(n, 1 << 20))
        except ConnectionResetError as exc:
            raise ClosedError("connection reset by peer") from exc
        if not chunk:
            raise ClosedError("connection closed by peer")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv_frame(sock):
    """Receive one frame's payload; raises ClosedError on EOF."""
    (length,) = HEADER.unpack(_recv_exact(sock, HEADER.size))
    return _recv_exact(sock, length)


def is_closed(sock):
    """True if the peer has closed the connection (EOF or reset).

    Returns False if data arrives instead; a server that neither answers nor
    closes makes this raise socket.timeout after SOCKET_TIMEOUT.
    """
    try:
        data = sock.recv(1)
    except ConnectionResetError:
        return True
    return data == b""


def answer(nonce, secret):
    """The client's answer to the nonce: sha1(nonce + secret) as hex ASCII."""
    return hashlib.sha1(nonce + secret.encode("latin-1")).hexdigest()


def handshake(sock, secret):
    """Run the client side of the handshake; returns (version, nonce, reply)."""
    version = recv_frame(sock)
    nonce = recv_frame(sock)
    send_frame(sock, answer(nonce, secret))
    reply = recv_frame(sock)
    return version, nonce, reply


def open_session(host, port, secret, ctype):
    """Connect, authenticate and send the connection type (STAT or EXEC)."""
    sock = connect(host, port)
    _, _, reply = handshake(sock, secret)
    if reply != b"OK":
        sock.close()
        raise AssertionError("handshake refused: %r" % (reply,))
    send_frame(sock, ctype)
    return sock


def function_package(fname, sources, modules=(), proto=2):
    """Build sfunc the way ppft's client does: a pickle of
    (function_name, [source, ...], (module, ...))."""
    return dill.dumps((fname, list(sources), tuple(modules)), proto)


def package_hash(sfunc):
    """md5 hex digest used by the N/H cache layer."""
    return hashlib.md5(sfunc).hexdigest()


def send_job(sock, sfunc, args=(), cached=False, proto=2):
    """Send one job on an EXEC connection through the N/H cache layer:
    ``N`` + sfunc, or ``H`` + md5(sfunc) when cached=True; then the pickled
    argument tuple."""
    if cached:
        send_frame(sock, b"H" + package_hash(sfunc).encode("ascii"))
    else:
        send_frame(sock, b"N" + sfunc)
    send_frame(sock, pickled_args(args, proto))


def pickled_args(args, proto=2):
    """sargs as ppft's client builds it: a dill pickle of the argument tuple."""
    return dill.dumps(tuple(args), proto)


def recv_result(sock):
    """Receive one job result: the worker's (result, captured_stdout)."""
    return dill.loads(recv_frame(sock))
