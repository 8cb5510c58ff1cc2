"""gemma-export bench: our runtime side by side with eager transformers, onnxruntime-genai and
llama.cpp on the same weights, in one run (a benchmark, not a test).

    gemma-export bench OUT [--genai DIR] [--gguf PATH] [--threads 2] [--prompt-tokens 128 1024]
                           [--new-tokens 128] [--repeat 2] [--rounds 1] [--json F] [--plot F.png]

Every engine gets the same prompt ids (BOS + CPython's docs text, encoded by OUT's tokenizer) and
makes the same number of new ids greedily, in its own process with the same thread count.
Figures per engine and prompt length: time to first token (ids in -> first new id out), prefill
tokens/s (prompt tokens / that time), decode tokens/s (new ids after the first / their time), and
the process's peak RSS. The machine's read bandwidth is measured too, and each decode figure is
given as a fraction of the bound it puts on decode: bandwidth / (weights one step multiplies by,
from the engine's own model file, + KV rows attended at the run's mean context). The bound is the
ideal: an engine that reads more than that (a whole preallocated cache, a weight twice) falls short
of it by as much, and a machine whose last-level cache holds much of the weights can pass it.
Engines that cannot run (not installed, no model given) are listed with the reason.
`--rounds N` runs every engine's child N times, the engines taking turns, and keeps the fastest
figures of all rounds: on a shared machine whose load drifts over minutes, the engines of one run
then see the same machine (2-core machine, 2026-12-02: onnxruntime-genai's decode after 128
tokens moved from 89 to 121 tokens/s between two runs of one round each).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from ..errors import ExportError
from .bandwidth import KvLayer, buffer_bytes, last_level_cache_bytes, measure_read_bandwidth
from .engines_setup import ENGINES, LABELS, EngineSetup, setup_engine
from .report import format_header, format_table, goal_results
from .run import CHILD_TIMEOUT_S, add_bounds, agreement, engine_record, run_child
from .streamed import Streamed, gguf_streamed, onnx_kv_element_bytes, onnx_streamed

# llama.cpp keeps its KV cache in float16 unless told otherwise (type_k / type_v).
LLAMA_KV_ELEMENT_BYTES = 2


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gemma-export bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", metavar="OUT", type=Path, help="export folder (gemma-export output)")
    p.add_argument("--genai", type=Path, help="onnxruntime-genai model folder of the same model (e.g. from bench/build_genai.py)")
    p.add_argument("--gguf", type=Path, help="GGUF file for llama.cpp (default: OUT's source when it is a .gguf)")
    p.add_argument("--eager-source", type=Path, help="weights for eager transformers: HF folder or .gguf (default: OUT's source)")
    p.add_argument("--genai-python", help="Python with onnxruntime_genai installed")
    p.add_argument("--llama-python", help="Python with llama_cpp (llama-cpp-python) installed")
    p.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES), help="engines to run (ours always runs)")
    p.add_argument("--threads", type=int, default=2, help="intra-op / compute threads of every engine (default 2)")
    p.add_argument("--prompt-tokens", type=int, nargs="+", default=[128, 1024], help="prompt lengths (default 128 1024)")
    p.add_argument("--new-tokens", type=int, default=128, help="new tokens per generation (default 128)")
    p.add_argument("--repeat", type=int, default=2, help="timed generations per prompt; the fastest is kept (default 2)")
    p.add_argument("--rounds", type=int, default=1, help="times each engine's child runs, the engines taking turns; "
                   "the fastest figures of all rounds are kept (default 1)")
    p.add_argument("--timeout", type=float, default=CHILD_TIMEOUT_S,
                   help=f"seconds one engine may take for all its runs (default {CHILD_TIMEOUT_S})")
    p.add_argument("--json", type=Path, help="write the result as JSON here")
    p.add_argument("--plot", type=Path, help="write a PNG plot here (needs matplotlib)")
    return p


def check_args(args: argparse.Namespace, max_context: int) -> None:
    """Bad input is refused before anything runs."""
    if args.threads < 1:
        raise ExportError(f"--threads must be at least 1, got {args.threads}")
    if args.new_tokens < 2:
        raise ExportError(f"--new-tokens must be at least 2 (decode speed needs a decode step), got {args.new_tokens}")
    if args.timeout <= 0:
        raise ExportError(f"--timeout must be positive, got {args.timeout}")
    if args.repeat < 1:
        raise ExportError(f"--repeat must be at least 1, got {args.repeat}")
    if args.rounds < 1:
        raise ExportError(f"--rounds must be at least 1, got {args.rounds}")
    if len(set(args.prompt_tokens)) != len(args.prompt_tokens):
        raise ExportError(f"--prompt-tokens has a length twice: {args.prompt_tokens}")
    for n in args.prompt_tokens:
        if n < 2 or n + args.new_tokens > max_context:
            raise ExportError(f"--prompt-tokens {n}: a prompt needs 2 tokens or more, and prompt + --new-tokens "
                              f"({n} + {args.new_tokens}) must fit OUT's context of {max_context}")
    if args.genai is not None and not (args.genai / "genai_config.json").is_file():
        raise ExportError(f"--genai {args.genai}: not an onnxruntime-genai model folder (no genai_config.json)")
    for flag in ("gguf", "eager_source"):
        path = getattr(args, flag)
        if path is not None and not path.exists():
            raise ExportError(f"--{flag.replace('_', '-')} {path}: no such file or folder")
    for flag in ("json", "plot"):
        path = getattr(args, flag)
        if path is not None and not path.parent.is_dir():
            raise ExportError(f"--{flag} {path}: folder {path.parent} does not exist")


def prompt_ids(out: Path, bos: int | None, lengths: list[int]) -> list[list[int]]:
    """BOS + the first n - 1 tokens of CPython's docs text, for each length n."""
    from ..evaluate import cpython_docs_text, encode_text

    if bos is None:
        raise ExportError(f"{out}: the manifest has no BOS id")
    text = encode_text(out, cpython_docs_text())
    if len(text) < max(lengths):
        raise ExportError(f"the docs text has only {len(text)} tokens; --prompt-tokens asks for {max(lengths)}")
    return [[bos, *text[: n - 1]] for n in lengths]


def _source(manifest) -> Path | None:
    source = manifest.provenance.get("source")
    return Path(source) if source and Path(source).exists() else None


def setup_for(name: str, args: argparse.Namespace, manifest) -> EngineSetup:
    """Decided just before the engine runs (an engine installed meanwhile is picked up)."""
    source = _source(manifest)
    if name == "ours":
        return setup_engine("ours", args.out, None, "")
    if name not in args.engines:
        return EngineSetup(name, None, None, "not in --engines")
    if name == "eager":
        return setup_engine("eager", args.eager_source or source, None,
                            "OUT records no source checkpoint on this machine: give --eager-source")
    if name == "genai":
        return setup_engine("genai", args.genai, args.genai_python,
                            "no --genai DIR given (an onnxruntime-genai model folder, e.g. from bench/build_genai.py)")
    gguf = args.gguf or (source if source is not None and source.suffix == ".gguf" else None)
    return setup_engine("llama", gguf, args.llama_python, "no --gguf given and OUT's source is not a GGUF file")


def streamed_weights(name: str, setup: EngineSetup, report: dict, manifest, out: Path) -> tuple[Streamed, int]:
    """(weights one decode step reads, KV bytes per element) from the engine's own model file."""
    if name == "ours":
        graph = out / manifest.graphs["decoder"].file
        return onnx_streamed(graph), onnx_kv_element_bytes(graph, manifest.caches[0].past_key)
    if name == "eager":
        return Streamed(report["weight_bytes_per_token"], 0), report["kv_element_bytes"]
    if name == "genai":
        decoder = json.loads((Path(setup.model) / "genai_config.json").read_text())["model"]["decoder"]
        graph = Path(setup.model) / decoder["filename"]
        past = decoder.get("inputs", {}).get("past_key_names", "past_key_values.%d.key").split("%")[0]
        return onnx_streamed(graph), onnx_kv_element_bytes(graph, past)
    return gguf_streamed(Path(setup.model)), LLAMA_KV_ELEMENT_BYTES


def merge_rounds(reports: list[dict]) -> dict:
    """One engine's child reports from several rounds as one: per prompt the run of the best
    decode speed, with the best prefill speed and the least time to first token of any round; the
    least load time, the largest peak RSS."""
    first = reports[0]
    runs = []
    for i in range(len(first["runs"])):
        same = [r["runs"][i] for r in reports]
        best = max(same, key=lambda r: r["decode_tps"])
        runs.append({**best, "prefill_tps": max(r["prefill_tps"] for r in same), "ttft_s": min(r["ttft_s"] for r in same)})
    merged = {**first, "runs": runs, "load_s": min(r["load_s"] for r in reports)}
    if all("peak_rss" in r for r in reports):
        merged["peak_rss"] = max(r["peak_rss"] for r in reports)
    return merged


def run_engines(args, manifest, prompts, bandwidth) -> dict:
    # a sliding layer attends to its window (a shared_buffer export's sliding caches are whole-context buffers)
    kv_layers = [KvLayer(c.kv_heads, c.head_dim, min(c.length, manifest.sliding_window or c.length) if c.kind == "sliding" else None)
                 for c in manifest.caches]
    records, setups, reports = {}, {}, {}
    for name in ENGINES:
        setup = setup_for(name, args, manifest)
        if setup.skipped:
            print(f"bench: {LABELS[name]}: skipped: {setup.skipped}", file=sys.stderr)
            records[name] = engine_record(setup, "skipped", setup.skipped)
        else:
            setups[name], reports[name] = setup, []
    # rounds interleave the engines (ours, genai, ours, genai, ...): a machine whose load drifts
    # slows each engine alike, and the ratios of one run compare like with like
    for round_ in range(args.rounds):
        for name, setup in setups.items():
            if name in records:
                continue  # failed in an earlier round
            print(f"bench: {LABELS[name]}: running on {setup.model} (round {round_ + 1} of {args.rounds}) ...",
                  file=sys.stderr, flush=True)
            start = time.perf_counter()
            try:
                reports[name].append(run_child(setup, prompts, args.new_tokens, args.threads, args.repeat, args.timeout))
            except RuntimeError as err:
                if name == "ours":
                    raise ExportError(f"our runtime failed on {args.out}: {err}") from err
                print(f"bench: {LABELS[name]}: failed: {err}", file=sys.stderr)
                records[name] = engine_record(setup, "failed", str(err))
                continue
            print(f"bench: {LABELS[name]}: done in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    for name, setup in setups.items():
        if name in records:
            continue
        report = merge_rounds(reports[name])
        streamed, kv_bytes = streamed_weights(name, setup, report, manifest, args.out)
        report = add_bounds(report, streamed.weights, kv_layers, kv_bytes, bandwidth)
        report["gathered_bytes"] = streamed.gathered
        records[name] = engine_record(setup, "ok", "", report)
    records = {name: records[name] for name in ENGINES}
    ours = {r["prompt_tokens"]: r["first_ids"] for r in records["ours"]["runs"]}
    for record in records.values():
        for r in record.get("runs", []):
            r["agree_with_ours"] = agreement(ours[r["prompt_tokens"]], r["first_ids"])
    return records


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from gemma_runtime.errors import GemmaRuntimeError
    from gemma_runtime.manifest import read_manifest

    try:
        manifest = read_manifest(args.out)
    except (GemmaRuntimeError, OSError) as err:
        raise ExportError(f"{args.out} is not a readable export folder: {err}") from err
    check_args(args, manifest.max_context)
    if args.plot:
        from .plot import require_matplotlib

        require_matplotlib()
    prompts = prompt_ids(args.out, manifest.tokens.bos, args.prompt_tokens)
    cache = last_level_cache_bytes()
    size = buffer_bytes(cache)
    print(f"bench: measuring read bandwidth ({size / 2**20:.0f} MiB, {args.threads} threads) ...", file=sys.stderr)
    bandwidth = measure_read_bandwidth(args.threads, size)
    engines = run_engines(args, manifest, prompts, bandwidth)
    result = {
        "settings": {"export": str(args.out), "family": manifest.family, "variant": manifest.variant,
                     "quant": manifest.quant, "threads": args.threads, "prompt_tokens": args.prompt_tokens,
                     "new_tokens": args.new_tokens, "repeat": args.repeat, "rounds": args.rounds, "prompt_text": "BOS + CPython docs (pydoc_data.topics)"},
        "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "read_bandwidth": bandwidth, "bandwidth_buffer_bytes": size,
                    "cache_bytes": cache, "python": platform.python_version()},
        "engines": engines,
    }
    result["goals"] = goal_results(engines, args.prompt_tokens)
    print(format_header(result))
    print(format_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"bench: wrote {args.json}", file=sys.stderr)
    if args.plot:
        from .plot import write_plot

        write_plot(result, args.plot)
        print(f"bench: wrote {args.plot}", file=sys.stderr)
    return 0
