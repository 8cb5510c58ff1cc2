"""gemma-run OUT PROMPT: stream a raw completion; gemma-run OUT --chat: an interactive chat.

Chat reads one user turn per line from stdin (`/reset` clears the history, `/exit` or EOF ends),
streams each answer to stdout and prints a line of figures to stderr after it. Each turn reuses
the KV cache of the conversation so far. A turn that would overflow the context is refused with
the limit named, and the session goes on (use /reset). Every error is one line on stderr and a
non-zero exit (2; 130 on Ctrl-C); a warning while loading (e.g. the target's preferred provider
is not installed, so the next one runs) is one line on stderr and the run goes on.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from .errors import ContextLengthError, GemmaRuntimeError, TokenizerMissingError
from .model import GenerationStats, Model
from .npu_decoder import load_model
from .providers import PROVIDERS
from .sampling import SamplingConfig


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gemma-run", description="Generate text or chat with a gemma-export folder.")
    p.add_argument("out", metavar="OUT", help="export folder written by gemma-export")
    p.add_argument("prompt", metavar="PROMPT", nargs="?",
                   help="prompt text (raw: BOS added, no chat template); with --chat, the first user turn")
    p.add_argument("--chat", action="store_true", help="interactive chat on stdin/stdout with the chat template")
    p.add_argument("--system", default=None, metavar="TEXT", help="system message for --chat")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="image file (repeatable; Gemma 3n exports with encoders): the prompt then goes through the "
                   "chat template as one user turn with the images and audio before its text")
    p.add_argument("--audio", action="append", default=[], metavar="PATH",
                   help="audio file, up to 30 s (repeatable; as --image)")
    p.add_argument("--max-new-tokens", type=_positive, default=None, metavar="N",
                   help="default: generation_config.json's max_new_tokens, else 128")
    s = p.add_argument_group("sampling (default: the export's generation_config.json; temperature 0 = greedy)")
    s.add_argument("--temperature", type=float, default=None, metavar="T")
    s.add_argument("--top-k", type=int, default=None, metavar="K")
    s.add_argument("--top-p", type=float, default=None, metavar="P")
    s.add_argument("--min-p", type=float, default=None, metavar="P")
    s.add_argument("--repetition-penalty", type=float, default=None, metavar="R")
    s.add_argument("--seed", type=int, default=None, metavar="S")
    s.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop string (repeatable)")
    d = p.add_argument_group("device")
    d.add_argument("--provider", default=None, metavar="NAME",
                   help=f"execution provider: {', '.join(PROVIDERS)} (default: the export's target)")
    d.add_argument("--threads", type=_positive, default=None, metavar="N", help="onnxruntime intra-op threads")
    d.add_argument("--graph-cache", action="store_true",
                   help="cache onnxruntime's optimized graph outside the export folder (costs a copy of the weights); "
                   "on qnn, the HTP's compiled EP contexts (later loads skip the compilation)")
    p.add_argument("--stats", action="store_true", help="print timings to stderr after the completion")
    return p


def _sampling(args) -> dict:
    given = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                 repetition_penalty=args.repetition_penalty, seed=args.seed)
    SamplingConfig().override(**given)  # invalid values fail here, before the model loads
    return {k: v for k, v in given.items() if v is not None}


def stats_line(s: GenerationStats) -> str:
    ttft = f"{s.time_to_first_token:.3f} s" if s.time_to_first_token is not None else "n/a"
    return (
        f"time to first token: {ttft} | prompt: {s.prompt_tokens} tokens ({s.reused_tokens} reused), "
        f"prefill: {s.prefill_tokens_per_second:.1f} tok/s | decode: {s.decode_tokens_per_second:.1f} tok/s "
        f"({s.decode_tokens} tokens) | end: {s.stop_reason}"
    )


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _media_parts(args) -> list[dict]:
    return ([{"type": "image", "image": p} for p in args.image] + [{"type": "audio", "audio": p} for p in args.audio])


def _complete(model: Model, args, sampling: dict) -> None:
    if args.image or args.audio:
        content = [*_media_parts(args), {"type": "text", "text": args.prompt}]
        pieces = model.chat([{"role": "user", "content": content}], max_new_tokens=args.max_new_tokens,
                            stream=True, stop=args.stop, **sampling)
    else:
        pieces = model.generate(args.prompt, max_new_tokens=args.max_new_tokens, stream=True, stop=args.stop,
                                **sampling)
    for piece in pieces:
        _write(piece)
    _write("\n")
    if args.stats and model.last_stats is not None:
        print(stats_line(model.last_stats), file=sys.stderr)


def _chat(model: Model, args, sampling: dict) -> None:
    interactive = sys.stdin.isatty()
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    if interactive:
        print("chat: /reset clears the history, /exit or Ctrl-D ends", file=sys.stderr)
    pending = [args.prompt] if args.prompt else []
    while True:
        if pending:
            line = pending.pop()
        else:
            if interactive:
                _write("> ")
            line = sys.stdin.readline()
            if not line:
                break
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            history.clear()
            model.reset()
            print("(history cleared)", file=sys.stderr)
            continue
        if not text:
            continue
        content = text if history or not (args.image or args.audio) else [*_media_parts(args), {"type": "text", "text": text}]
        turn = [*history, {"role": "user", "content": content}]
        try:
            pieces = model.chat(system + turn, max_new_tokens=args.max_new_tokens, stream=True, stop=args.stop,
                                **sampling)
        except ContextLengthError as err:
            print(f"gemma-run: {err}; /reset to start a new conversation", file=sys.stderr)
            continue
        answer = []
        for piece in pieces:
            answer.append(piece)
            _write(piece)
        _write("\n")
        history = [*turn, {"role": "assistant", "content": "".join(answer)}]
        print(stats_line(model.last_stats), file=sys.stderr, flush=True)


def _load(args) -> Model:
    """Model.load (NpuModel.load for the static graphs of an NPU export), its warnings printed as
    one line each (not Python's two-line format)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)  # the runtime's own; others keep their filters
        try:
            return load_model(args.out, provider=args.provider, threads=args.threads, graph_cache=args.graph_cache)
        finally:
            for w in caught:
                print(f"gemma-run: warning: {' '.join(str(w.message).split())}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # intermixed: `gemma-run OUT --image cat.jpg "prompt"` (the prompt after the options)
    args = parser.parse_intermixed_args(argv)
    if args.prompt is None and not args.chat:
        parser.error("PROMPT is required (or --chat)")
    try:
        sampling = _sampling(args)
        model = _load(args)
        (_chat if args.chat else _complete)(model, args, sampling)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
