"""SONAR-LLM model layer: checkpoints, the network with its KV cache, the SONAR codec, generation.

Nothing here knows about HTTP or asyncio: plain batched tensor functions and loaders. Nothing here
imports fairseq2 unless the fairseq2 SONAR backend is chosen (`models.sonar.fairseq2_backend`).
"""
