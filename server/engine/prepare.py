"""The input processor: where a request becomes work, every field checked once.

`InputProcessor.prepare(request)` does all input processing: the prompt split into sentences (a
text; a chat's turns, each split in order; or sentences already split, as given), "Begin of
text." (the model's config, unless the request says), the prompt cap, SONAR vectors from a
client (width, float32 range, finite, magnitude), languages, options, and the memory the work
needs at worst (never fitting is a GenerationError naming the field to lower). Nothing is
queued: `Engine.submit` (or `Engine.add`) queues what this returns. It runs on the caller's
thread (the API's is a worker thread, see `server.api.generation.submit_all`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from models.generate import prompt_sentences
from models.options import GenerationError, GenerationOptions, Prompt
from models.pipeline import SonarLLMPipeline
from models.sentences import split_sentences
from models.sonar_codec import UnknownLanguageError
from server.engine import memory
from server.engine.config import EngineConfig
from server.engine.metrics import EngineMetrics
from server.engine.request import (
    DecodeJob,
    DecodeRequest,
    EmbedJob,
    EmbedRequest,
    Generation,
    GenerationRequest,
    Request,
    Work,
)
from server.engine.runner import Runner
from server.engine.scheduler import Demand, NeverFits, Scheduler

# SONAR embeddings are mean-pooled outputs of a layer-normalised encoder: each value is of order
# 0.1 at most. 100 leaves three orders of magnitude for edited or interpolated vectors while
# keeping the decoder's activations far from overflow (its layer norms square them: fp16
# overflows near 256 per value over 1024 dimensions, fp32 near 1e19).
MAX_EMBEDDING_ABS = 100.0
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


class InputProcessor:
    """Requests → work items for one pipeline, scheduler and cache."""

    def __init__(
        self,
        pipe: SonarLLMPipeline,
        config: EngineConfig,
        scheduler: Scheduler[Work],
        runner: Runner,
        metrics: EngineMetrics,
    ) -> None:
        self.pipe = pipe
        self.config = config
        self.scheduler = scheduler
        self.runner = runner
        self.metrics = metrics

    @property
    def embed_dim(self) -> int:
        """The width of every SONAR vector the model reads and writes."""
        return self.pipe.codec.embed_dim

    def add_begin(self, opts: GenerationOptions | None = None) -> bool:
        """Whether the prompt starts with "Begin of text.": the request's say, else the model's."""
        if opts is None or opts.add_begin is None:
            return self.pipe.model.config.add_begin
        return opts.add_begin

    def prepare(self, request: Request) -> Work:
        """The work item for `request`, every field checked (GenerationError names a bad one);
        nothing is queued. Its events go to `work.emit`."""
        if request.timeout is not None and not request.timeout > 0:
            raise GenerationError("timeout", f"must be > 0 seconds, got {request.timeout}")
        common: dict[str, Any] = {
            "request_id": request.request_id,
            "priority": request.priority,
            "timeout": request.timeout,
        }
        if isinstance(request, GenerationRequest):
            return self._generation(request, common)
        if isinstance(request, EmbedRequest):
            self._check_lang("lang", request.lang)
            texts = list(request.texts)
            demand = Demand(texts=tuple(token_bound(t) for t in texts))
            return EmbedJob(**common, texts=texts, lang=request.lang, demand=demand)
        return self._decode(request, common)

    def sentences(
        self, prompt: Prompt | None, lang: str, add_begin: bool, given: int = 0, turns: bool = False
    ) -> list[str]:
        """The prompt's sentences as the model sees them: a text split, each of a chat's
        `turns` split in order, or a list already split taken as given; "Begin of text."
        first when `add_begin`. `given`: how many vectors follow (the text may then be empty)."""
        if turns and isinstance(prompt, list):
            prompt = [s for turn in prompt for s in split_sentences(turn, lang)]
        return prompt_sentences(prompt, lang, add_begin, given)

    def _generation(self, request: GenerationRequest, common: dict[str, Any]) -> Generation:
        opts = request.options
        given = request.prompt_embeddings
        if isinstance(given, list):
            given = self._from_rows("prompt_embeddings", given)
        n_given = 0 if given is None else int(given.shape[0])
        add_begin = self.add_begin(opts)
        sentences = self.sentences(
            request.prompt, opts.source_lang, add_begin, n_given, request.turns
        )
        count = len(sentences) + n_given
        if count > self.config.max_prompt_sentences:
            raise GenerationError(
                "prompt",
                f"has {count} sentences; this server accepts at most "
                f"{self.config.max_prompt_sentences}",
            )
        self.pipe.check_options(opts)
        if given is not None:
            given = self.vectors("prompt_embeddings", given)
        llm = self.runner.llm_pages(len(sentences) + n_given + opts.max_sentences)
        beam = opts.decode.beam_size if not opts.decode.sampling else 1
        decoder = self.runner.decoder_pages(beam, opts.decode.max_tokens)
        # A given vector costs no encoding (0 tokens): it joins the prefill as it is.
        costs = tuple(token_bound(s) for s in sentences) + (0,) * n_given
        demand = Demand(pages=llm + decoder, texts=costs)
        total = self.scheduler.total_pages
        if llm > total:
            field = "prompt"
        elif self.runner.decoder_pages(1, opts.decode.max_tokens) + llm > total:
            field = "max_tokens"
        else:
            field = "beam_size"
        self._check_fits(demand, field)
        return Generation(
            **common,
            request=request,
            sentences=sentences,
            given=given,
            add_begin=add_begin,
            demand=demand,
        )

    def _decode(self, request: DecodeRequest, common: dict[str, Any]) -> DecodeJob:
        emb = request.embeddings
        if isinstance(emb, list):
            emb = self._from_rows("embeddings", emb)
        self._check_lang("lang", request.lang)
        emb = self.vectors("embeddings", emb)
        o = request.options
        row_pages = self.runner.decoder_pages(1 if o.sampling else o.beam_size, o.max_tokens)
        demand = Demand(row_pages=row_pages, rows=int(emb.shape[0]))
        self._check_fits(demand, "beam_size")
        return DecodeJob(
            **common,
            embeddings=emb,
            lang=request.lang,
            options=o,
            demand=demand,
            results=[None] * int(emb.shape[0]),
        )

    def vectors(self, name: str, given: Tensor | list[list[float]]) -> Tensor:
        """SONAR vectors from a client as [N, D] fp32 on the CPU: rows of the model's width, of
        finite values of bounded size (GenerationError names the field, or its row)."""
        if not isinstance(given, Tensor):
            given = self._from_rows(name, given)
        dim = self.embed_dim
        if given.ndim != 2 or given.shape[1] != dim:
            raise GenerationError(
                name, f"must be rows of {dim} values, got shape {list(given.shape)}"
            )
        if not bool(torch.isfinite(given).all()):
            raise GenerationError(name, "must be finite numbers")
        largest = float(given.abs().max()) if given.numel() else 0.0
        if largest > MAX_EMBEDDING_ABS:
            raise GenerationError(
                name,
                f"has a value of magnitude {largest:.3g}; SONAR embeddings stay far below "
                f"{MAX_EMBEDDING_ABS:g} (values this large only overflow the decoder)",
            )
        return given.float().cpu()

    def _from_rows(self, name: str, rows: list[list[float]]) -> Tensor:
        """A client's rows as fp32: a row of the wrong width, or a value fp32 cannot hold (it
        would become infinite, not "not finite"), is named with its row."""
        dim = self.embed_dim
        for i, row in enumerate(rows):
            if len(row) != dim:
                raise GenerationError(
                    f"{name}.{i}", f"has {len(row)} values; the model's embeddings have {dim}"
                )
            for value in row:
                if abs(value) > FLOAT32_MAX and math.isfinite(value):
                    raise GenerationError(
                        f"{name}.{i}",
                        f"has the value {value:.3g}, beyond float32's range "
                        f"(±{FLOAT32_MAX:.3g}); SONAR embeddings' values are far smaller",
                    )
        return torch.tensor(rows, dtype=torch.float32)

    def _check_lang(self, field: str, lang: str) -> None:
        try:
            self.pipe.codec.check_lang(lang)
        except UnknownLanguageError as e:
            raise GenerationError(field, str(e)) from None

    def _check_fits(self, demand: Demand, field: str) -> None:
        try:
            self.scheduler.check(demand, field)
        except NeverFits as e:
            self.metrics.rejected.labels("too_large").inc()
            blocks = self.scheduler.blocks
            page = blocks.page_bytes
            need = (
                f"each row needs up to {memory.format_bytes(demand.row_pages * page)}"
                if demand.rows
                else f"this request needs up to {memory.format_bytes(demand.pages * page)}"
            )
            raise GenerationError(
                e.field,
                f"{need} of cache memory at worst; the server's cache memory is "
                f"{memory.format_bytes(blocks.capacity_bytes)}: lower {e.field}",
            ) from None


def token_bound(text: str) -> int:
    """At most this many tokens: SentencePiece pieces cover at least one byte (byte fallback),
    plus the language token and `</s>`."""
    return len(text.encode("utf-8", errors="surrogatepass")) + 2
