"""Session settings: the tests never read or write the user's persistent compilation cache (`amskv_jax.compile_cache`;
the tests of the cache itself point it at a temporary directory)."""
import os

from amskv_jax.compile_cache import DISABLE_ENV

os.environ[DISABLE_ENV] = "1"
