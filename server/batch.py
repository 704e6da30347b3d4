"""`sonar-llm batch IN.jsonl OUT.jsonl`: OpenAI's batch files, run offline through the engine.

Each input line is `{"custom_id", "method": "POST", "url", "body"}` for `/v1/completions`,
`/v1/chat/completions` or `/v1/embeddings`; each output line is
`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`, written (and
flushed) as its request finishes, so in finishing order. Bodies go through the same functions as
the server's routes (`server.api.openai_work`): the same answers, the same 400s. A line that is
no request at all (not JSON, no custom_id, a custom_id seen before, another method or url) gets
`response: null` and an `error` naming what is wrong; the others go on.

Every request runs through one offline `LLM`, so they batch as the server's do, within its
cache memory. A rerun with the same files resumes: output line ids carry the input line number
(`batch_req_<n>`), lines already in OUT are skipped, and a line cut short by a kill is dropped.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel, ValidationError

from models.options import GenerationError, Prompt
from server.api import openai_work as oa
from server.api.embedding_schemas import EmbeddingsRequest
from server.api.errors import APIError, from_exception, validation_error
from server.api.schemas import ChatCompletionRequest, CompletionRequest
from server.engine import LLM, EmbedRequest, FinalEvent, GenerationRequest
from server.settings import Settings

ENDPOINTS: dict[str, type[BaseModel]] = {
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/embeddings": EmbeddingsRequest,
}
Job = GenerationRequest | EmbedRequest


class LineError(Exception):
    """An input line that is no request: answered with `error`, no response."""

    def __init__(self, code: str, message: str, custom_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.custom_id = custom_id  # when the line has one of its own (not a duplicate)


@dataclass
class Line:
    """One input request on its way through the engine."""

    number: int  # 1-based line number in IN
    custom_id: str
    url: str
    body: Any
    served: oa.Served
    jobs: list[Job]
    finals: list[FinalEvent | None] = field(default_factory=list)
    error: Exception | None = None
    left: int = 0


@dataclass
class Counts:
    total: int = 0  # request lines in IN (blank lines are none)
    skipped: int = 0  # already in OUT
    written: int = 0
    errors: int = 0  # of the written, those that are not a 200


def output_line(
    number: int,
    custom_id: str | None,
    status: int | None,
    body: dict[str, Any] | None,
    request_id: str | None = None,
    error: LineError | None = None,
) -> dict[str, Any]:
    response = None
    if status is not None:
        response = {"status_code": status, "request_id": request_id, "body": body}
    return {
        "id": f"batch_req_{number}",
        "custom_id": custom_id,
        "response": response,
        "error": None if error is None else {"code": error.code, "message": error.message},
    }


def resume(out: Path) -> dict[int, str | None]:
    """The input lines OUT already answers (line number → custom_id). A last line cut short
    by a kill is dropped from the file."""
    done: dict[int, str | None] = {}
    if not out.exists():
        return done
    with out.open("r+b") as f:
        offset = 0
        for k, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):  # torn: written only in part
                f.truncate(offset)
                break
            offset += len(raw)
            try:
                row = json.loads(raw)
                number = int(str(row["id"]).removeprefix("batch_req_"))
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{out} line {k} is not a `sonar-llm batch` output line") from None
            done[number] = row.get("custom_id")
    return done


def parse(raw: bytes, seen: set[str]) -> tuple[str, str, Any]:
    """(custom_id, url, body) of a line; LineError when it is no request."""
    try:
        row = json.loads(raw)
    except ValueError as e:
        raise LineError("invalid_json", f"the line is not JSON: {e}") from None
    if not isinstance(row, dict):
        raise LineError("invalid_line", "the line must be a JSON object")
    custom_id = row.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise LineError("missing_custom_id", "custom_id must be a non-empty string")
    if custom_id in seen:
        raise LineError("duplicate_custom_id", f"custom_id {custom_id!r} was on an earlier line")
    seen.add(custom_id)
    if row.get("method", "POST") != "POST":
        message = f"method must be POST, got {row.get('method')!r}"
        raise LineError("invalid_method", message, custom_id)
    url = row.get("url")
    if url not in ENDPOINTS:
        message = f"url must be one of {', '.join(ENDPOINTS)}, got {url!r}"
        raise LineError("invalid_url", message, custom_id)
    return custom_id, url, row.get("body")


def jobs_for(served: oa.Served, url: str, raw_body: Any) -> tuple[Any, list[Job]]:
    """The validated body and its engine requests, as the route would make them."""
    try:
        body = ENDPOINTS[url].model_validate(raw_body)
    except ValidationError as e:
        errors = [{**err, "loc": ("body", *err["loc"])} for err in e.errors()]
        if raw_body is None:
            errors = [{"type": "missing", "loc": ("body",), "msg": "Field required"}]
        raise validation_error(errors) from None
    if isinstance(body, CompletionRequest):
        return body, list(oa.choice_requests(served, body, oa.completion_prompts(body)))
    if isinstance(body, ChatCompletionRequest):
        turns: list[Prompt] = [oa.chat_prompt(body)]
        return body, list(oa.choice_requests(served, body, turns, turns=True))
    assert isinstance(body, EmbeddingsRequest)
    return body, [oa.embed_request(served, body)]


def response_body(line: Line) -> dict[str, Any]:
    """The answer the route gives for the line's finished requests (APIError when it fails)."""
    if line.error is not None:
        raise line.error
    finals = [f for f in line.finals if f is not None]
    body, served = line.body, line.served
    if isinstance(body, CompletionRequest):
        return oa.completion_response(served, body, finals).model_dump()
    if isinstance(body, ChatCompletionRequest):
        return oa.chat_response(served, body, finals).model_dump()
    job = line.jobs[0]
    assert isinstance(job, EmbedRequest)
    tokens = oa.count_tokens(served.engine.pipe.codec.tokenizer, job.texts, job.lang)
    return oa.embeddings_response(served, body, finals[0], tokens).model_dump()


class Writer:
    """OUT, appended and flushed a line at a time; counts and the progress line."""

    def __init__(
        self, f: IO[str], counts: Counts, progress: Callable[[Counts], None] | None
    ) -> None:
        self.f, self.counts, self.progress = f, counts, progress

    def write(self, row: dict[str, Any]) -> None:
        self.f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.f.flush()
        self.counts.written += 1
        response = row["response"]
        if response is None or response["status_code"] != 200:
            self.counts.errors += 1
        if self.progress is not None:
            self.progress(self.counts)

    def answer(self, line: Line) -> None:
        try:
            status, body = 200, response_body(line)
        except (APIError, GenerationError) as e:
            err = from_exception(e)
            status, body = err.status, err.body()
        self.write(output_line(line.number, line.custom_id, status, body, line.served.request_id))


def run_batch(
    llm: LLM,
    settings: Settings,
    model_name: str,
    src: Path,
    dst: Path,
    progress: Callable[[Counts], None] | None = None,
) -> Counts:
    """Answer every line of `src` not yet in `dst`, appending to `dst`."""
    done = resume(dst)
    with src.open("rb") as f:
        counts = Counts(total=sum(1 for raw in f if raw.strip()))
    counts.skipped = counts.written = len(done)
    with dst.open("a", encoding="utf-8") as f:
        writer = Writer(f, counts, progress)
        owners: dict[int, tuple[Line, int]] = {}
        for out in llm.run(_requests(llm, settings, model_name, src, done, writer, owners)):
            line, k = owners.pop(out.index)
            if out.error is not None:
                line.error = out.error
            else:
                line.finals[k] = out.final
            line.left -= 1
            if line.left == 0:
                writer.answer(line)
    return counts


def _requests(
    llm: LLM,
    settings: Settings,
    model_name: str,
    src: Path,
    done: dict[int, str | None],
    writer: Writer,
    owners: dict[int, tuple[Line, int]],
) -> Iterator[Job]:
    """The engine requests of the lines still to answer, in order (read as the engine has
    room); lines that are no request, or that a route would refuse, are answered at once."""
    seen: set[str] = set()
    index = 0
    with src.open("rb") as f:  # json reads UTF-8 bytes; a line that is not is an invalid line
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                custom_id, url, raw_body = parse(raw, seen)
            except LineError as e:
                if number not in done:
                    writer.write(output_line(number, e.custom_id, None, None, error=e))
                continue
            if number in done:
                if done[number] != custom_id:
                    raise ValueError(
                        f"the output for input line {number} has custom_id {done[number]!r}, "
                        f"the input {custom_id!r}: the output file belongs to another input"
                    )
                continue
            served = oa.Served(settings, llm.engine, model_name, uuid.uuid4().hex)
            try:
                body, jobs = jobs_for(served, url, raw_body)
            except (APIError, GenerationError) as e:
                err = from_exception(e)
                writer.write(
                    output_line(number, custom_id, err.status, err.body(), served.request_id)
                )
                continue
            line = Line(number, custom_id, url, body, served, jobs, [None] * len(jobs))
            line.left = len(jobs)
            for k, job in enumerate(jobs):
                owners[index] = (line, k)
                index += 1
                yield job


class ProgressLine:
    """`lines done/total, rate, ETA` on one terminal line (carriage returns), a few times a
    second at most."""

    def __init__(self, stream: IO[str] = sys.stderr) -> None:
        self.stream = stream
        self.start = time.monotonic()
        self.shown = 0.0
        self.first: int | None = None

    def __call__(self, c: Counts) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = c.written - 1
        if now - self.shown < 0.2 and c.written < c.total:
            return
        self.shown = now
        rate = (c.written - self.first) / max(now - self.start, 1e-9)
        eta = (c.total - c.written) / rate if rate > 0 else float("inf")
        self.stream.write(
            f"\rbatch: {c.written}/{c.total} lines ({c.errors} errors), "
            f"{rate:.2f} lines/s, ETA {eta:.0f} s   "
        )
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()
