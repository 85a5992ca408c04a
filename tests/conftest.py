import atexit
import os
import shutil
import tempfile

# Compiled XLA programs are cached across test runs. The PRNG is the default one, as in production.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/anomax/jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("MPLBACKEND", "Agg")

# Generated datasets and preprocessed caches of a test run go to a home of its own, removed at the end:
# under ~/.cache, data an older generator wrote would be tested again (a synthetic dataset's folder
# is named by its arguments, not by the generator's code). The compilation cache above stays shared.
os.environ.setdefault("XDG_CONFIG_HOME", os.path.expanduser("~/.config"))  # pip's index settings stay the user's
_HOME = tempfile.mkdtemp(prefix="anomax-tests-home-")
os.environ["HOME"] = _HOME
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
