"""A separate ppft client process that sends big jobs and checks every answer
(used while workers are being killed).

Usage: big_jobs.py HOST:PORT SECRET TAG NJOBS SIZE BARRIER_DIR NCLIENTS

Each job carries its own SIZE-byte payload (seeded by TAG and index) and
answers (tag, index, length, md5, worker pid). An answer is either exactly
that, or None with ppserver's text saying the job's worker died (printed by
ppft when the result is unpickled, captured per job here). Anything else is
bad, and so is a job that gets no answer within a deadline.

Prints one JSON line {"tag", "njobs", "ok", "died", "bad", "pids"}; exits 0
if nothing is bad.
"""

import hashlib
import json
import os
import random
import sys
import time

from ppclient import answer_of, connected_server, start_together

JOB_DEADLINE = 60.0  # seconds: a job with no answer by then is lost


def digest(tag, i, blob, nap):
    """Identify a big payload: (tag, i, len, md5, worker pid)."""
    import hashlib
    import os
    import time

    time.sleep(nap)
    return tag, i, len(blob), hashlib.md5(blob).hexdigest(), os.getpid()


def payload(tag, i, size):
    return random.Random("%s-%d" % (tag, i)).randbytes(size)


def main():
    server_id, secret, tag, njobs, size, barrier, nclients = sys.argv[1:8]
    njobs, size, nclients = int(njobs), int(size), int(nclients)
    js = connected_server(server_id, secret)
    start_together(barrier, tag, nclients)

    expected, jobs = [], []
    for i in range(njobs):
        blob = payload(tag, i, size)
        expected.append((tag, i, len(blob), hashlib.md5(blob).hexdigest()))
        jobs.append((time.monotonic(), js.submit(digest, (tag, i, blob, 0.1 + (i % 3) * 0.1))))
        del blob
    ok = died = 0
    bad, pids = [], set()
    for i, (submitted, job) in enumerate(jobs):
        answered = answer_of(job, submitted, JOB_DEADLINE)
        if answered is None:
            bad.append([i, "lost: no answer within %s s" % JOB_DEADLINE])
            continue
        result, printed = answered
        if result is None:
            if "worker" in printed and "died" in printed:
                died += 1
            else:
                bad.append([i, "None without the worker-died text: %r" % printed[-500:]])
        elif tuple(result[:4]) == expected[i]:
            ok += 1
            pids.add(result[4])
        else:
            bad.append([i, "wrong result %r" % (result[:4],)])
    print(json.dumps({"tag": tag, "njobs": njobs, "ok": ok, "died": died, "bad": bad,
                      "pids": sorted(pids)}))
    sys.stdout.flush()
    # A lost job would keep one of ppft's threads waiting forever: exit hard.
    os._exit(1 if bad else 0)


if __name__ == "__main__":
    main()
