"""What the client scripts in this directory share (they import it as
``ppclient``: a script's own directory is first on sys.path).

- ``pp``: this interpreter's pp client module, ppft (1.7.8 or 1.6.6.4),
  else pp 1.7.0's pp.
- ``wait_for``: a bounded wait that ends the script when it runs out.
- ``connected_server``: a client of one server, fully connected.
- ``start_together``: a barrier, so that several client processes submit
  their jobs at the same time.
- ``close``: destroy a client and close the sockets ppft leaves open.
- ``answer_of``: a submitted job's answer within a deadline, with the text
  the client prints when it unpickles it (ppserver's reason for a None).

No job functions here: a script's jobs are defined in the script itself
(``__main__``), so the client ships their source.
"""

import contextlib
import io
import os
import socket
import time

try:
    import ppft as pp
except ImportError:  # pp 1.7.0
    import pp

CONNECT_TIMEOUT = 60.0  # seconds


def wait_for(predicate, what, timeout=CONNECT_TIMEOUT):
    """Poll predicate() until it is true; exit the script if it never is."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit("timed out waiting for %s" % what)
        time.sleep(0.02)


def connected_server(server_id, secret):
    """A pp.Server using only the server `server_id` (HOST:PORT, no local
    workers), once it has the STAT connection and 2 EXEC connections per
    worker that server reports."""
    js = pp.Server(ncpus=0, ppservers=(server_id,), secret=secret)

    def ncpus():
        stats = js.get_stats()
        return stats[server_id].ncpus if server_id in stats else 0

    wait_for(lambda: ncpus() and js.autopp_list.get(server_id, 0) >= 2 * ncpus(),
             "the client to connect")
    return js


def start_together(barrier, tag, nclients):
    """Write BARRIER/ready-TAG, then wait until NCLIENTS such files exist."""
    open(os.path.join(barrier, "ready-" + tag), "w").close()
    wait_for(lambda: len([f for f in os.listdir(barrier) if f.startswith("ready-")]) >= nclients,
             "the other clients")


def answer_of(job, submitted, deadline):
    """Waits until `job` (submitted at monotonic time `submitted`) is
    finished, for at most `deadline` s after its submission. Returns
    (result, printed text), or None if it got no answer by then: a lost job.
    """
    while not job.finished and time.monotonic() - submitted < deadline:
        time.sleep(0.01)
    if not job.finished:
        return None
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = job()
    return result, out.getvalue()


def close(js):
    """destroy(), then close the sockets ppft leaves open, so the servers see
    this client leave now (they would anyway when the process exits)."""
    js.destroy()
    rworkers = list(getattr(js, "_Server__rworkers", []))
    rworkers += list(getattr(js, "_Server__rworkers_reserved", []))
    rworkers += [s.rworker for s in getattr(js, "_Server__stats", {}).values()
                 if getattr(s, "rworker", None)]
    for rworker in rworkers:
        sock = getattr(rworker, "socket", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            except OSError:
                pass
