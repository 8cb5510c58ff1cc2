"""What every engine child shares: read the spec, time one generation, report JSON. Standard library
only: the onnxruntime-genai and llama.cpp children run in other virtual environments, where
gemma_export is not installed (they are started by file path; this module sits beside them)."""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator


@dataclass(frozen=True)
class Spec:
    """One child's work (written by gemma_export.bench.run as JSON)."""

    model: str  # the engine's model: export folder, GGUF file, HF folder, genai folder
    prompts: list  # list of prompt id lists (BOS first), one timed generation (or more) each
    new_tokens: int
    threads: int
    repeat: int  # timed generations per prompt; the fastest TTFT and fastest decode are kept


@dataclass(frozen=True)
class Run:
    prompt_tokens: int
    ttft_s: float  # ids in -> first new id out (the prompt's prefill + one token choice)
    decode_s: float  # from the first new id to the last: new_tokens - 1 decode steps
    new_tokens: int
    first_ids: list  # the first new ids, to check engines agree (greedy, same weights)

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.ttft_s

    @property
    def decode_tps(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 else 0.0


def read_spec() -> Spec:
    with open(sys.argv[1], encoding="utf-8") as f:
        return Spec(**json.load(f))


def peak_rss() -> int:
    """This process's peak resident set in bytes: VmHWM, which starts afresh at exec. Not
    ru_maxrss: Linux carries it over fork and exec, so a child would report its parent's peak
    (the parent's bandwidth buffer) wherever that is larger."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    # no /proc (macOS, BSD): ru_maxrss, in bytes on macOS and KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def time_stream(prompt_tokens: int, tokens: Callable[[], Iterator[int]]) -> Run:
    """Time a token stream that yields the first new id right after the prompt's prefill and
    then one id per decode step."""
    ids: list[int] = []
    start = time.perf_counter()
    first = None
    for token in tokens():
        if first is None:
            first = time.perf_counter()
        ids.append(int(token))
    end = time.perf_counter()
    if first is None:
        raise RuntimeError("the engine produced no token")
    return Run(prompt_tokens, first - start, end - first, len(ids), ids[:16])


def best(runs: list[Run]) -> Run:
    """Fastest TTFT and fastest decode among repeats (a shared machine only ever slows a run)."""
    ttft = min(runs, key=lambda r: r.ttft_s)
    decode = min(runs, key=lambda r: r.decode_s / max(r.new_tokens - 1, 1))
    return Run(ttft.prompt_tokens, ttft.ttft_s, decode.decode_s, decode.new_tokens, ttft.first_ids)


def measure(spec: Spec, generate: Callable[[list[int], int], Iterator[int]]) -> list[dict]:
    """A warm-up (the first prompt, 8 new ids), then `repeat` timed generations per prompt.
    generate(prompt, n) yields n new ids, greedy, not stopping at an end-of-turn id where the
    engine allows it (the child says so in its report otherwise)."""
    for _ in generate(spec.prompts[0], 8):
        pass
    out = []
    for prompt in spec.prompts:
        run = best([time_stream(len(prompt), lambda: generate(prompt, spec.new_tokens)) for _ in range(spec.repeat)])
        print(f"prompt {run.prompt_tokens}: time to first token {run.ttft_s:.2f} s, decode {run.decode_tps:.2f} tokens/s "
              f"({run.new_tokens} new)", file=sys.stderr, flush=True)
        out.append({**asdict(run), "prefill_tps": run.prefill_tps, "decode_tps": run.decode_tps})
    return out


def report(load_s: float, runs: list[dict], **extra) -> None:
    """The child's answer: one JSON line, last on stdout."""
    print(json.dumps({"load_s": load_s, "runs": runs, "peak_rss": peak_rss(), **extra}), flush=True)
