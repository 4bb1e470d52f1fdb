# Run by ppserver as `python -u -c <this> -m MODULE`: runs the worker
# module as `python -u -m MODULE` would, with SIGTERM, SIGINT and SIGHUP
# ignored by a handler in Python first.
#
# The server decides when a worker stops: it kills the worker's process
# group with SIGKILL. A signal sent to the whole process tree (Slurm's
# scancel and time limit, systemd's KillMode=control-group) must not take
# a worker away from the job the server's drain is still answering.
#
# A handler, not SIG_IGN: exec resets a handler to the default, while it
# keeps SIG_IGN, so programs a job starts get the default handling. A
# child forked without exec (multiprocessing) gets the handlers it would
# have had back at once. A signal already ignored when the worker starts
# (the server started under nohup) stays ignored, as under -m.
#
# What a job sees stays what -m gives: sys.argv, sys.path, __main__'s
# names, the working directory and the environment. Comment lines are
# left out of the text passed with -c (see worker.rs).
#
# The fork-server (forkserver.py) is this file's definition followed by
# its own text: each worker it forks calls _bootstrap(MODULE), with
# sys.argv and sys.path already set as below.
def _bootstrap(module=None):
    import os, runpy, signal, sys
    # -m leaves no names of its own in __main__, where jobs run.
    globals().pop('_bootstrap', None)
    if module is None:
        module = sys.argv[2]
        del sys.argv[1:]
        # -c puts '' first on sys.path; -m the working directory, absolute.
        if sys.path and sys.path[0] == '':
            sys.path[0] = os.getcwd()

    def ignore(signum, frame):
        pass

    before = {}
    for name in ('SIGTERM', 'SIGINT', 'SIGHUP'):
        signum = getattr(signal, name)
        handler = signal.getsignal(signum)
        # None: set outside Python, which cannot be put back.
        if handler is not signal.SIG_IGN and handler is not None:
            before[signum] = handler
            signal.signal(signum, ignore)

    def restore():
        for signum, handler in before.items():
            signal.signal(signum, handler)

    os.register_at_fork(after_in_child=restore)
    # What -m itself calls (CPython and PyPy); run_module is the public
    # near-equivalent should it ever go.
    as_main = getattr(runpy, '_run_module_as_main', None)
    if as_main is not None:
        as_main(module)
    else:
        runpy.run_module(module, run_name='__main__', alter_sys=True)


_bootstrap()
