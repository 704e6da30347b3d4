"""Wire formats: the native API and the OpenAI-compatible subset (pydantic, nothing else)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    create_model,
    field_validator,
)
from pydantic_core import PydanticCustomError

from models.options import LANG_PATTERN, OPTIONS, Option

# The error code of text that is not valid Unicode; pydantic's own, which it gives for the same
# input wherever it checks the text itself (a `pattern`, an object key).
INVALID_TEXT = "string_unicode"


def _valid_unicode(value: Any) -> Any:
    """Refuse text that has no UTF-8 form: lone surrogates, which JSON's `\\udXXX` escapes allow.

    Python keeps them in a str, but the SONAR tokenizer (C++) cannot take them, and a batch that
    holds one fails as a whole. NUL and other control characters encode fine: they pass.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise PydanticCustomError(
                INVALID_TEXT,
                "contains a lone surrogate ({char}) at position {position}: "
                "text must be valid Unicode",
                {"char": f"\\u{ord(value[e.start]):04x}", "position": e.start},
            ) from None
    return value


# Every text field of a request uses Text (tests/server/test_edges.py checks it): checked before
# any other constraint, so the message says what is wrong whichever field it is.
Text = Annotated[str, BeforeValidator(_valid_unicode)]

# The constraint inside the annotation, so pydantic checks it as a string (string_too_short).
NonEmptyText = Annotated[str, Field(min_length=1), BeforeValidator(_valid_unicode)]

# A SONAR/NLLB language code, e.g. eng_Latn: Text with the pattern inside the annotation, so the
# published schema keeps the pattern when the field is optional.
LangCode = Annotated[str, Field(pattern=LANG_PATTERN), BeforeValidator(_valid_unicode)]
FinishReasonOut = Literal["stop", "length", "cancelled", "timeout", "error", "repetition"]


def _option_type(o: Option) -> Any:
    """The wire type of one generation option, with its bounds (strings are Text)."""
    if o.type is str:
        text = Annotated[str, Field(**o.bounds()), BeforeValidator(_valid_unicode)]
        if o.many:
            return text | Annotated[list[text], Field(max_length=o.max_items)]  # type: ignore[valid-type]
        return text
    return Annotated[o.type, Field(**o.bounds())]


def _option_fields(openai: bool) -> dict[str, Any]:
    """pydantic fields for `OPTIONS`: native ones with their defaults, OpenAI extras optional."""
    out: dict[str, Any] = {}
    for o in OPTIONS:
        typ = _option_type(o)
        if openai or o.default is None or o.name == "max_sentences":
            default: Any = None
            typ = typ | None
        else:
            default = list(o.default) if isinstance(o.default, tuple) else o.default
        extra = " (default 8; /summarize: num_sentences)" if o.name == "max_sentences" else ""
        out[o.name] = (typ, Field(default, description=o.description + extra))
    return out


class _Options(BaseModel):
    """A request carrying generation options (made from `models.options.OPTIONS`)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    def option_values(self) -> dict[str, Any]:
        """The options as flat values (None: not given), for `GenerationOptions.from_values`."""
        return {o.name: getattr(self, o.name, None) for o in OPTIONS}


class _NativeOptions(_Options):
    timeout: float | None = Field(
        None,
        gt=0,
        le=86_400,
        description="deadline in seconds, queue time included; the server's request_timeout "
        "caps it",
    )
    return_embeddings: bool = Field(False, description="include each sentence's embedding")
    stream: bool | None = Field(
        None,
        description="answer with Server-Sent Events; when absent, `Accept: text/event-stream` "
        "asks for them",
    )


if TYPE_CHECKING:
    GenerationFields = _NativeOptions
else:
    GenerationFields = create_model(
        "GenerationFields",
        __base__=_NativeOptions,
        __doc__="Generation settings shared by /generate and /summarize.",
        **_option_fields(openai=False),
    )


class GenerateRequest(GenerationFields):
    prompt: NonEmptyText | Annotated[list[NonEmptyText], Field(min_length=1)] | None = Field(
        None,
        description="text to continue, split into sentences; or a list of turns (a chat), "
        "each split into sentences, in order (required unless prompt_embeddings is given)",
    )
    prompt_embeddings: Annotated[list[list[float]], Field(min_length=1, max_length=1024)] | None = (
        Field(
            None,
            description="SONAR vectors (e.g. from /embed, or made elsewhere) that follow the "
            "prompt's sentences, or are the whole prompt: the model sees them as it sees encoded "
            "sentences; checked like /decode's embeddings",
        )
    )


class SummarizeRequest(GenerationFields):
    document: Text = Field(min_length=1)
    num_sentences: int = Field(1, ge=1, le=64, description="sentences in the summary")
    instruction: Text | None = Field(
        None,
        min_length=1,
        max_length=1000,
        description='default: "Text summarization in N sentence(s) only."',
    )


class Usage(BaseModel):
    prompt_sentences: int
    generated_sentences: int
    decoded_tokens: int
    queue_time: float
    time_to_first_sentence: float | None
    total_time: float


class SentenceOut(BaseModel):
    id: str
    index: int
    text: str
    num_tokens: int
    embedding: list[float] | None = None


class GenerateResponse(BaseModel):
    id: str
    object: Literal["generation"] = "generation"
    model: str
    sentences: list[str]
    text: str
    finish_reason: FinishReasonOut
    usage: Usage
    embeddings: list[list[float]] | None = None
    prompt_sentences: list[str] | None = Field(
        None, description="with return_embeddings: the prompt as the model saw it, split"
    )


# ----- SONAR as a service -----------------------------------------------------------------
# POST /embed's body (the engine's work is `server.engine.EmbedRequest`).
class EmbedBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    texts: list[Text] = Field(min_length=1, max_length=1024)
    lang: LangCode = "eng_Latn"


class EmbedResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    dim: int
    embeddings: list[list[float]]


# POST /decode's body (the engine's work is `server.engine.DecodeRequest`).
class DecodeBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    embeddings: list[list[float]] = Field(min_length=1, max_length=256)
    lang: LangCode = "eng_Latn"
    beam_size: int = Field(5, ge=1, le=32)
    max_tokens: int = Field(256, ge=3, le=512)


class SegmentRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    text: NonEmptyText = Field(description="text to split as /generate splits a prompt")
    lang: LangCode = Field("eng_Latn", description="the text's language (SONAR/NLLB code)")


class SegmentResponse(BaseModel):
    sentences: list[str] = Field(
        description='the sentences /generate would encode ("Begin of text." first when the '
        "model's config has add_begin): its usage.prompt_sentences counts them"
    )
    splitter: Literal["punkt_tab", "fallback"] = Field(
        description="nltk's trained punkt_tab model, or the built-in fallback parameters"
    )


class Language(BaseModel):
    code: str = Field(description="NLLB code (FLORES-200), e.g. eng_Latn")
    name: str = Field(description="English name")


class LanguagesResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Language]


class DecodeResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    texts: list[str]
    decoded_tokens: int


# ----- OpenAI-compatible ------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = Field(False, description="a last chunk with usage and no choices")


UNSUPPORTED = "unsupported_parameter"


# OpenAI fields with no meaning for a sentence-level model (yet): accepted only at their no-op
# values, else a 400 naming them.
_NO_OP: dict[str, tuple[list[Any], str]] = {
    "logprobs": ([False, 0], "logprobs"),
    "top_logprobs": ([0], "top_logprobs"),
    "tools": ([[]], "tools (function calling)"),
    "tool_choice": (["none"], "tool_choice"),
    "functions": ([[]], "functions (function calling)"),
    "function_call": (["none"], "function_call"),
    "parallel_tool_calls": ([False], "parallel_tool_calls"),
    "response_format": ([{"type": "text"}], "response_format (JSON modes)"),
    "presence_penalty": ([0], "presence_penalty"),
    "frequency_penalty": ([0], "frequency_penalty"),
    "logit_bias": ([{}], "logit_bias"),
    "echo": ([False], "echo"),
    "best_of": ([1], "best_of"),
    "suffix": ([""], "suffix"),
    "store": ([False], "store (stored completions)"),
}


def _same(value: Any, neutral: Any) -> bool:
    """Equal, with booleans kept apart from numbers (JSON's false is not 0)."""
    if isinstance(value, bool) or isinstance(neutral, bool):
        return value is neutral
    return bool(value == neutral)


class _Unsupported(BaseModel):
    """See `_NO_OP`."""

    logprobs: Any = None
    top_logprobs: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None
    echo: Any = None
    best_of: Any = None
    suffix: Any = None
    store: Any = None

    @field_validator(*_NO_OP)
    @classmethod
    def _refuse(cls, value: Any, info: ValidationInfo) -> Any:
        neutral, what = _NO_OP[str(info.field_name)]
        if value is not None and not any(_same(value, n) for n in neutral):
            raise PydanticCustomError(
                UNSUPPORTED, "{what} is not supported by this server", {"what": what}
            )
        return value


class _OpenAIBase(_Options, _Unsupported):
    """OpenAI fields this server honours (unknown or unsupported ones are a 400 naming them);
    the generation options are accepted as extra body fields."""

    model: Text | None = None
    stream: bool = False
    stream_options: StreamOptions | None = Field(None, description="only with stream: true")
    metadata: dict[Text, Text] | None = Field(
        None, description="accepted and ignored (OpenAI's tags for stored completions)"
    )
    n: int = Field(1, ge=1, le=16, description="independent choices per prompt")
    max_completion_tokens: int | None = Field(
        None, ge=3, le=512, description="the same as max_tokens"
    )
    user: Text | None = None
    timeout: float | None = Field(
        None, gt=0, le=86_400, description="deadline in seconds; request_timeout caps it"
    )

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and not info.data.get("stream"):
            raise PydanticCustomError(
                "invalid_value", "stream_options is only allowed when stream is true"
            )
        return value


if TYPE_CHECKING:
    OpenAIExtras = _OpenAIBase
else:
    OpenAIExtras = create_model("OpenAIExtras", __base__=_OpenAIBase, **_option_fields(openai=True))


class CompletionRequest(OpenAIExtras):
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=16)] = Field(
        description="a prompt, or several: one choice (n choices) per prompt, in order"
    )


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Text
    text: Text | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None


class ChatCompletionRequest(OpenAIExtras):
    messages: list[ChatMessage] = Field(min_length=1)


class OpenAIUsage(BaseModel):
    """Counts are sentences (the model's unit); `decoded_tokens` are SONAR decoder tokens."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    decoded_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: OpenAIUsage | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: OpenAIUsage


# ----- OpenAI stream chunks (`data: {chunk}` lines, then `data: [DONE]`) ---------------------
class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: OpenAIUsage | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: OpenAIUsage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sonar-llm-server"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ----- health and info --------------------------------------------------------------------
class Health(BaseModel):
    status: Literal["ok", "loading", "warming", "draining", "failed"]
    detail: str | None = None


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class CacheMemory(BaseModel):
    """The one budget the SONAR-LLM KV cache and the SONAR decoder's cache share."""

    limit_bytes: int
    page_bytes: int
    pages: int
    allocated_bytes: dict[str, int] = Field(description="per cache: llm, decoder")


class Info(BaseModel):
    model: str
    version: str
    demo: bool
    checkpoint_format: str
    device: str
    dtype: str
    embed_dim: int
    splitter: Literal["punkt_tab", "fallback"] = Field(
        description="the sentence splitter in use for English (see POST /segment)"
    )
    config: dict[str, Any]
    sonar: dict[str, str]
    limits: dict[str, Any]
    encoder_cache: dict[str, int]
    cache_memory: CacheMemory
    replica: str | None = Field(
        None, description="the Ray Serve replica that answered (X-Replica-Id); null outside Ray"
    )
