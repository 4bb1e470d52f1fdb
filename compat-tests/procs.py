"""Look at processes from outside, through /proc, and wait (bounded) for
things to happen: used by every test that watches the server's workers,
fds or memory, and by the helpers that start and stop servers.

Linux only: everything here reads /proc. Nothing here asserts timing: the
waits are bounded only so that a server that never gets there fails the test
instead of hanging it. Functions named for a pid take a pid; those named for
a server take a pphelpers.ServerHandle (its .proc, .nworkers, .log_tail()).
The sockets of /proc/net/tcp and /proc/net/udp tell what a server has read
and which connections it still holds: events to wait for, where a fixed
sleep would only guess.
"""

import os
import signal
import socket
import struct
import time
from pathlib import Path

# `python -u [-c BOOTSTRAP] -m MODULE`: the worker processes of every client
# family (the server runs the module through a bootstrap that ignores the stop
# signals: src/workers/worker_bootstrap.py).
WORKER_MODULES = ("ppft", "pp._worker")

WAIT_TIMEOUT = 30.0  # default upper bound of wait_until, in seconds


# --- bounded waits -------------------------------------------------------------


def wait_until(probe, what=None, timeout=WAIT_TIMEOUT, interval=0.05):
    """Call probe() until it returns something truthy, and return that.

    After `timeout` seconds: with `what`, fail (AssertionError naming `what`
    and the last value probe returned); without, return that last (falsy)
    value, for ``assert wait_until(...), message``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            if what is None:
                return value
            raise AssertionError("%s (still not the case after %.0f s; last: %r)"
                                 % (what, timeout, value))
        time.sleep(interval)


def wait_settled(probe, limit, what, timeout=WAIT_TIMEOUT):
    """Wait until probe() <= limit (e.g. an fd count drifting back to its
    baseline as the server notices closed connections); returns the value."""
    seen = []

    def ok():
        seen.append(probe())
        return seen[-1] <= limit

    try:
        wait_until(ok, "%s: want <= %s" % (what, limit), timeout, interval=0.2)
    except AssertionError as exc:
        raise AssertionError("%s; last values %s" % (exc, seen[-10:])) from None
    return seen[-1]


# --- one process -----------------------------------------------------------------


def stat_fields(pid):
    """(state, ppid) of a process from /proc/<pid>/stat, or None if gone."""
    try:
        data = Path("/proc/%d/stat" % pid).read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm may contain spaces and parentheses: split after the last ')'.
    rest = data[data.rindex(b")") + 2:].split()
    return rest[0].decode(), int(rest[1])


def exists(pid):
    """True while `pid` exists at all (a zombie still exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sigkill(pid):
    """SIGKILL `pid`; False if there was no such process."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


def is_gone(pid):
    """True if the process no longer runs: it does not exist, or it is dead
    and waiting to be reaped (zombie)."""
    fields = stat_fields(pid)
    return fields is None or fields[0] in ("Z", "X")


def cmdline(pid):
    try:
        raw = Path("/proc/%d/cmdline" % pid).read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def is_worker_cmdline(argv):
    """`python -u [-c BOOTSTRAP] -m ppft` (or pp._worker): a pp worker process,
    or the fork-server, whose forks keep its command line (see
    is_forkserver)."""
    return "-m" in argv and argv.index("-m") + 1 < len(argv) and \
        argv[argv.index("-m") + 1] in WORKER_MODULES


# The fork-server's process name (/proc/PID/comm); its workers take the
# interpreter's back.
FORKSERVER_COMM = "ppserver-fork"


def comm(pid):
    try:
        return Path("/proc/%d/comm" % pid).read_text().strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def is_forkserver(pid):
    return comm(pid) == FORKSERVER_COMM


def signal_masks(pid):
    """(ignored, caught): the sets of signal numbers the process ignores
    and handles, from /proc/<pid>/status. A signal it ignores is discarded
    when sent: nothing is left to happen later."""
    fields = {}
    for line in Path("/proc/%d/status" % pid).read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()

    def numbers(mask):
        bits = int(mask, 16)
        return {n for n in range(1, 65) if bits & (1 << (n - 1))}

    return numbers(fields["SigIgn"]), numbers(fields["SigCgt"])


def fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def fd_targets(pid):
    """What the process's fds point at (for messages about a leak)."""
    out = []
    for fd in sorted(os.listdir("/proc/%d/fd" % pid), key=int):
        try:
            out.append("%s -> %s" % (fd, os.readlink("/proc/%d/fd/%s" % (pid, fd))))
        except OSError:
            pass
    return out


def status_kib(pid, field):
    """A `kB` field of /proc/<pid>/status (VmRSS, VmSize, VmHWM...)."""
    for line in Path("/proc/%d/status" % pid).read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rss_kib(pid):
    return status_kib(pid, "VmRSS")


# --- a process's children ------------------------------------------------------------


def children(pid):
    """{child pid: state letter} of every child of `pid`, zombies included.
    (/proc/<pid>/task/*/children is not always compiled in: scan /proc.)"""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = stat_fields(int(entry))
        if fields is not None and fields[1] == pid:
            found[int(entry)] = fields[0]
    return found


def live_children(pid):
    """Sorted pids of the live (not zombie) children of `pid`."""
    return sorted(child for child, state in children(pid).items() if state != "Z")


def zombie_children(pid):
    return {child for child, state in children(pid).items() if state == "Z"}


def worker_children(pid):
    """Sorted pids of the live children of server `pid` but its fork-server:
    its workers, and whatever else it reaped or adopted."""
    return [child for child in live_children(pid) if not is_forkserver(child)]


def forkserver_pids(server):
    """The server's live fork-server (a list: none with --worker-start spawn)."""
    return [child for child in live_children(server.proc.pid) if is_forkserver(child)]


# --- a server's workers --------------------------------------------------------------


def worker_pids(server):
    """Live (not zombie) worker processes of the server."""
    return {
        pid
        for pid, state in children(server.proc.pid).items()
        if state != "Z" and is_worker_cmdline(cmdline(pid)) and not is_forkserver(pid)
    }


def wait_for_children(server, count, timeout=WAIT_TIMEOUT):
    """Wait (bounded) until the server has at least `count` live child
    processes but its fork-server (its workers); returns their sorted pids."""
    found = []

    def enough():
        found[:] = worker_children(server.proc.pid)
        return len(found) >= count

    assert wait_until(enough, timeout=timeout), (
        "server has children %r, expected %d workers\n%s" % (found, count, server.log_tail()))
    return found


def wait_for_pool(server, exclude=(), timeout=60.0):
    """Wait until the server has exactly its nworkers live worker processes,
    none of them in `exclude`, and no zombie children; return their pids."""
    exclude = set(exclude)
    last = {}

    def probe():
        pids = worker_pids(server)
        last["pids"], last["zombies"] = pids, zombie_children(server.proc.pid)
        return len(pids) == server.nworkers and not (pids & exclude) and not last["zombies"]

    try:
        wait_until(probe, "pool of %d workers (excluding %s)" % (server.nworkers, sorted(exclude)),
                   timeout)
    except AssertionError as exc:
        raise AssertionError("%s; workers %s, zombies %s" % (
            exc, sorted(last.get("pids", ())), sorted(last.get("zombies", ()))))
    return last["pids"]


# --- sockets, from /proc/net (this process's network namespace) ---------------------

TCP_LISTEN = "0A"


def proc_net_address(ip, port=None):
    """An IPv4 address (and port) as /proc/net/tcp and /proc/net/udp write it."""
    (n,) = struct.unpack("<I", socket.inet_aton(ip))
    return "%08X" % n + ("" if port is None else ":%04X" % port)


def net_sockets(proto, local, remote=""):
    """The IPv4 `proto` ("tcp" or "udp") sockets whose local address is
    `local` (proc_net_address(ip, port)) and whose remote address starts
    with `remote`: a list of (remote, state, unread bytes, inode). Unread
    bytes are the receive queue: what arrived and the owner has not read
    yet. Inode 0: no process holds the socket any more (it is closed and
    only the kernel finishes it: TIME_WAIT, FIN_WAIT...)."""
    found = []
    for line in Path("/proc/net/%s" % proto).read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[2].startswith(remote):
            found.append((fields[2], fields[3], int(fields[4].split(":")[1], 16),
                          int(fields[9])))
    return found


def held_connections(server):
    """The client connections the server holds open: the sockets on its
    host:port it has accepted (a socket in the listen queue has no inode
    yet) and not yet closed (inode 0 again): [(remote, state, unread
    bytes)]."""
    local = proc_net_address(server.host, server.port)
    return [(remote, state, unread)
            for remote, state, unread, inode in net_sockets("tcp", local)
            if state != TCP_LISTEN and inode != 0]


def unread_from(server, client_ip, client_port=None):
    """(connections, bytes): the server's connections from `client_ip` (and
    `client_port`), and how many bytes those clients sent that the server
    has not read yet (the receive queues of its sockets). Zero bytes means
    the server has taken everything they sent."""
    local = proc_net_address(server.host, server.port)
    remote = proc_net_address(client_ip, client_port)
    found = net_sockets("tcp", local, remote if client_port is not None else remote + ":")
    return len(found), sum(unread for _, _, unread, _ in found)
