import os

# Compiled XLA programs are cached across test runs; rbg keys compile faster on CPU.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/anomax/jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_DEFAULT_PRNG_IMPL", "rbg")
os.environ.setdefault("MPLBACKEND", "Agg")
