"""`sonar-llm`: generate from the command line, build the demo bundle, convert, download, serve."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.engine import LLM
    from server.settings import Settings

EXIT_USAGE = 2


class CliError(Exception):
    """A user error: printed as one line, exit code 2, no traceback."""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """The server's model settings, as flags (and `SONAR_LLM_*` variables) of their own."""
    from server.settings import MODEL_SETTINGS, add_serve_args

    add_serve_args(p.add_argument_group("model"), MODEL_SETTINGS)


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    """One flag per generation option (`models.options.OPTIONS`: the HTTP fields' twins)."""
    from models.options import OPTIONS

    g = p.add_argument_group("generation")
    for o in OPTIONS:
        flag = "--" + o.name.replace("_", "-")
        default = o.default
        help_text = o.description + (
            "" if default in (None, ()) else f" (default {default})".replace("%", "%%")
        )
        if o.name == "max_sentences":
            help_text += "; with --summarize: 1"
            default = None
        if o.many:
            g.add_argument(flag, action="append", default=None, help=help_text + "; repeatable")
        else:
            g.add_argument(flag, type=o.type, default=default, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    from server.settings import add_serve_args

    parser = argparse.ArgumentParser(prog="sonar-llm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="continue a prompt, printing sentences as they come")
    gen.add_argument("prompt", help="the prompt text, or - to read it from standard input")
    _add_model_args(gen)
    _add_generation_args(gen)
    gen.add_argument("--json", action="store_true", help="end with one JSON object on stdout")
    gen.add_argument(
        "--summarize", action="store_true", help="treat the prompt as a document to summarise"
    )
    gen.add_argument("--instruction", default=None, help="summarisation instruction sentence")

    b = sub.add_parser(
        "batch",
        help="answer an OpenAI batch file (JSONL) offline, through the engine",
        description="Run every request of IN (OpenAI's batch input: one JSON object a line, "
        '{"custom_id", "method": "POST", "url", "body"} for /v1/completions, '
        "/v1/chat/completions or /v1/embeddings) through the engine's batching, appending "
        "OpenAI's batch output lines to OUT as each finishes. Rerun the same command after an "
        "interruption to resume: lines already in OUT are skipped. The settings are the "
        "server's (same flags and SONAR_LLM_* variables), so are the answers; a line has no "
        "deadline unless --request-timeout is given.",
    )
    b.add_argument("input", metavar="IN", help="batch input file (JSONL)")
    b.add_argument("output", metavar="OUT", help="batch output file (JSONL; appended to)")
    add_serve_args(b)

    t = sub.add_parser("tiny", help="write the random-weight demo bundle to DIR")
    t.add_argument("dir")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument(
        "--preset",
        choices=["tiny", "small", "full"],
        default="tiny",
        help="sizes: tiny (demo), small (benchmarks), full (real SONAR sizes, ~7 GB)",
    )
    t.add_argument(
        "--llm",
        choices=["100m", "300m", "600m", "900m"],
        default=None,
        help="SONAR-LLM size of the full preset (default 100m)",
    )

    d = sub.add_parser(
        "download",
        help="fetch everything the model settings need into the caches (for offline hosts)",
        description="Fetch the SONAR-LLM checkpoint (a Hugging Face repo id), the SONAR "
        "encoder, decoder and tokenizer files (fairseq2 asset cards, into $FAIRSEQ2_CACHE_DIR) "
        "and nltk's punkt_tab data, so that a host can run this configuration offline.",
    )
    _add_model_args(d)

    c = sub.add_parser("convert", help="rewrite a checkpoint as safetensors + config.json")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--config", help="SonarLLM_*.json for a training .pt")

    s = sub.add_parser("serve", help="start the HTTP server")
    add_serve_args(s)

    from server.ray_app import add_scale_args
    from server.ray_cli import add_ray_args

    r = sub.add_parser(
        "ray", help="serve with Ray Serve: replicas, autoscaling (needs the `ray` extra)"
    )
    add_serve_args(r)
    add_scale_args(r)
    add_ray_args(r)
    return parser


def _progress(msg: str) -> None:
    print(f"loading: {msg}", file=sys.stderr, flush=True)


def _load_llm(settings: Settings) -> LLM:
    """The offline engine over the model the settings (flags, `SONAR_LLM_*`) name."""
    from models.pipeline import warn_demo
    from server.engine import LLM

    if settings.model is None:
        warn_demo()
    return LLM.from_settings(settings, progress=_progress)


def _options(args: argparse.Namespace, max_sentences: int):  # type: ignore[no-untyped-def]
    from models.options import OPTIONS, GenerationOptions

    values = {o.name: getattr(args, o.name) for o in OPTIONS}
    return GenerationOptions.from_values({**values, "max_sentences": max_sentences})


def cmd_generate(args: argparse.Namespace) -> int:
    from models.generate import summarization_prompt
    from server.engine import FinalEvent

    prompt_text = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt_text.strip():
        raise CliError("prompt is empty")
    max_sentences = args.max_sentences
    if max_sentences is None:
        from models.options import OPTION

        max_sentences = 1 if args.summarize else OPTION["max_sentences"].default
    opts = _options(args, max_sentences)  # validate before the (slow) load
    prompt = (
        summarization_prompt(prompt_text, max_sentences, args.instruction, args.source_lang)
        if args.summarize
        else prompt_text
    )
    from server.settings import settings_from_args

    for event in _load_llm(settings_from_args(args)).stream(prompt, opts):
        if isinstance(event, FinalEvent):
            if event.finish_reason == "error":
                raise CliError(event.error or "generation failed")
            if args.json:
                print(
                    json.dumps(
                        {
                            "sentences": event.sentences,
                            "finish_reason": event.finish_reason,
                            "usage": event.usage.as_dict(),
                        },
                        ensure_ascii=False,
                    )
                )
        elif not args.json:
            print(event.text, flush=True)
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from server.api.app import model_name
    from server.batch import ProgressLine, run_batch
    from server.log_config import configure_logging
    from server.settings import settings_from_args

    src, dst = Path(args.input), Path(args.output)
    if not src.is_file():
        raise CliError(f"{src} is not a file")
    if dst.resolve() == src.resolve():
        raise CliError("IN and OUT must be different files")
    settings = settings_from_args(args)
    if args.request_timeout is None:
        # The server's deadline is for a client waiting on the line; a batch line has none
        # unless asked for (a body's own `timeout` still applies).
        settings = settings.model_copy(update={"request_timeout": None})
    configure_logging(settings.log_format, settings.log_level)
    llm = _load_llm(settings)
    progress = ProgressLine() if sys.stderr.isatty() else None
    try:
        counts = run_batch(llm, settings, model_name(settings), src, dst, progress)
    except KeyboardInterrupt:
        if progress is not None:
            progress.close()
        print(f"interrupted: rerun the same command to resume ({dst} is kept)", file=sys.stderr)
        return 130
    if progress is not None:
        progress.close()
    print(
        f"{counts.written - counts.skipped} lines written to {dst} ({counts.errors} errors), "
        f"{counts.skipped} already there",
        file=sys.stderr,
    )
    return 0


def cmd_tiny(args: argparse.Namespace) -> int:
    from models import tiny

    bundle = tiny.build(Path(args.dir), seed=args.seed, preset=args.preset, llm=args.llm)
    print(f"wrote {args.preset} bundle (random weights) to {bundle.root}")
    print(f"use it with: sonar-llm generate 'Hello there.' --model {bundle.root}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from models.checkpoint import convert

    report = convert(args.src, args.dst, config=args.config)
    ignored = sum(report.ignored.values())
    print(f"converted {report.loaded} tensors ({ignored} ignored) from {args.src} to {args.dst}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from models import prefetch
    from server.settings import settings_from_args

    settings = settings_from_args(args)
    report = prefetch.download(settings, say=lambda msg: print(msg, file=sys.stderr, flush=True))
    for item in report.items:
        print(prefetch.describe(item), flush=True)
    for error in report.errors:
        print(f"sonar-llm: error: {error}", file=sys.stderr)
    if report.errors:
        failed = len(report.errors)
        print(
            f"{failed} part{'s' if failed > 1 else ''} could not be fetched (see above): "
            "this host cannot run this configuration offline yet"
        )
        return EXIT_USAGE
    print(prefetch.offline_line(report))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from server.main import serve

    return serve(args)


def cmd_ray(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise CliError("`sonar-llm ray` needs Ray Serve: install the `ray` extra")
    from server.ray_cli import run

    return run(args)


COMMANDS = {
    "generate": cmd_generate,
    "batch": cmd_batch,
    "tiny": cmd_tiny,
    "convert": cmd_convert,
    "download": cmd_download,
    "serve": cmd_serve,
    "ray": cmd_ray,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from models.asset_errors import SonarAssetError
    from models.checkpoint import CheckpointError
    from models.config import ConfigError
    from models.generate import GenerationError

    try:
        return COMMANDS[args.command](args)
    except (
        CliError,
        GenerationError,
        CheckpointError,
        ConfigError,
        SonarAssetError,
        ValueError,
        FileNotFoundError,
    ) as e:
        print(f"sonar-llm: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
