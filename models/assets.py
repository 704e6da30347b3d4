"""fairseq2 asset-card directories: where SONAR encoder/decoder/tokenizer cards are found.

fairseq2 reads cards from its packages, `$FAIRSEQ2_ASSET_DIR` and `$FAIRSEQ2_USER_ASSET_DIR`.
A server is also given card folders on its command line (and the demo bundle has its own), so
those are registered when fairseq2 is initialised.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path

from models.libsndfile import ensure_libsndfile

_lock = threading.Lock()
_registered: set[Path] = set()


def ensure_asset_dirs(dirs: Iterable[Path | str] = ()) -> None:
    """Initialise fairseq2 with these extra card folders registered (idempotent).

    fairseq2 builds its asset store once per process, so a folder first seen after that point
    triggers a rebuild of fairseq2's dependency container (the store has no public way to grow).
    """
    ensure_libsndfile()
    import fairseq2
    import fairseq2.runtime.dependency as dependency
    from fairseq2.composition.assets import register_file_assets

    wanted = {Path(d).expanduser().resolve() for d in dirs}
    for d in wanted:
        if not d.is_dir():
            raise FileNotFoundError(f"asset card folder {d} does not exist")
    with _lock:
        initialised = dependency._resolver is not None
        if initialised and wanted <= _registered:
            return
        all_dirs = sorted(_registered | wanted)

        def extras(container: object) -> None:
            for d in all_dirs:
                register_file_assets(container, d)  # type: ignore[arg-type]

        if initialised:
            dependency._resolver = None
        fairseq2.init_fairseq2(extras=extras, no_progress=True)
        _registered.clear()
        _registered.update(all_dirs)
