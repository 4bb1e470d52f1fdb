"""A separate pp client process that sends jobs with large random
arguments and checks every answer by content (test_integrity.py).

Usage: integrity_jobs.py HOST:PORT SECRET TAG NJOBS BARRIER_DIR NCLIENTS NAP SLOW_EVERY SLOW_NAP

Job i carries os.urandom(n) with n drawn from 1 to 8 MiB, sleeps NAP
seconds (SLOW_NAP for every SLOW_EVERY-th job, 0: none) and answers
(i, len, sha256 of what it received); the client compares that with the
sha256 of what it sent. An answer is right, or None with ppserver's text
giving the reason (captured per job: ppft prints it when the result is
unpickled). A wrong hash, another job's answer, None without a reason, or
no answer within a deadline is bad.

Prints one JSON line {"tag", "njobs", "ok", "none": {reason: count},
"bad", "bytes"}; exits 0 if nothing is bad.
"""

import hashlib
import json
import os
import random
import sys
import time

from ppclient import answer_of, connected_server, start_together

JOB_DEADLINE = 240.0  # seconds: a job with no answer by then is lost
MIB = 1 << 20


def checksum(i, blob, nap):
    """(i, len, sha256) of the argument the worker received."""
    import hashlib
    import time

    time.sleep(nap)
    return i, len(blob), hashlib.sha256(blob).hexdigest()


def reason_of(text):
    """The reason ppserver gave in a (None, text) answer, or None."""
    low = text.lower()
    if "worker" in low and "died" in low:
        return "worker died"
    if "--job-timeout" in low:
        return "job timeout"
    if "ppserver" in low:
        return "other: " + text.strip()[:120]
    return None


def main():
    server_id, secret, tag, njobs, barrier, nclients, nap, slow_every, slow_nap = sys.argv[1:10]
    njobs, nclients, slow_every = int(njobs), int(nclients), int(slow_every)
    nap, slow_nap = float(nap), float(slow_nap)
    js = connected_server(server_id, secret)
    rng = random.Random(tag)
    start_together(barrier, tag, nclients)

    expected, jobs, sent = [], [], 0
    for i in range(njobs):
        blob = os.urandom(rng.randint(MIB, 8 * MIB))
        sent += len(blob)
        expected.append((i, len(blob), hashlib.sha256(blob).hexdigest()))
        this_nap = slow_nap if slow_every and i % slow_every == slow_every - 1 else nap
        jobs.append((time.monotonic(), js.submit(checksum, (i, blob, this_nap))))
        del blob
    ok = 0
    none, bad = {}, []
    for i, (submitted, job) in enumerate(jobs):
        answered = answer_of(job, submitted, JOB_DEADLINE)
        if answered is None:
            bad.append([i, "lost: no answer within %s s" % JOB_DEADLINE])
            continue
        result, printed = answered
        if result is None:
            reason = reason_of(printed)
            if reason is None:
                bad.append([i, "None without a reason: %r" % printed[-500:]])
            else:
                none[reason] = none.get(reason, 0) + 1
        elif tuple(result) == expected[i]:
            ok += 1
        else:
            bad.append([i, "wrong answer %r, sent %r" % (tuple(result), expected[i])])
    print(json.dumps({"tag": tag, "njobs": njobs, "ok": ok, "none": none, "bad": bad,
                      "bytes": sent}))
    sys.stdout.flush()
    # A lost job would keep one of the client's threads waiting forever.
    os._exit(1 if bad else 0)


if __name__ == "__main__":
    main()
