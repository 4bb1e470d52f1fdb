"""Hostile peers without the secret: they must not keep real clients out,
guess the secret quickly, make the server flood the broadcast address, or
bury the log.

Everything runs on loopback; 127.0.0.2 and 127.0.0.3 act as other hosts
(the client socket is bound to one before it connects). The budgets are
the server's: --max-handshakes (unauthenticated connections at once) and
its per-address share, apart from --max-connections (authenticated ones);
--allow; the delay after wrong answers; the answer rate of autodiscovery.

The only timing assertion is the lower bound the throttle promises; every
other wait is a generous upper bound against a hang.
"""

import select
import socket
import threading
import time

import pytest

import faultjobs
import ppwire
from faulthelpers import stat_roundtrip
from pphelpers import close_client, connect_client
from procs import net_sockets, proc_net_address, wait_until

# The server's own behaviour, whatever the client family: run with the
# ppft 1.7.8 family only (conftest.py deselects it in the others).
pytestmark = pytest.mark.server_behaviour

ADD = ppwire.function_package("add", ["def add(a, b):\n    return a + b\n"])
FLOODER = "127.0.0.2"
BYSTANDER = "127.0.0.3"


def connect_from(source, server, timeout=ppwire.SOCKET_TIMEOUT):
    """A TCP connection to the server from loopback address `source`."""
    sock = socket.create_connection((server.host, server.port), timeout=timeout,
                                    source_address=(source, 0))
    sock.settimeout(timeout)
    return sock


def session_from(source, server, ctype="EXEC", secret=None):
    """connect_from, then the handshake with the right secret and `ctype`."""
    sock = connect_from(source, server)
    _, _, reply = ppwire.handshake(sock, secret or server.secret)
    assert reply == b"OK", reply
    ppwire.send_frame(sock, ctype)
    return sock


def job_from(source, server, a, b):
    """One job over a fresh connection from `source`; returns its result."""
    sock = session_from(source, server)
    try:
        ppwire.send_job(sock, ADD, (a, b))
        return ppwire.recv_result(sock)[0]
    finally:
        sock.close()


def closed_without_a_byte(sock):
    """True if the server closes `sock` before sending anything."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def log_lines(server, *words):
    low = [w.lower() for w in words]
    return [l for l in server.log().splitlines() if all(w in l.lower() for w in low)]


def logged_lines(server, *words):
    """log_lines, once there is one (bounded wait): the log thread writes a
    line a moment after what it tells."""
    return wait_until(lambda: log_lines(server, *words), timeout=30)


# --- a flood of silent sockets --------------------------------------------------


class SilentFlood(threading.Thread):
    """Keeps `size` connections from `source` open, never answering: a
    connection the server closes is opened again at once. Counts the
    connections opened, those closed before the server sent a byte
    (refused by a budget) and those closed after the version and nonce
    (the handshake timeout)."""

    def __init__(self, server, source, size):
        super().__init__(daemon=True)
        self.server, self.source, self.size = server, source, size
        self.opened = self.refused = self.timed_out = 0
        self.error = None
        self._stop_event = threading.Event()

    def run(self):
        socks = {}  # socket -> bytes received
        try:
            while not self._stop_event.is_set():
                while len(socks) < self.size:
                    socks[connect_from(self.source, self.server, timeout=10)] = 0
                    self.opened += 1
                readable, _, _ = select.select(list(socks), [], [], 0.05)
                for sock in readable:
                    try:
                        data = sock.recv(4096)
                    except ConnectionResetError:
                        data = b""
                    if data:
                        socks[sock] += len(data)
                        continue
                    if socks.pop(sock):
                        self.timed_out += 1
                    else:
                        self.refused += 1
                    sock.close()
        except Exception as exc:  # reported by stop()
            self.error = exc
        finally:
            for sock in socks:
                sock.close()

    def stop(self):
        self._stop_event.set()
        self.join(30)
        assert self.error is None, "the flood failed: %r" % (self.error,)


@pytest.mark.better_than_ppft(reason="ppft's server has no --max-handshakes")
def test_silent_socket_flood_from_one_address_keeps_no_one_else_out(launch):
    """One address holds 60 silent sockets, more than the whole handshake
    budget (--max-handshakes 8, so 4 per address) and than --max-connections
    8, reopening each one the server closes. Meanwhile a ppft client from
    127.0.0.1 connects and runs its jobs, and a raw client from 127.0.0.3
    runs one; the flood's refusals are logged about once a second."""
    server = launch("--max-handshakes", "8", "--max-connections", "8", nworkers=2)
    flood = SilentFlood(server, FLOODER, 60)
    started = time.monotonic()
    flood.start()
    try:
        wait_until(lambda: flood.refused >= 60 or flood.error,
                   "the flood to be refused by the budget")
        js = connect_client(server)
        try:
            jobs = [js.submit(faultjobs.square, (i,)) for i in range(20)]
            assert [job() for job in jobs] == [i * i for i in range(20)]
        finally:
            close_client(js)
        assert job_from(BYSTANDER, server, 20, 22) == 42
        assert stat_roundtrip(server)[0] == 2
    finally:
        flood.stop()
    assert flood.opened > 60 and flood.refused > 0, vars(flood)
    logged_lines(server, "max-handshakes-per-address")
    elapsed = time.monotonic() - started
    refusals = log_lines(server, "max-handshakes-per-address")
    assert 1 <= len(refusals) <= elapsed + 2, (
        "%d refusal warnings in %.1f s for %d refused connections:\n%s"
        % (len(refusals), elapsed, flood.refused, "\n".join(refusals[-5:])))


# --- guessing the secret ----------------------------------------------------------

# The server's schedule (src/auth.rs): the first FREE wrong answers of an
# address are told at once; then the delay doubles from MAX_DELAY/8 up to
# MAX_DELAY (--login-delay, default 0.25 s); the delays of one address are
# served one after another.
FREE = 4
MAX_DELAY = 0.25
GUESSES = 200
GUESSERS = 4


def schedule_seconds(failures):
    """The least time `failures` wrong answers from one address take."""
    total = 0.0
    for n in range(1, failures + 1):
        over = n - FREE
        if over > 0:
            total += MAX_DELAY / 2 ** max(0, 4 - over)
    return total


@pytest.mark.timeout(300)
@pytest.mark.better_than_ppft(reason="ppft's server answers wrong logins at once")
def test_guessing_is_throttled_while_the_right_secret_works_at_once(launch):
    """200 wrong answers from one address, on 4 connections at a time,
    take at least the sum of the schedule's delays (about 48 s; ppft's
    server answers them all in about a second). Half-way, a client with the
    right secret from that same address logs in and runs a job without
    waiting for the guesser's queue; so does one from another address. The
    failures are logged about once a second, with the address's count."""
    server = launch(nworkers=1)
    done = []
    errors = []
    lock = threading.Lock()

    def guess(worker):
        try:
            for i in range(GUESSES // GUESSERS):
                sock = connect_from(FLOODER, server)
                try:
                    _, _, reply = ppwire.handshake(sock, "guess %d.%d" % (worker, i))
                    assert reply == b"FAILED", reply
                    assert ppwire.is_closed(sock)
                finally:
                    sock.close()
                with lock:
                    done.append(time.monotonic())
        except Exception as exc:
            errors.append(exc)

    started = time.monotonic()
    threads = [threading.Thread(target=guess, args=(w,), daemon=True) for w in range(GUESSERS)]
    for t in threads:
        t.start()
    wait_until(lambda: len(done) >= GUESSES // 2 or errors, "half the guesses", timeout=200)
    login_started = time.monotonic()
    assert job_from(FLOODER, server, 1, 2) == 3
    same_address = time.monotonic() - login_started
    assert job_from(BYSTANDER, server, 3, 4) == 7
    guesses_then = len(done)
    for t in threads:
        t.join(250)
    elapsed = time.monotonic() - started
    assert not errors, errors
    assert len(done) == GUESSES
    least = schedule_seconds(GUESSES)
    assert elapsed >= least, "%d wrong answers took %.1f s, less than the %.1f s owed" % (
        GUESSES, elapsed, least)
    print("%d wrong answers: %.1f s (at least %.1f s owed); the right secret from the "
          "same address, after %d of them: %.3f s"
          % (GUESSES, elapsed, least, guesses_then, same_address))
    logged_lines(server, "authentication failed")
    elapsed = time.monotonic() - started
    warnings = log_lines(server, "authentication failed")
    assert 1 <= len(warnings) <= elapsed + 2, len(warnings)
    assert any("from this address" in w for w in warnings), warnings[-3:]


# --- --allow -----------------------------------------------------------------------


@pytest.mark.better_than_ppft(reason="ppft's server has no --allow")
def test_allow_closes_other_addresses_before_the_version(launch):
    """--allow 127.0.0.1/32: a connection from 127.0.0.3 is closed before
    the server sends a byte; 127.0.0.1 gets the handshake and runs jobs."""
    server = launch("--allow", "127.0.0.1/32")
    outsider = connect_from(BYSTANDER, server)
    try:
        assert closed_without_a_byte(outsider), "the server talked to an outsider"
    finally:
        outsider.close()
    assert job_from("127.0.0.1", server, 2, 3) == 5
    js = connect_client(server)
    try:
        assert js.submit(faultjobs.square, (7,))() == 49
    finally:
        close_client(js)
    wait_until(lambda: log_lines(server, BYSTANDER, "--allow"),
               "a log line about the refused address")


@pytest.mark.better_than_ppft(reason="ppft's server logs nothing of the kind")
def test_log_stays_small_during_a_refused_connection_flood(launch):
    """3000 connections from an address outside --allow, as fast as they
    go: all closed without a byte, and the log holds about one line a
    second about them, not one per connection."""
    server = launch("--allow", "127.0.0.1/32")
    before = len(server.log())
    started = time.monotonic()
    for _ in range(3000):
        sock = connect_from(BYSTANDER, server)
        try:
            assert closed_without_a_byte(sock)
        finally:
            sock.close()
    assert job_from("127.0.0.1", server, 1, 1) == 2
    logged_lines(server, "--allow")
    elapsed = time.monotonic() - started
    lines = log_lines(server, "--allow")
    grew = len(server.log()) - before
    assert 1 <= len(lines) <= elapsed + 2, "%d lines in %.1f s" % (len(lines), elapsed)
    assert grew < 200 * (elapsed + 2), "the log grew by %d bytes in %.1f s" % (grew, elapsed)


# --- autodiscovery -------------------------------------------------------------------
#
# On loopback: the server runs with -a -i 127.0.0.1 -b 127.0.0.1, so its S
# datagrams go to 127.0.0.1:PORT. A socket bound to exactly that address
# and port (SO_REUSEADDR, beside the server's 0.0.0.0:PORT) receives them,
# being the more specific match, while C datagrams sent to 127.0.0.2:PORT
# reach only the server's socket.

ANSWER_BURST = 4  # src/discovery.rs
ANSWERS_PER_SECOND = 2
ANNOUNCE_INTERVAL = 10.0


def _s_listener(server):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", server.port))
    sock.setblocking(False)
    return sock


def _c_sender(source):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((source, 0))
    return sock


def _count_s(sock):
    count = 0
    while True:
        try:
            data, _ = sock.recvfrom(64)
        except BlockingIOError:
            return count
        count += data == b"S"


def _all_answered(server, sender):
    """Wait (bounded) until the server has dealt with every C `sender` sent.
    It reads its datagrams one after another, answering a C before it reads
    the next: once it has read one more sent after them (an X, which it
    ignores), its receive queue is empty and every answer due is out."""
    sender.sendto(b"X", ("127.0.0.2", server.port))
    local = proc_net_address("0.0.0.0", server.port)
    wait_until(lambda: sum(unread for _, _, unread, _ in net_sockets("udp", local)) == 0,
               "the server to read every datagram sent to it", timeout=30)


def _send_c(sender, server, seconds, every=0.002):
    """C datagrams at a high rate for `seconds`; returns how many."""
    sent = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sender.sendto(b"C", ("127.0.0.2", server.port))
        sent += 1
        time.sleep(every)
    return sent


@pytest.mark.better_than_ppft(reason="ppft's server answers every C")
def test_discovery_answers_a_flood_of_c_at_a_bounded_rate(launch):
    """C datagrams from one address for 3 s, hundreds a second: the server
    answers some (a client is found) but no more S than its burst plus its
    rate over that time, plus its periodic announcements."""
    server = launch("-a", "-b", "127.0.0.1")
    listener = _s_listener(server)
    sender = _c_sender(FLOODER)
    def bound(seconds):
        return ANSWER_BURST + ANSWERS_PER_SECOND * seconds + seconds / ANNOUNCE_INTERVAL + 1

    try:
        started = time.monotonic()
        sent = _send_c(sender, server, 3.0)
        flooded = time.monotonic() - started
        _all_answered(server, sender)
        elapsed = time.monotonic() - started
        answers = _count_s(listener)
    finally:
        listener.close()
        sender.close()
    # Over the time the server may have been answering (until it had read
    # every C: longer if it lagged behind the flood).
    assert 1 <= answers <= bound(elapsed), "%d S for %d C in %.1f s (bound %.0f)" % (
        answers, sent, elapsed, bound(elapsed))
    # The flood itself was far more than the rate allows over its length.
    assert sent > 10 * bound(flooded), (sent, flooded)


@pytest.mark.better_than_ppft(reason="ppft's server has no --allow")
def test_discovery_does_not_answer_addresses_outside_allow(launch):
    """-a --allow 127.0.0.1/32: hundreds of C from 127.0.0.3 in 2 s get no
    S beyond at most one periodic announcement; a C from 127.0.0.1 is
    answered."""
    server = launch("-a", "-b", "127.0.0.1", "--allow", "127.0.0.1/32")
    listener = _s_listener(server)
    outsider, insider = _c_sender(BYSTANDER), _c_sender("127.0.0.1")
    try:
        _count_s(listener)
        sent = _send_c(outsider, server, 2.0, every=0.01)
        _all_answered(server, outsider)
        assert _count_s(listener) <= 1, "answered %d C from outside --allow" % sent

        def answered():
            insider.sendto(b"C", ("127.0.0.2", server.port))
            time.sleep(0.2)
            return _count_s(listener)

        assert wait_until(answered, timeout=30), "no S for a C from 127.0.0.1"
    finally:
        for sock in (listener, outsider, insider):
            sock.close()
