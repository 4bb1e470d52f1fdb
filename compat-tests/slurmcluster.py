"""A Slurm cluster on this one host, from Debian's packages (slurm-wlm and
munge), for test_slurm.py.

Everything lives in one temp dir: munged with a key of its own and its
socket there, a slurm.conf there (found by every Slurm command through
SLURM_CONF), slurmctld, and one slurmd per node, each started with
``-N NAME`` and given its own Port (Debian's Slurm 22.05 runs several on
one host). All daemons run in the foreground as children of the test, so
they are stopped by pid; nothing is written outside the temp dir, and
/etc is not read for Slurm's or munge's configuration.

The nodes declare more CPUs than the host has (SlurmdParameters=
config_overrides), so that several jobs can run at once. Processes are
tracked by proctrack/linuxproc, which follows each step's process tree:
scancel and the time limit signal every process of a step, as on a real
cluster (where cgroups do the tracking).

Every process the cluster starts, jobs included, carries PPTEST_SLURM=<temp
dir> in its environment, so that whatever is left can be found in /proc.
"""

import os
import random
import shutil
import socket
import subprocess
from pathlib import Path

from procs import is_gone, wait_until

COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "scancel", "scontrol", "sinfo", "srun")
START_TIMEOUT = 60.0  # seconds for the daemons to come up and the nodes to be idle
STOP_TIMEOUT = 30.0  # seconds for a daemon to exit once asked
COMMAND_TIMEOUT = 60.0  # seconds for one Slurm command
# KillWait: what scancel and the time limit leave between SIGTERM and
# SIGKILL, the default, which the servers' drain (20 s) must fit in.
KILL_WAIT = 30


def missing_commands():
    """The commands of slurm-wlm and munge this host lacks."""
    return [name for name in COMMANDS if shutil.which(name) is None
            and not os.access("/usr/sbin/" + name, os.X_OK)]


def unused_port():
    """A TCP port free on 127.0.0.1 now, below the ephemeral range (where
    the kernel picks ports for the connections of everything else running
    here, which would take it before the daemon binds it)."""
    low = 1024
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    low = max(low, 4096)
    while True:
        port = random.randrange(low // 2, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


def _command(name):
    return shutil.which(name) or "/usr/sbin/" + name


class Cluster:
    """slurmctld and len(nodes) slurmd in `root`, a fresh directory that
    every user can reach (munged checks the directories above its socket):
    a tempfile.mkdtemp() in /tmp, say, not pytest's private tmp_path."""

    def __init__(self, root, nodes=("n1", "n2"), cpus=8):
        self.root = Path(root)
        self.nodes = list(nodes)
        self.cpus = cpus
        self.conf = self.root / "slurm.conf"
        self.procs = []  # (name, Popen), in start order
        self.env = dict(os.environ)
        self.env.pop("PYTHONPATH", None)
        self.env.update(SLURM_CONF=str(self.conf), PPTEST_SLURM=str(self.root))

    # --- starting and stopping ----------------------------------------------

    def start(self):
        """Start munged, slurmctld and the slurmds; wait (bounded) until
        every node is idle. Raises RuntimeError with the logs if not."""
        for sub in ("munge", "run", "log", "state", "spool"):
            (self.root / sub).mkdir()
        # munged wants its key private and its socket's directory, and every
        # directory above, open to all.
        os.chmod(self.root, 0o755)
        os.chmod(self.root / "munge", 0o700)
        os.chmod(self.root / "run", 0o755)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        socket_path = self.root / "run" / "munge.socket"
        munged = self._spawn("munged", [_command("munged"), "--foreground",
                               "--key-file=%s" % key, "--socket=%s" % socket_path,
                               "--pid-file=%s" % (self.root / "run" / "munged.pid"),
                               "--seed-file=%s" % (self.root / "munge" / "munged.seed"),
                               "--log-file=%s" % (self.root / "log" / "munged.log")])
        if not wait_until(lambda: socket_path.exists() or munged.poll() is not None,
                          timeout=START_TIMEOUT) or munged.poll() is not None:
            raise RuntimeError("munged did not create its socket\n" + self.logs())
        self.conf.write_text(self._slurm_conf(socket_path))
        (self.root / "plugstack.conf").write_text("")
        self._spawn("slurmctld", [_command("slurmctld"), "-D", "-f", str(self.conf)])
        for node in self.nodes:
            self._spawn("slurmd " + node, [_command("slurmd"), "-D", "-N", node,
                                           "-f", str(self.conf)])
        if not wait_until(lambda: self._all_idle() or self._exited(), timeout=START_TIMEOUT,
                          interval=0.2) or self._exited():
            raise RuntimeError("the nodes did not become idle: %r; daemons exited: %r\n%s"
                               % (self._node_states(), self._exited(), self.logs()))

    def _slurm_conf(self, munge_socket):
        host = socket.gethostname().split(".")[0]
        root = self.root
        lines = [
            "ClusterName=pptest",
            "SlurmctldHost=%s(127.0.0.1)" % host,
            "SlurmctldPort=%d" % unused_port(),
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            "AuthInfo=socket=%s" % munge_socket,
            "StateSaveLocation=%s" % (root / "state"),
            "SlurmdSpoolDir=%s" % (root / "spool" / "%n"),
            "SlurmctldPidFile=%s" % (root / "run" / "slurmctld.pid"),
            "SlurmdPidFile=%s" % (root / "run" / "slurmd-%n.pid"),
            "SlurmctldLogFile=%s" % (root / "log" / "slurmctld.log"),
            "SlurmdLogFile=%s" % (root / "log" / "slurmd-%n.log"),
            "PlugStackConfig=%s" % (root / "plugstack.conf"),
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/builtin",
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "KillWait=%d" % KILL_WAIT,
        ]
        for node in self.nodes:
            lines.append("NodeName=%s NodeHostname=%s NodeAddr=127.0.0.1 Port=%d CPUs=%d "
                         "State=UNKNOWN" % (node, host, unused_port(), self.cpus))
        lines.append("PartitionName=pp Nodes=%s Default=YES MaxTime=INFINITE State=UP"
                     % ",".join(self.nodes))
        return "\n".join(lines) + "\n"

    def _spawn(self, name, argv):
        log = open(self.root / "log" / (name.replace(" ", "-") + ".out"), "wb")
        with log:
            proc = subprocess.Popen(argv, cwd=str(self.root), env=self.env,
                                    stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def _exited(self):
        """The daemons that have exited."""
        return [name for name, proc in self.procs if proc.poll() is not None]

    def _node_states(self):
        done = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False)
        return dict(line.split() for line in done.stdout.splitlines() if line.strip())

    def _all_idle(self):
        states = self._node_states()
        return all(states.get(node) == "idle" for node in self.nodes)

    def stop(self):
        """Stop every daemon (scontrol shutdown, then SIGTERM, then SIGKILL
        by pid) and whatever the cluster's jobs left; returns the pids that
        had to be killed after the daemons were gone (should be none)."""
        if any(proc.poll() is None for name, proc in self.procs if name != "munged"):
            self.run("scontrol", "shutdown", check=False)
        for name, proc in reversed(self.procs):
            if name == "munged":
                proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        # slurmstepd and the steps of the last job may still be exiting
        # under load: only what is still there after a bounded wait is left.
        wait_until(lambda: not self.marked_processes(), timeout=STOP_TIMEOUT)
        left = self.marked_processes()
        self.left_described = [describe(pid) for pid in left]
        for pid in left:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        wait_until(lambda: all(is_gone(p) for p in left), timeout=STOP_TIMEOUT)
        return left

    # --- commands and jobs --------------------------------------------------

    def run(self, *argv, check=True, env=None):
        """Run a Slurm command with this cluster's SLURM_CONF."""
        done = subprocess.run([_command(argv[0]), *map(str, argv[1:])], env=env or self.env,
                              cwd=str(self.root), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
        if check and done.returncode != 0:
            raise AssertionError("%s exited %d: %s%s" % (" ".join(map(str, argv)),
                                                         done.returncode, done.stdout,
                                                         done.stderr))
        return done

    def submit(self, *argv, env=None):
        """sbatch ARGV... (options, script, its arguments); the job id."""
        done = self.run("sbatch", "--parsable", *argv, env=env)
        return int(done.stdout.strip().split(";")[0])

    def job(self, job_id):
        """The job's fields from `scontrol show job` (JobState, ...), or {}
        once Slurm has forgotten it."""
        done = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        fields = {}
        for word in done.stdout.split():
            key, sep, value = word.partition("=")
            if sep:
                fields.setdefault(key, value)
        return fields

    def finished(self, job_id):
        """The job's final state (COMPLETED, CANCELLED, TIMEOUT...) once it
        and its steps are over (no longer COMPLETING), else None."""
        fields = self.job(job_id)
        state = fields.get("JobState")
        if state in (None, "PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED"):
            return None
        return state

    def wait_finished(self, job_id, timeout):
        state = wait_until(lambda: self.finished(job_id), timeout=timeout, interval=0.2)
        if not state:
            raise AssertionError("job %s not finished after %.0f s: %r\n%s"
                                 % (job_id, timeout, self.job(job_id), self.logs()))
        return state

    def marked_processes(self, job_id=None):
        """Pids whose environment has PPTEST_SLURM=<this cluster> (and
        SLURM_JOB_ID=job_id, if given)."""
        want = [b"PPTEST_SLURM=" + str(self.root).encode()]
        if job_id is not None:
            want.append(b"SLURM_JOB_ID=%d" % job_id)
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                environ = Path("/proc", entry, "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if all(w in environ for w in want) and not is_gone(int(entry)):
                found.append(int(entry))
        return sorted(found)

    def logs(self, lines=40):
        """The tail of every daemon's log, for failure messages."""
        out = []
        for path in sorted((self.root / "log").glob("*")):
            try:
                text = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            out.append("--- %s ---\n%s" % (path.name, "\n".join(text)))
        return "\n".join(out)


def wait_for_files(directory, pattern, count, timeout):
    """Wait (bounded) until `directory` holds `count` files matching
    `pattern`; returns their paths."""
    found = []

    def enough():
        found[:] = sorted(Path(directory).glob(pattern))
        return len(found) >= count

    wait_until(enough, timeout=timeout)
    return list(found)


def describe(pid):
    """`pid: command line`, for a failure message."""
    try:
        argv = Path("/proc", str(pid), "cmdline").read_bytes().split(b"\0")
        return "%d: %s" % (pid, b" ".join(argv).decode(errors="replace")[:160])
    except OSError:
        return "%d: gone" % pid
