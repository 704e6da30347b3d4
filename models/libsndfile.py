"""Make `libsndfile.so.1` loadable before fairseq2 is imported.

`import fairseq2` dlopens `libsndfile.so.1` and fails without it. The `soundfile` wheel ships a
copy, so preloading it (RTLD_GLOBAL, matched by its SONAME) removes the need for a system package.
A system copy, when present, is used as is.
"""

from __future__ import annotations

import ctypes
import importlib.util
import sys
from pathlib import Path

_loaded = False


def ensure_libsndfile() -> None:
    """Load a libsndfile the dynamic linker can hand to fairseq2n; idempotent."""
    global _loaded
    if _loaded:
        return
    name = "libsndfile.1.dylib" if sys.platform == "darwin" else "libsndfile.so.1"
    try:
        ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        spec = importlib.util.find_spec("_soundfile_data")
        if spec is None or spec.origin is None:
            raise OSError(
                "libsndfile is missing: install the 'soundfile' wheel or the system package "
                "libsndfile1"
            ) from None
        folder = Path(spec.origin).parent
        candidates = sorted(folder.glob("libsndfile*"))
        if not candidates:
            raise OSError(f"no libsndfile in {folder}") from None
        ctypes.CDLL(str(candidates[0]), mode=ctypes.RTLD_GLOBAL)
    _loaded = True
