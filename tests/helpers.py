"""Small helpers the tests share (importable: `tests/` is on pytest's pythonpath)."""

from __future__ import annotations

from models.generate import GenerationOptions
from models.sonar_codec import DecodeOptions

# Short sentences keep the suite fast; everything else is the reference default.
FAST_DECODE = DecodeOptions(max_tokens=40)


def fast_options(**kwargs: object) -> GenerationOptions:
    kwargs.setdefault("decode", FAST_DECODE)
    return GenerationOptions(**kwargs)  # type: ignore[arg-type]
