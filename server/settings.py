"""Server configuration: one object, from flags and `SONAR_LLM_<NAME>` environment variables.

Flags win over the environment; the environment wins over defaults. List settings (`api_key`,
`cors_origin`, `asset_dir`) take comma-separated values from the environment.
"""

from __future__ import annotations

import argparse
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from models.punkt_data import NLTK_INDEX_URL
from models.sonar_codec import DEFAULT_BACKEND, DEFAULT_DECODER, DEFAULT_ENCODER, SonarBackend
from server.engine.config import EngineConfig
from server.engine.memory import parse_bytes

# The engine's defaults, written once (in the engine's config) and read here.
_ENGINE = EngineConfig()

CommaList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SONAR_LLM_", extra="forbid")

    # model
    model: str | None = Field(
        None,
        description="checkpoint dir, HF repo id, training .pt or bundle dir; default: the "
        "random-weight demo bundle (its output is gibberish)",
    )
    config: str | None = Field(None, description="SonarLLM_*.json for a training .pt")
    encoder: str | None = Field(
        None, description=f"SONAR encoder asset card (default {DEFAULT_ENCODER})"
    )
    decoder: str | None = Field(
        None, description=f"SONAR decoder asset card (default {DEFAULT_DECODER})"
    )
    tokenizer: str | None = Field(
        None, description="SONAR tokenizer asset card (default: the encoder's card)"
    )
    asset_dir: CommaList = Field(
        default_factory=list, description="extra fairseq2 asset-card folders"
    )
    device: str | None = Field(None, description="cuda, cuda:N or cpu (default: cuda if present)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="float32, bfloat16 or float16 (SONAR-LLM and SONAR)"
    )
    sonar_backend: SonarBackend = Field(
        DEFAULT_BACKEND,
        description="what loads and runs SONAR: native (plain PyTorch, no fairseq2) or fairseq2 "
        "(its loaders and encoder pipeline; needs the fairseq2 extra)",
    )
    punkt_url: str = Field(
        NLTK_INDEX_URL,
        description="nltk data index that punkt_tab (Punkt sentence splitting) is fetched from, "
        "once, into the cache folder when it is not installed; empty: never fetch",
    )
    # HTTP
    host: str = Field(
        "127.0.0.1", description="listen address (0.0.0.0: every interface; the Docker image's)"
    )
    port: int = Field(8000, ge=0, le=65535, description="listen port")
    api_key: CommaList = Field(
        default_factory=list,
        description="accepted API keys (Authorization: Bearer KEY, or X-API-Key); none: the API "
        "is open",
    )
    cors_origin: CommaList = Field(default_factory=list, description="allowed CORS origins")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="largest request body")
    read_timeout: float = Field(
        30.0,
        gt=0,
        description="seconds a client has to send complete request headers, and the longest "
        "pause in a request body; then 408 and the connection closes",
    )
    body_timeout: float = Field(
        60.0,
        gt=0,
        description="seconds a client has to send a whole request body, from the end of its "
        "headers, however steadily it trickles; then 408 and the connection closes",
    )
    max_connections: int | None = Field(
        None,
        ge=1,
        description="open client connections; beyond them new ones get 503 (a small reserve "
        "may still reach /health/); default: 1024, fewer if the open-file limit is lower",
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="text, or json: one object a line, with its request_id"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="debug, info, warning or error"
    )
    # engine and limits
    max_running: int = Field(
        _ENGINE.max_running, ge=1, description="requests (and SONAR jobs) run together"
    )
    max_waiting: int = Field(
        _ENGINE.max_waiting, ge=0, description="requests queued beyond max_running; more get 503"
    )
    max_prefill_sentences: int = Field(
        _ENGINE.max_prefill_sentences,
        ge=1,
        description="prompt sentences and /embed texts encoded per iteration",
    )
    max_encode_tokens: int = Field(
        _ENGINE.max_encode_tokens,
        ge=1,
        description="their tokens per iteration, counted as UTF-8 bytes + 2 (an upper bound); a "
        "long prompt or /embed spreads over several",
    )
    cache_memory: int | None = Field(
        None,
        ge=1,
        description="bytes for the SONAR-LLM KV cache and the SONAR decoder's cache together "
        "(suffixes KiB, MiB, GiB); default: 70%% of the GPU memory free after loading, or 50%% "
        "of the available RAM on a CPU",
    )
    encoder_cache_size: int = Field(
        _ENGINE.encoder_cache_size, ge=0, description="cached (sentence, language) embeddings"
    )
    request_timeout: float | None = Field(
        300.0,
        gt=0,
        description="deadline per request, seconds, queue time included; a request's own "
        "timeout can only shorten it",
    )
    max_sentences_limit: int = Field(256, ge=1, description="largest max_sentences accepted")
    max_prompt_sentences: int = Field(
        _ENGINE.max_prompt_sentences, ge=1, description="largest prompt, in sentences"
    )
    keepalive_interval: float = Field(
        15.0, gt=0, description="SSE `: ping` interval while nothing else is sent, seconds"
    )
    shutdown_grace: float = Field(
        30.0,
        ge=0,
        description="after SIGTERM: readiness answers 503, in-flight requests get this many "
        "seconds to finish, then the server exits 0",
    )
    warmup: bool = Field(True, description="run one generation before reporting ready")

    @field_validator("cache_memory", mode="before")
    @classmethod
    def _parse_size(cls, value: Any) -> Any:
        if isinstance(value, str):
            return parse_bytes(value)
        return value

    @field_validator("api_key", "cors_origin", "asset_dir", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value


# Where the model comes from: shared by `sonar-llm serve`, `generate` and `download`.
MODEL_SETTINGS = (
    "model",
    "config",
    "encoder",
    "decoder",
    "tokenizer",
    "asset_dir",
    "device",
    "dtype",
    "sonar_backend",
    "punkt_url",
)


def add_serve_args(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    names: tuple[str, ...] | None = None,
) -> None:
    """One flag per setting (`--max-running` for `max_running`), or per setting in `names`;
    unset flags defer to the environment."""
    for name, field in Settings.model_fields.items():
        if names is not None and name not in names:
            continue
        flag = "--" + name.replace("_", "-")
        kwargs: dict[str, Any] = {"default": None, "dest": name, "help": field.description}
        if field.annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif name in ("api_key", "cors_origin", "asset_dir"):
            kwargs["action"] = "append"
        parser.add_argument(flag, **kwargs)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings with the flags that were given overriding the environment."""
    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    return Settings(**given)


def engine_config(settings: Settings) -> EngineConfig:
    """The engine's limits from the settings (the server's and the offline `LLM`'s)."""
    return EngineConfig(
        max_running=settings.max_running,
        max_waiting=settings.max_waiting,
        max_prefill_sentences=settings.max_prefill_sentences,
        max_encode_tokens=settings.max_encode_tokens,
        cache_memory=settings.cache_memory,
        encoder_cache_size=settings.encoder_cache_size,
        max_prompt_sentences=settings.max_prompt_sentences,
    )
