"""SONAR on plain PyTorch: asset cards, the NLLB tokenizer, the text encoder and decoder modules.

Nothing here imports fairseq2 or sonar-space: they are only the reference the tests compare
against (and the `fairseq2` backend of `models.sonar_codec`). Keep this file import-light.
"""
