"""The one error type for a bad request field, shared by every layer that validates options."""

from __future__ import annotations


class GenerationError(ValueError):
    """A request that cannot be generated (bad field); the message names the field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.reason = message
