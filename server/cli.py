"""`sonar-llm`: generate from the command line, build the demo bundle, convert, serve."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_USAGE = 2


class CliError(Exception):
    """A user error: printed as one line, exit code 2, no traceback."""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help="SONAR-LLM: HF-layout dir, HF repo id, training .pt, or bundle")
    g.add_argument("--config", help="SonarLLM_*.json config for a training .pt checkpoint")
    g.add_argument("--encoder", help="SONAR encoder asset card (default text_sonar_basic_encoder)")
    g.add_argument("--decoder", help="SONAR decoder asset card (default text_sonar_basic_decoder)")
    g.add_argument("--tokenizer", help="SONAR tokenizer asset card (default: the encoder's)")
    g.add_argument(
        "--asset-dir", action="append", default=[], help="extra fairseq2 asset-card folder"
    )
    g.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if present)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--source-lang", default="eng_Latn")
    g.add_argument("--target-lang", default="eng_Latn")
    g.add_argument("--max-sentences", type=int, default=None, help="new sentences (default 8)")
    g.add_argument("--eos-threshold", type=float, default=0.98)
    g.add_argument("--eos-text", default="End of sequence.")
    g.add_argument("--beam-size", type=int, default=5)
    g.add_argument("--max-tokens", type=int, default=256, help="token bound per sentence")
    g.add_argument("--temperature", type=float, default=0.0, help="decoder token temperature")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--latent-temperature", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
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

    c = sub.add_parser("convert", help="rewrite a checkpoint as safetensors + config.json")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--config", help="SonarLLM_*.json for a training .pt")

    from server.settings import add_serve_args

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


def _load_pipeline(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from models.pipeline import SonarLLMPipeline, warn_demo

    if args.model is None:
        warn_demo()
    return SonarLLMPipeline.from_options(args, progress=_progress)


def _options(args: argparse.Namespace, max_sentences: int):  # type: ignore[no-untyped-def]
    from models.generate import GenerationOptions
    from models.sonar_codec import DecodeOptions

    decode = DecodeOptions(
        beam_size=args.beam_size,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
    )
    return GenerationOptions(
        max_sentences=max_sentences,
        eos_threshold=args.eos_threshold,
        eos_text=args.eos_text,
        source_lang=args.source_lang,
        target_lang=args.target_lang,
        decode=decode,
        latent_temperature=args.latent_temperature,
        seed=args.seed,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from models.generate import Finished, generate, summarization_prompt

    prompt_text = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt_text.strip():
        raise CliError("prompt is empty")
    max_sentences = (
        args.max_sentences if args.max_sentences is not None else (1 if args.summarize else 8)
    )
    opts = _options(args, max_sentences)  # validate before the (slow) load
    prompt = (
        summarization_prompt(prompt_text, max_sentences, args.instruction, args.source_lang)
        if args.summarize
        else prompt_text
    )
    pipe = _load_pipeline(args)
    for event in generate(pipe, prompt, opts):
        if isinstance(event, Finished):
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
    "tiny": cmd_tiny,
    "convert": cmd_convert,
    "serve": cmd_serve,
    "ray": cmd_ray,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
        ValueError,
        FileNotFoundError,
    ) as e:
        print(f"sonar-llm: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
