"""Jobs for test_user_uids.py, in a module of their own that imports
nothing of the suite: the workers of those tests run as uids that may not
reach compat-tests/, so the test copies this file to a directory every uid
can read, and ppft's client ships these functions as `from uidjobs import
NAME`."""


def who():
    """Who the job runs as: its (real, effective, saved) uids and gids, its
    supplementary groups, HOME, USER, its death signal (PR_GET_PDEATHSIG)
    and its pid."""
    import ctypes
    import os

    signal = ctypes.c_int()
    ctypes.CDLL(None).prctl(2, ctypes.byref(signal))
    return (os.getresuid(), os.getresgid(), os.getgroups(), os.environ.get("HOME"),
            os.environ.get("USER"), signal.value, os.getpid())


def take_root():
    """Tries every way back to root; for each, the name of what it raised,
    or "root" if it worked."""
    import os

    tries = [lambda: os.setuid(0), lambda: os.seteuid(0), lambda: os.setresuid(0, 0, 0),
             lambda: os.setgid(0), lambda: os.setgroups([0])]
    outcomes = []
    for attempt in tries:
        try:
            attempt()
            outcomes.append("root")
        except OSError as e:
            outcomes.append(type(e).__name__)
    return outcomes


def write_private(path, text):
    """Writes `text` to a new file `path` of mode 0600; returns its owner
    and mode."""
    import os

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    st = os.stat(path)
    return st.st_uid, oct(st.st_mode & 0o777)


def read_text(path):
    """The text of `path`, or the name of what reading it raised."""
    try:
        with open(path) as f:
            return f.read()
    except OSError as e:
        return type(e).__name__


def memory_cgroup():
    """The directory of this process's memory cgroup: in the cgroup v1
    memory hierarchy, else in cgroup v2; None if neither is mounted."""
    from pathlib import Path

    lines = [l.split(":", 2) for l in Path("/proc/self/cgroup").read_text().splitlines()]
    v1 = [path for _, names, path in lines if "memory" in names.split(",")]
    v2 = [path for _, names, path in lines if names == ""]
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, right = line.split(" - ", 1)
        fields, kind = left.split(), right.split()
        if fields[3] != "/":
            continue
        if v1 and kind[0] == "cgroup" and "memory" in kind[2].split(","):
            return Path(fields[4]) / v1[0].lstrip("/")
        if not v1 and v2 and kind[0] == "cgroup2":
            return Path(fields[4]) / v2[0].lstrip("/")
    return None


def escape_cgroup():
    """Tries to lift the limit of the worker's memory cgroup and to move
    the worker out of it (into the parent, and into the hierarchy's
    root); returns {what was tried: the name of what it raised, or
    "done"}, and the cgroup it is in afterwards."""
    import os

    here = memory_cgroup()
    tried = {}
    for name in ("memory.memsw.limit_in_bytes", "memory.limit_in_bytes", "memory.max",
                 "memory.swap.max"):
        if (here / name).exists():
            try:
                (here / name).write_text("-1" if name.endswith("_in_bytes") else "max")
                tried[name] = "done"
            except OSError as e:
                tried[name] = type(e).__name__
    root = here
    while (root.parent / "cgroup.procs").exists():
        root = root.parent
    for where, target in (("parent", here.parent), ("root", root)):
        try:
            (target / "cgroup.procs").write_text(str(os.getpid()))
            tried["move to " + where] = "done"
        except OSError as e:
            tried["move to " + where] = type(e).__name__
    return tried, str(memory_cgroup())


def hog(megabytes, seconds):
    """Touches `megabytes` MB and holds them for `seconds` (long enough
    for a poll to see them); returns how many bytes it held."""
    import time

    blob = b"x" * (megabytes * 10**6)
    time.sleep(seconds)
    return len(blob)
