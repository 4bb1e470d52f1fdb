# The fork-server. Run by ppserver as
#   python -u -c <worker_bootstrap.py's _bootstrap, then this> -m MODULE [PRELOAD...]
# from the command a worker is spawned with, in the same directory and
# environment, with a Unix stream socket to the server as its stdin.
#
# It imports what `-m MODULE` would import before running the worker, and
# the PRELOAD modules, freezes the objects it has (gc.freeze, so that no
# collection in a worker writes to the pages it shares with this process),
# says "R" to the server, and then forks a worker for every request.
#
# A request is one byte with three descriptors (SCM_RIGHTS): the new
# worker's stdin, stdout and stderr. The byte is "F", or "U" for a worker
# that runs as its user's uid: a line follows with the uid, the gid, the
# groups (comma-separated), and the variables to set (NAME=HEX, the
# value in hex) or remove (NAME), tab-separated. This process stays the
# server's uid; the worker drops to the user's (groups, gid, uid, each
# real, effective and saved) before it sets its death signal, which a
# change of credentials clears, and before it reads a job.
#
# Every worker is forked twice: the middle process exits at once, so the
# worker is handed to the server (a child subreaper), which reaps it and
# learns of its exit as with a worker it spawned; the answer, "P <pid>",
# comes once that is done.
#
# A worker then gets what a spawned worker has: its own process group,
# death with the server (PR_SET_PDEATHSIG, which a fork does not
# inherit), the pipes as 0, 1 and 2 and no other descriptor, the signal
# handlers the server's command started with (then _bootstrap's), fresh
# random state (random and numpy's global generator, if loaded), and the
# sys.argv and sys.path a spawned worker starts with. Its environment is
# this process's: with PRELOAD, the thread-count variables below are set
# to 1 unless they were set, since a library that starts threads at import
# (OpenBLAS, MKL, OpenMP) cannot be forked safely.
#
# Its workers' command line is its own (a fork keeps it): `-m MODULE`
# in it names the worker module, as in a spawned worker's. The fork-server
# alone is named "ppserver-fork" (PR_SET_NAME: ps -o comm, top); each
# worker takes the interpreter's name back.
#
# Other answers: "I <module>\t<error>" when a PRELOAD module cannot be
# imported (a startup error); "E <reason>" when it cannot serve at all
# (at startup: the server then spawns workers) or cannot fork this once
# (out of processes or memory: that worker is spawned); "B <reason>" when
# it is broken and only a new fork-server helps: the request's
# descriptors did not all arrive, or it is out of descriptors (EMFILE,
# ENFILE). Whatever the answer, it keeps no descriptor of the request's:
# what arrived, and the pipe its worker's pid comes through, are closed
# on every path; an error that is not answered ends this process.
THREAD_VARIABLES = ('OPENBLAS_NUM_THREADS', 'OMP_NUM_THREADS', 'MKL_NUM_THREADS',
                    'NUMEXPR_NUM_THREADS', 'VECLIB_MAXIMUM_THREADS', 'BLIS_NUM_THREADS')


def _forkserver(bootstrap, warm, close_all_above):
    # runpy too: the bootstrap runs the worker module with it.
    import errno, gc, os, runpy, signal, socket, sys, time
    thread_variables = THREAD_VARIABLES
    g = globals()
    g.pop('_forkserver', None)
    g.pop('THREAD_VARIABLES', None)
    # Named first: until then it looks like a worker in ps.
    ctl_error = None
    try:
        import ctypes
        prctl = ctypes.CDLL(None, use_errno=True).prctl
        if not hasattr(socket, 'recv_fds'):
            raise OSError('socket.recv_fds is missing')
        with open('/proc/self/comm', 'rb') as f:
            comm = ctypes.c_char_p(f.read().rstrip(b'\n'))
        prctl(15, ctypes.c_char_p(b'ppserver-fork'))  # PR_SET_NAME
    except Exception as e:
        ctl_error = '%s: %s' % (type(e).__name__, e)

    module, preload = sys.argv[2], sys.argv[3:]
    del sys.argv[1:]
    # As _bootstrap does for a spawned worker: -c puts '' first.
    if sys.path and sys.path[0] == '':
        sys.path[0] = os.getcwd()
    path = list(sys.path)
    server = os.getppid()
    ctl = socket.socket(fileno=os.dup(0))
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)

    def say(text):
        ctl.sendall(text.encode('utf-8', 'replace') + b'\n')

    if ctl_error is not None:
        say('E ' + ctl_error)
        return None

    # The stop signals are ignored here as in every worker; each worker
    # gets the handlers the command started with back, then _bootstrap's.
    stops = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]
    started = {}
    for signum in stops:
        handler = signal.getsignal(signum)
        if handler is not None:
            started[signum] = handler
            signal.signal(signum, signal.SIG_IGN)

    if preload:
        for name in thread_variables:
            os.environ.setdefault(name, '1')
    warm(module)
    for name in preload:
        try:
            __import__(name)
        except BaseException as e:
            say('I %s\t%s: %s' % (name, type(e).__name__, e))
            return None
    # What the imports left behind goes now; what they built stays, frozen.
    gc.collect()
    # PyPy has no gc.freeze: its collector does not write to old objects.
    freeze = getattr(gc, 'freeze', None)
    if freeze is not None:
        freeze()
    # Two forks per worker. Where the C API can be called (CPython), the
    # middle process runs no Python of its own: the forks are libc's, with
    # Python's fork handling done around them as os.fork does it, once in
    # this process and once in the worker. It then costs little more than
    # its page tables. Elsewhere (PyPy), os.fork twice. Returns the middle
    # process's pid here, 0 in the worker; the middle never returns.
    middle_pid = [0]
    try:
        api, libc = ctypes.pythonapi, ctypes.PyDLL(None, use_errno=True)
        before, parent, child = (api.PyOS_BeforeFork, api.PyOS_AfterFork_Parent,
                                 api.PyOS_AfterFork_Child)
        raw_fork, raw_getpid, raw_exit = libc.fork, libc.getpid, libc._exit
    except (AttributeError, OSError, NameError):
        api = None

    def as_worker():
        # In the middle process, before the second fork: the worker is
        # born with a worker's name, so it never shows as a second
        # fork-server once the server adopts it (the middle may exit before
        # the worker has run a single line).
        prctl(15, comm)  # PR_SET_NAME

    def fork_with_python():
        pid = os.fork()
        if pid:
            return pid
        middle_pid[0] = os.getpid()
        try:
            as_worker()
            if os.fork():
                os._exit(0)
        except BaseException:
            os._exit(1)
        return 0

    def fork_with_libc():
        before()
        pid = raw_fork()
        if pid:
            parent()
            if pid < 0:
                raise OSError(ctypes.get_errno(), 'fork failed')
            return pid
        me = raw_getpid()
        as_worker()
        if raw_fork():
            raw_exit(0)
        child()
        middle_pid[0] = me
        return 0

    fork_twice = fork_with_python if api is None else fork_with_libc
    say('R %d' % os.getpid())

    def close(fds):
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def read_identity():
        line = b''
        while not line.endswith(b'\n'):
            more = ctl.recv(4096)
            if not more or len(line) > 65536:
                raise ValueError('the line did not end')
            line += more
        fields = line[:-1].split(b'\t')
        uid, gid = int(fields[0]), int(fields[1])
        groups = [int(g) for g in fields[2].split(b',') if g]
        env = []
        for field in fields[3:]:
            name, has, value = field.partition(b'=')
            env.append((name, bytes.fromhex(value.decode()) if has else None))
        return uid, gid, groups, env

    def become(identity):
        uid, gid, groups, env = identity
        try:
            os.setgroups(groups)
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        except BaseException:
            # Never run a job as this process's uid instead.
            os._exit(1)
        for name, value in env:
            if value is None:
                os.environb.pop(name, None)
            else:
                os.environb[name] = value

    while True:
        try:
            request, fds, flags, _ = socket.recv_fds(ctl, 1, 3)
        except ConnectionError:
            return None
        if not request:
            # The server closed its end: it is stopping.
            close(fds)
            return None
        identity = None
        if request == b'U':
            try:
                identity = read_identity()
            except (OSError, ValueError, IndexError) as e:
                close(fds)
                say('B the request is out of step: %s' % e)
                continue
        if len(fds) != 3 or flags & socket.MSG_CTRUNC:
            # Fewer when this process is out of descriptors (the kernel
            # drops what it cannot install): only a new process helps.
            close(fds)
            cut = ' (cut short)' if flags & socket.MSG_CTRUNC else ''
            say('B the request came with %d descriptors%s, not 3' % (len(fds), cut))
            continue
        pid_pipe = ()
        try:
            pid_pipe = os.pipe()
            middle = fork_twice()
        except OSError as e:
            close(fds)
            close(pid_pipe)
            full = e.errno in (errno.EMFILE, errno.ENFILE)
            say('%s cannot fork: %s' % ('B' if full else 'E', e))
            continue
        rpid, wpid = pid_pipe
        if middle == 0:
            me = middle_pid[0]
            os.close(rpid)
            os.write(wpid, b'%d' % os.getpid())
            # The worker. Its parent is handed over to the server when the
            # middle process exits, a moment from now. The fork-server reads
            # the pid until the pipe ends: this end must not keep it open.
            os.close(wpid)
            while os.getppid() == me:
                time.sleep(0.00005)
            if identity is not None:
                become(identity)
            prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
            if os.getppid() != server:
                # The server died meanwhile.
                os._exit(1)
            os.setpgid(0, 0)
            for fd, target in zip(fds, (0, 1, 2)):
                os.dup2(fd, target)
            ctl.detach()
            close_all_above(2)
            for signum, handler in started.items():
                signal.signal(signum, handler)
            sys.path[:] = path
            for name in ('random', 'numpy.random'):
                reseed = getattr(sys.modules.get(name), 'seed', None)
                if reseed is not None:
                    try:
                        reseed()
                    except Exception:
                        pass
            return module
        close(fds)
        os.close(wpid)
        got = b''
        while True:
            more = os.read(rpid, 32)
            if not more:
                break
            got += more
        os.close(rpid)
        os.waitpid(middle, 0)
        say('P %s' % got.decode() if got else 'E the fork did not complete')


def _warm(module):
    # What `-m MODULE` imports before it runs: its packages, then what the
    # file it runs imports at its top level (as far as it can be told
    # without running it). A failure here only costs the worker the import.
    import ast, importlib, importlib.util
    try:
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.submodule_search_locations is not None:
            importlib.import_module(module)
            module += '.__main__'
            spec = importlib.util.find_spec(module)
        source = spec.loader.get_source(module)
        tree = ast.parse(source)
    except Exception:
        return
    names = []
    nodes = list(tree.body)
    while nodes:
        node = nodes.pop(0)
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            try:
                base = importlib.util.resolve_name('.' * node.level + (node.module or ''),
                                                   spec.parent)
            except Exception:
                continue
            names.append(base)
            names += [base + '.' + alias.name for alias in node.names]
        elif isinstance(node, (ast.Try, ast.If)):
            nodes += node.body
            nodes += getattr(node, 'orelse', [])
            for handler in getattr(node, 'handlers', []):
                nodes += handler.body
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:
            pass


def _close_all_above(highest):
    import os
    try:
        fds = [int(fd) for fd in os.listdir('/proc/self/fd')]
    except OSError:
        fds = range(highest + 1, os.sysconf('SC_OPEN_MAX'))
    for fd in fds:
        if fd > highest:
            try:
                os.close(fd)
            except OSError:
                pass


def _main():
    import sys
    bootstrap, warm, close_all_above = _bootstrap, _warm, _close_all_above
    g = globals()
    for name in ('_bootstrap', '_warm', '_close_all_above', '_main'):
        g.pop(name, None)
    module = _forkserver(bootstrap, warm, close_all_above)
    if module is None:
        sys.exit(0)
    # In a forked worker: from here on, as a spawned one.
    bootstrap(module)


_main()
