"""Job functions and checks shared by several test modules.

ppft's client ships functions defined in an importable module as
``from common_jobs import name``, so the workers import this module (the
suite puts compat-tests/ on the server's PYTHONPATH).
"""

import os
import time


def timed_nap(seconds):
    """Sleep; return (worker pid, start, end) as seen inside the job."""
    start = time.time()
    time.sleep(seconds)
    end = time.time()
    return os.getpid(), start, end


def logged_nap(path, job_id, seconds):
    """Append `job_id` to the file at `path` as the job starts (one short
    line, appended atomically: a job run twice shows twice), sleep, and
    return (job_id, seconds)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"%d\n" % job_id)
    finally:
        os.close(fd)
    time.sleep(seconds)
    return job_id, seconds


def run_in_parallel(client, nworkers, seconds):
    """Submit nworkers timed_nap jobs at once; returns (results, problem),
    problem being None if they ran on nworkers distinct worker processes all
    at the same time (max(start) < min(end): no wall-clock threshold)."""
    jobs = [client.submit(timed_nap, (seconds,), modules=("os", "time")) for _ in range(nworkers)]
    results = [job() for job in jobs]
    assert None not in results, "a job failed: %r" % (results,)
    pids = {pid for pid, _, _ in results}
    if len(pids) != nworkers:
        return results, "jobs ran on %d distinct workers, not %d" % (len(pids), nworkers)
    if max(start for _, start, _ in results) >= min(end for _, _, end in results):
        return results, "jobs did not all overlap"
    return results, None


def assert_all_workers_in_parallel(client, nworkers, seconds=1.0, within=60.0):
    """nworkers jobs that each sleep `seconds` run on nworkers distinct worker
    processes, all at the same time. Returns the set of worker pids.

    Workers may still be starting (at server start, or replacing one that
    died), so a batch that found fewer than nworkers live workers is retried
    until `within` seconds have passed: a server that never runs all its
    workers in parallel still fails. A job that fails (None) fails at once.
    """
    deadline = time.monotonic() + within
    attempts = []
    while True:
        results, problem = run_in_parallel(client, nworkers, seconds)
        if problem is None:
            return {pid for pid, _, _ in results}
        attempts.append("%s: %r" % (problem, results))
        if time.monotonic() > deadline:
            raise AssertionError(
                "never ran %d jobs in parallel on %d workers; attempts:\n%s"
                % (nworkers, nworkers, "\n".join(attempts))
            )


# --- test_sharing: what one user's job leaves in a worker, and when jobs ran


def mark(tag):
    """Leaves `tag` in the worker, as a global of this module and as an
    attribute of builtins; returns the worker's pid."""
    global MARK
    import builtins
    import os
    MARK = tag
    builtins.ppserver_test_mark = tag
    return os.getpid()


def look():
    """(worker pid, this module's MARK, builtins' mark) as the job sees them."""
    import builtins
    import os
    return (os.getpid(), globals().get("MARK"),
            getattr(builtins, "ppserver_test_mark", None))


def span(path, tag, seconds):
    """Appends "S tag time" to `path`, sleeps `seconds`, appends "E tag
    time" (each under a lock); returns `tag`."""
    import fcntl
    import time

    def note(what):
        with open(path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write("%s %s %.6f\n" % (what, tag, time.time()))
            f.flush()
            fcntl.flock(f, fcntl.LOCK_UN)
    note("S")
    time.sleep(seconds)
    note("E")
    return tag
