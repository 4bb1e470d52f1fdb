# Run by ppserver at startup as `python -c <this> <module>...`: prints
# "<module> <version>" for the first candidate worker module that can be
# imported, the version being its top-level package's __version__ (what pp
# clients compare against), and on a second line the file the module is
# loaded from (for the access checks of users with a uid of their own).
# Prints nothing if none can be imported.
import importlib, importlib.util, sys
for mod in sys.argv[1:]:
    try:
        spec = importlib.util.find_spec(mod)
        if spec is None: continue
    except ImportError: continue
    pkg = importlib.import_module(mod.split('.')[0])
    sys.stdout.write(mod + ' ' + str(pkg.__version__) + '\n' + str(spec.origin or ''))
    break
