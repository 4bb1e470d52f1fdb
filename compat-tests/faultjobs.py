"""Job functions for the fault-tolerance tests.

ppft's client ships functions from an importable module as ``from faultjobs
import name`` (so the workers import this deliberately light module), while
pp 1.7.0's client ships their source alone: so every function here is
self-contained, with its imports inside it and no helpers.
"""


def square(x):
    return x * x


def getpid_nap(seconds):
    """Sleep, then return the worker's pid."""
    import os
    import time

    time.sleep(seconds)
    return os.getpid()


def mark_and_sleep(directory, name, seconds):
    """Record that the job started (file `name`.start holding the worker pid)
    and, if it lives that long, that it ended (`name`.end); returns name.
    Each file is written under a temporary name and renamed into place."""
    import os
    import time

    for suffix in ("start", "end"):
        path = os.path.join(directory, "%s.%s" % (name, suffix))
        tmp = "%s.%d.tmp" % (path, os.getpid())
        with open(tmp, "w") as f:
            f.write(str(os.getpid()))
        os.replace(tmp, path)
        if suffix == "start":
            time.sleep(seconds)
    return name


def exit_with(code):
    """The worker process exits at once, answering nothing."""
    import os

    os._exit(code)
