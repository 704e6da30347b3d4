"""Wire formats: the native API and the OpenAI-compatible subset (pydantic, nothing else)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

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

LANG_PATTERN = r"^[a-z]{3}_[A-Z][a-z]{3}$"
# A SONAR/NLLB language code, e.g. eng_Latn: Text with the pattern inside the annotation, so the
# published schema keeps the pattern when the field is optional.
LangCode = Annotated[str, Field(pattern=LANG_PATTERN), BeforeValidator(_valid_unicode)]
FinishReasonOut = Literal["stop", "length", "cancelled", "timeout", "error"]


class GenerationFields(BaseModel):
    """Generation settings shared by /generate, /summarize and (as extras) the OpenAI routes."""

    model_config = ConfigDict(extra="forbid")

    max_sentences: int | None = Field(
        None, ge=1, description="new sentences at most (default 8; /summarize: num_sentences)"
    )
    eos_threshold: float = Field(
        0.98, ge=-1, le=1, description="stop when cos(sentence, eos_text) reaches this"
    )
    eos_text: Text = Field("End of sequence.", min_length=1, max_length=1000)
    source_lang: LangCode = "eng_Latn"
    target_lang: LangCode = "eng_Latn"
    beam_size: int = Field(5, ge=1, le=32, description="SONAR decoder beam size")
    max_tokens: int = Field(256, ge=3, le=512, description="token bound per decoded sentence")
    temperature: float = Field(
        0.0, ge=0, le=10, description="decoder token temperature; 0 = beam search"
    )
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling (temperature>0)")
    top_k: int | None = Field(None, ge=1, le=100_000, description="top-k sampling")
    latent_temperature: float = Field(
        0.0, ge=0, le=10, description="noise on the predicted embedding (HF wrapper)"
    )
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="makes sampling reproducible")
    timeout: float | None = Field(None, gt=0, le=86_400, description="deadline in seconds")
    return_embeddings: bool = Field(False, description="include each sentence's embedding")
    stream: bool = Field(False, description="answer with Server-Sent Events")


class GenerateRequest(GenerationFields):
    prompt: Text = Field(min_length=1, description="text to continue; split into sentences")


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


# ----- SONAR as a service -----------------------------------------------------------------
class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[Text] = Field(min_length=1, max_length=1024)
    lang: LangCode = "eng_Latn"


class EmbedResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    dim: int
    embeddings: list[list[float]]


class DecodeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    embeddings: list[list[float]] = Field(min_length=1, max_length=256)
    lang: LangCode = "eng_Latn"
    beam_size: int = Field(5, ge=1, le=32)
    max_tokens: int = Field(256, ge=3, le=512)


class DecodeResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    texts: list[str]
    decoded_tokens: int


# ----- OpenAI-compatible ------------------------------------------------------------------
class OpenAIExtras(BaseModel):
    """OpenAI fields we honour, plus this server's generation fields as extras."""

    model_config = ConfigDict(extra="allow")

    model: Text | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="only one choice per request")
    max_tokens: int | None = Field(None, ge=3, le=512, description="token bound per sentence")
    max_completion_tokens: int | None = Field(None, ge=3, le=512)
    temperature: float | None = Field(None, ge=0, le=10, description="decoder token temperature")
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    user: Text | None = None
    # SONAR-LLM extras
    max_sentences: int | None = Field(None, ge=1)
    eos_threshold: float | None = Field(None, ge=-1, le=1)
    eos_text: Text | None = Field(None, min_length=1, max_length=1000)
    source_lang: LangCode | None = None
    target_lang: LangCode | None = None
    beam_size: int | None = Field(None, ge=1, le=32)
    top_k: int | None = Field(None, ge=1, le=100_000)
    latent_temperature: float | None = Field(None, ge=0, le=10)
    timeout: float | None = Field(None, gt=0, le=86_400)


class CompletionRequest(OpenAIExtras):
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=1)] = Field(
        description="one prompt (a list must hold exactly one)"
    )


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Text
    text: Text | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
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
    config: dict[str, Any]
    sonar: dict[str, str]
    limits: dict[str, Any]
    encoder_cache: dict[str, int]
    cache_memory: CacheMemory
    replica: str | None = Field(
        None, description="the Ray Serve replica that answered (X-Replica-Id); null outside Ray"
    )
