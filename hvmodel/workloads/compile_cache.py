"""Where numba keeps the compiled generators: once per machine and code version.

numba caches compiled code on disk, but it only checks the source file of the function it is
asked to run, not the files of the functions that one calls; so the cache lives in a directory
named after a digest of every hvmodel source file (and the numba version and code flags): an
edit anywhere in the model compiles afresh, an unchanged checkout never compiles twice. The root
is $HVBENCH_CACHE_DIR, else $XDG_CACHE_HOME/hvbench, else ~/.cache/hvbench. Import this module
before defining any @njit(cache=True) function.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numba

HVMODEL = Path(__file__).resolve().parent.parent


def source_digest() -> str:
    h = hashlib.sha256(f"{numba.__version__} {numba.config.BOUNDSCHECK} {numba.config.OPT}".encode())  # flags change the code
    for path in sorted(HVMODEL.rglob("*.py")):
        h.update(str(path.relative_to(HVMODEL)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    root = os.environ.get("HVBENCH_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hvbench"
    return Path(root) / f"numba-{source_digest()}"


CACHE_DIR = cache_dir()
# Read by numba when a cache=True function is defined, so set before any of ours is.
numba.config.CACHE_DIR = str(CACHE_DIR)
