"""gemma-run OUT PROMPT: stream a raw completion of PROMPT from an export folder."""

from __future__ import annotations

import argparse
import os
import sys

from .errors import GemmaRuntimeError, TokenizerMissingError
from .model import Model


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gemma-run", description="Generate text from a gemma-export folder.")
    p.add_argument("out", metavar="OUT", help="export folder written by gemma-export")
    p.add_argument("prompt", metavar="PROMPT", nargs="?", help="prompt text (raw: BOS added, no chat template)")
    p.add_argument("--max-new-tokens", type=_positive, default=128, metavar="N")
    p.add_argument("--threads", type=_positive, default=None, metavar="N", help="onnxruntime intra-op threads")
    p.add_argument("--provider", default=None, metavar="NAME", help="onnxruntime execution provider (default CPU)")
    p.add_argument("--stats", action="store_true", help="print timings to stderr after the completion")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.prompt is None:
        parser.error("PROMPT is required")
    try:
        model = Model.load(args.out, provider=args.provider, threads=args.threads)
        for piece in model.generate(args.prompt, max_new_tokens=args.max_new_tokens, stream=True):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
    except TokenizerMissingError as err:
        print(f"gemma-run: error: {err} (from Python: Model.load(...).generate_ids(ids))", file=sys.stderr)
        return 2
    except GemmaRuntimeError as err:
        print(f"gemma-run: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `gemma-run ... | head`: the reader left; stop quietly (and keep exit-time flushes quiet).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if args.stats and model.last_stats is not None:
        s = model.last_stats
        ttft = f"{s.time_to_first_token:.3f} s" if s.time_to_first_token is not None else "n/a"
        print(
            f"prompt tokens: {s.prompt_tokens}, time to first token: {ttft}, "
            f"prefill: {s.prefill_tokens_per_second:.1f} tok/s, "
            f"decode: {s.decode_tokens_per_second:.1f} tok/s ({s.decode_tokens} tokens)",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
