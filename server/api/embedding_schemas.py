"""Wire formats of OpenAI's embeddings API (`POST /v1/embeddings`), as OpenAI defines them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from server.api.schemas import LangCode, Text

# As many texts as /embed takes in one request (the engine spreads them over iterations).
MAX_INPUTS = 1024
TOKEN_IDS = (
    "token ids are not accepted: send the text itself (this server tokenizes with SONAR's own "
    "tokenizer; LangChain's OpenAIEmbeddings sends text with check_embedding_ctx_length=False)"
)


def _is_token_ids(value: Any) -> bool:
    """An int, a list of ints, or a list of lists of ints: OpenAI's tokenized inputs."""
    if isinstance(value, int) and not isinstance(value, bool):
        return True
    if isinstance(value, list) and value:
        return all(_is_token_ids(v) for v in value)
    return False


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    input: Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_INPUTS)] = Field(
        description="a text, or a list of texts (one embedding each, in order); token ids are "
        "refused"
    )
    model: Text | None = None
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: each embedding's little-endian float32 bytes"
    )
    dimensions: int | None = Field(
        None, description="only the model's own width (GET /info: embed_dim) is accepted"
    )
    user: Text | None = None
    source_lang: LangCode = Field(
        "eng_Latn",
        description="(extra field) the texts' language, a SONAR/NLLB code (GET /v1/languages)",
    )

    @field_validator("input", mode="before")
    @classmethod
    def _no_token_ids(cls, value: Any) -> Any:
        if _is_token_ids(value):
            raise PydanticCustomError("token_ids_unsupported", TOKEN_IDS)
        return value


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 with encoding_format")


class EmbeddingsUsage(BaseModel):
    """SONAR tokenizer tokens of the input texts (with its language token and `</s>`)."""

    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingsUsage
