"""The digest of the compiled engine's C++ sources: built into the extension (setup.py) and
checked when it is imported, so an engine built from other sources is never used silently."""

from __future__ import annotations

import hashlib
from pathlib import Path

SRC = Path(__file__).resolve().parent / "src"


def source_digest() -> str:
    h = hashlib.sha256()
    for path in sorted(SRC.rglob("*")):
        if path.suffix in (".h", ".cpp"):
            h.update(str(path.relative_to(SRC)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]
