"""SONAR-LLM model layer: checkpoints, the network with its KV cache, the SONAR codec, generation.

Nothing here knows about HTTP or asyncio: plain batched tensor functions and loaders.
"""

from models.libsndfile import ensure_libsndfile

# fairseq2 (imported by sonar) needs libsndfile at import time; provide it before anything does.
ensure_libsndfile()
