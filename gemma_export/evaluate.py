"""gemma-export eval: how far a quantized export is from its reference, under teacher forcing.

    gemma-export eval OUT [OUT ...] --reference REF_OUT --text FILE [--max-tokens N] [--json]

Every export runs the same token ids (the text, encoded by the reference's tokenizer.json): the
text is cut into segments of at most max_context tokens, each starting with BOS, fed in chunks of
the prefill chunk with the runtime's KV cache. The exported decoder returns only the last
position's logits, so each session runs the all-positions variant of decoder.onnx
(passes/logits.py: the last-position Gather bypassed), built in a temporary folder beside a link
to the export's weights. Per predicted token:

    top-1 agreement   argmax q == argmax p
    KL(p || q)        sum_v p_v (log p_v - log q_v)      p: reference, q: candidate
    perplexity        exp(mean -log q[next token]), the same for p; ratio = ppl(q) / ppl(p)

A candidate need not be an export folder: evaluate_sources scores any LogitsSource (an object that
returns a chunk's logits for every position and resets its cache per segment), e.g. another
toolchain's model on the same token ids (gemma_export/evaluate_genai.py).

No torch here: onnxruntime, numpy, onnx (to build the variant) and gemma_runtime's readers.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from .errors import ExportError

METHOD = "all-positions variant of decoder.onnx (last-position Gather bypassed), teacher forcing"
DEFAULT_MAX_TOKENS = 4096


@dataclass(frozen=True)
class Scores:
    folder: str
    quant: str
    tokens: int
    top1: float  # fraction of positions whose argmax agrees with the reference
    kl: float  # mean KL(reference || this), nats
    ppl: float
    ppl_ratio: float  # ppl / reference ppl
    seconds: float


@dataclass(frozen=True)
class EvalResult:
    method: str
    tokens: int  # predictions scored
    segments: int
    chunk: int
    reference: Scores
    candidates: tuple[Scores, ...]

    def to_dict(self) -> dict:
        return asdict(self)


class LogitsSource(Protocol):
    """What evaluate_sources scores: a model run under teacher forcing, chunk by chunk."""

    label: str  # shown in the table (an export folder, or a description)
    quant: str
    seconds: float  # time spent in chunk_logits so far

    def reset(self) -> None:
        """Forget the KV cache: the next chunk starts a segment at position 0."""

    def chunk_logits(self, ids: np.ndarray, position: int, chunk: int) -> np.ndarray:
        """Logits [len(ids), V] of the tokens `ids` at positions position.. (len(ids) <= chunk)."""


class _Runner:
    """One export's all-positions session, host tables and KV cache (a LogitsSource)."""

    def __init__(self, folder: Path, threads: int | None, calibrate: bool = False, transform=None):
        """transform: ModelProto -> ModelProto applied to the all-positions variant before the
        session is made (e.g. weights turned into inputs, fed from `fixed_feeds` on every run)."""
        import onnx
        import onnxruntime as ort
        from gemma_runtime.integrity import verify_files
        from gemma_runtime.kv_cache import KVCache
        from gemma_runtime.manifest import KV_IN_PLACE, read_manifest
        from gemma_runtime.tables import HostTableReader

        from .passes.calibrate import calibration_variant
        from .passes.logits import GraphShapeError, all_positions_logits

        self.folder = folder
        m = self.manifest = read_manifest(folder)
        verify_files(folder, m.files, drop_cache=m.table_files)
        graph = m.graphs["decoder"]
        try:
            model = onnx.load(str(folder / graph.file), load_external_data=False)
            self.calibration_inputs: dict[str, list[str]] = {}
            if calibrate:  # MatMul inputs as extra outputs (passes/calibrate.py)
                model, self.calibration_inputs = calibration_variant(model)
            else:
                model = all_positions_logits(model)
            if transform is not None:
                model = transform(model)
        except GraphShapeError as err:
            raise ExportError(f"{folder}: {err}") from err
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        # the variant is handed over in memory; its weights stay where they are, in the export
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder.resolve()))
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        del model
        self.embed = HostTableReader.open(folder, "embed_tokens", m.tables["embed_tokens"])
        self.per_layer = None
        if m.per_layer_inputs is not None:
            self.per_layer = HostTableReader.open(folder, "per_layer", m.tables["per_layer"], row0_from=m.per_layer_inputs.vocab_size)
        self.cache = KVCache(m.caches)
        # "shared_buffer(_windowed)": the graph returns whole updated buffers, and takes no padding (its
        # GroupQueryAttention would write padding rows into them); chunks run at their own length
        self.in_place = m.kv_layout in KV_IN_PLACE
        self.outputs = ["logits", *self.cache.output_names()]
        # MatMul inputs to observe: fetched as outputs, except graph inputs (onnxruntime refuses
        # those as outputs; Gemma 3n's AltUp and per-layer projections read inputs_embeds): from the feeds
        graph_inputs = {i.name for i in self.session.get_inputs()}
        self.extra = [n for n in self.calibration_inputs if n not in graph_inputs]
        self.extra_fed = [n for n in self.calibration_inputs if n in graph_inputs]
        self.last_extra: dict[str, np.ndarray] = {}
        from gemma_runtime.tables import table_input_arrays

        self.fixed_feeds: dict[str, np.ndarray] = dict(table_input_arrays(m.table_inputs, self.embed, self.per_layer))
        self.seconds = 0.0
        self.label, self.quant = str(folder), m.quant

    def reset(self) -> None:
        self.cache.reset()

    def chunk_logits(self, ids: np.ndarray, position: int, chunk: int) -> np.ndarray:
        """Logits [len(ids), V] of a chunk starting at `position`; its KV rows are stored."""
        start = time.perf_counter()
        valid, m = int(ids.size), self.manifest
        chunk = valid if self.in_place else chunk
        embeds = np.zeros((1, chunk, m.hidden_size), dtype=np.float32)
        embeds[0, :valid] = self.embed.lookup(ids)
        feeds = {"inputs_embeds": embeds, "position": np.array([position], dtype=np.int64),
                 "valid": np.array([valid], dtype=np.int64), **self.cache.feeds(), **self.fixed_feeds}
        if self.per_layer is not None:
            pli = m.per_layer_inputs
            rows = np.zeros((1, chunk, pli.num_layers, pli.dim), dtype=np.float32)
            rows[0, :valid] = self.per_layer.lookup(ids).reshape(valid, pli.num_layers, pli.dim)
            feeds["per_layer_inputs"] = rows
        logits, *new_rows = self.session.run(self.outputs + self.extra, feeds)
        if self.extra or self.extra_fed:
            self.last_extra = {**dict(zip(self.extra, new_rows[len(self.outputs) - 1:])),
                               **{n: feeds[n] for n in self.extra_fed}}
            new_rows = new_rows[: len(self.outputs) - 1]
        self.cache.store_outputs(new_rows, position, valid, whole_buffers=self.in_place)
        self.seconds += time.perf_counter() - start
        return logits[:valid]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def _segments(ids: Sequence[int], bos: int | None, length: int) -> Iterator[np.ndarray]:
    """[BOS] + up to length-1 tokens each; every token of `ids` is a target exactly once."""
    step = length - 1 if bos is not None else length
    first = 0
    while first < len(ids):
        body = list(ids[first:first + step])
        yield np.asarray(([bos] if bos is not None else []) + body, dtype=np.int64)
        first += step


def evaluate_ids(reference: Path, candidates: Sequence[Path], ids: Sequence[int], threads: int | None = None,
                 progress: bool = False) -> EvalResult:
    """Teacher-forced scores of every candidate export against `reference` on the token ids `ids`
    (text tokens without BOS; each segment gets the reference's BOS)."""
    reference, candidates = Path(reference), [Path(c) for c in candidates]
    if not candidates:
        raise ExportError("name at least one export to evaluate beside --reference")
    runners = [_Runner(f, threads) for f in [reference, *candidates]]
    ref = runners[0].manifest
    for r in runners[1:]:
        m = r.manifest
        if (m.vocab_size, m.hidden_size, m.family) != (ref.vocab_size, ref.hidden_size, ref.family):
            raise ExportError(f"{r.folder} is a different model from {reference} (family, vocab or hidden size differ)")
    ids = list(ids)
    if not ids:
        raise ExportError("no tokens to evaluate")
    if max(ids) >= ref.vocab_size or min(ids) < 0:
        raise ExportError(f"token ids must lie in [0, {ref.vocab_size})")
    length = min(r.manifest.max_context for r in runners)
    chunk = min(r.manifest.prefill_chunk for r in runners)
    return evaluate_sources(runners[0], runners[1:], ids, length, chunk, ref.tokens.bos, progress)


def evaluate_sources(reference: LogitsSource, candidates: Sequence[LogitsSource], ids: Sequence[int], length: int,
                     chunk: int, bos: int | None, progress: bool = False) -> EvalResult:
    """Teacher-forced scores of `candidates` against `reference` on the token ids `ids`, fed in
    segments of at most `length` tokens (each starting with `bos`), in chunks of `chunk`."""
    ids = list(ids)
    if not ids:
        raise ExportError("no tokens to evaluate")
    runners = [reference, *candidates]
    n = len(candidates)
    agree, kl = np.zeros(n), np.zeros(n)
    nll, nll_ref, count, segments = np.zeros(n), 0.0, 0, 0
    for segment in _segments(ids, bos, length):
        segments += 1
        for r in runners:
            r.reset()
        targets = segment[1:]
        for first in range(0, len(segment), chunk):
            piece = segment[first:first + chunk]
            scored = min(len(piece), len(targets) - first)  # the segment's last token has no target
            outs = [r.chunk_logits(piece, first, chunk)[:scored] for r in runners]
            if scored <= 0:
                continue
            tgt = targets[first:first + scored]
            lp = _log_softmax(outs[0])
            nll_ref += float(-lp[np.arange(scored), tgt].sum(dtype=np.float64))
            top_ref = lp.argmax(axis=1)
            p = np.exp(lp)
            for j, out in enumerate(outs[1:]):
                lq = _log_softmax(out)
                agree[j] += float((lq.argmax(axis=1) == top_ref).sum())
                kl[j] += float((p * (lp - lq)).sum(dtype=np.float64))
                nll[j] += float(-lq[np.arange(scored), tgt].sum(dtype=np.float64))
            count += scored
        if progress:
            print(f"gemma-export eval: {count} / {len(ids)} tokens", file=sys.stderr, flush=True)
    ppl_ref = math.exp(nll_ref / count)
    ref_scores = Scores(reference.label, reference.quant, count, 1.0, 0.0, ppl_ref, 1.0, reference.seconds)
    cands = tuple(
        Scores(r.label, r.quant, count, agree[j] / count, kl[j] / count,
               math.exp(nll[j] / count), math.exp(nll[j] / count) / ppl_ref, r.seconds)
        for j, r in enumerate(candidates)
    )
    return EvalResult(METHOD, count, segments, chunk, ref_scores, cands)


def encode_text(reference: Path, text: str) -> list[int]:
    """The text's token ids by the reference export's tokenizer.json (no BOS)."""
    path = Path(reference) / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"{reference} has no tokenizer.json: --text needs an export made from a checkpoint with a tokenizer")
    from tokenizers import Tokenizer

    return list(Tokenizer.from_file(str(path)).encode(text, add_special_tokens=False).ids)


def cpython_docs_text() -> str:
    """Human-written English shipped with CPython: the documentation topics of pydoc, in key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


CALIBRATION_TOKENS = 2048


def calibration_ids(reference: Path, tokens: int = CALIBRATION_TOKENS) -> tuple[list[int], str]:
    """Calibration token ids and their description: the LAST `tokens` tokens of CPython's docs text
    (the same encoding of pydoc_data.topics as the evaluation), which evaluation never reaches: it
    scores the first DEFAULT_MAX_TOKENS tokens and the text has ~112k; checked here."""
    ids = encode_text(reference, cpython_docs_text())
    if len(ids) < tokens + 4 * DEFAULT_MAX_TOKENS:
        raise ExportError(f"CPython's docs text has {len(ids)} tokens: too few to keep calibration apart from evaluation")
    return ids[-tokens:], f"pydoc_data.topics, last {tokens} of {len(ids)} tokens (evaluation scores the first ones)"


def collect_importance(folder: Path, ids: Sequence[int], threads: int | None = None) -> dict[str, np.ndarray]:
    """Weight initializer name -> mean x^2 per input channel of its MatMul, over `ids` run through
    the export in `folder` (an fp32 export) under teacher forcing, in segments and chunks as eval."""
    from .passes.calibrate import InputStats, accumulate, importance

    runner = _Runner(Path(folder), threads, calibrate=True)
    m = runner.manifest
    stats = InputStats()
    for segment in _segments(list(ids), m.tokens.bos, m.max_context):
        runner.cache.reset()
        for first in range(0, len(segment), m.prefill_chunk):
            piece = segment[first:first + m.prefill_chunk]
            runner.chunk_logits(piece, first, m.prefill_chunk)
            accumulate(stats, runner.last_extra, len(piece))
    return importance(stats, runner.calibration_inputs)


def format_table(result: EvalResult) -> str:
    lines = [f"method: {result.method}",
             f"tokens: {result.tokens} predictions in {result.segments} segment(s), chunks of {result.chunk}",
             f"{'export':<40} {'quant':<6} {'top-1':>7} {'KL(ref||q)':>11} {'ppl':>9} {'ratio':>7} {'time':>7}"]
    rows = [result.reference, *result.candidates]
    for s in rows:
        top1 = "ref" if s is result.reference else f"{100 * s.top1:6.2f}%"
        kl = "" if s is result.reference else f"{s.kl:.5f}"
        lines.append(f"{s.folder[-40:]:<40} {s.quant:<6} {top1:>7} {kl:>11} {s.ppl:9.3f} {s.ppl_ratio:7.4f} {s.seconds:6.1f}s")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gemma-export eval", description="Teacher-forced comparison of exports with a reference export.")
    p.add_argument("exports", metavar="OUT", nargs="+", type=Path, help="export folder(s) to score")
    p.add_argument("--reference", required=True, type=Path, help="reference export (usually --quant fp32)")
    p.add_argument("--text", required=True, type=Path, help="UTF-8 text file to score on")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help=f"tokens of the text to score (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    if args.max_tokens < 2:
        raise ExportError(f"--max-tokens must be at least 2, got {args.max_tokens}")
    try:
        text = args.text.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ExportError(f"cannot read --text {args.text}: {err}") from err
    from gemma_runtime.errors import GemmaRuntimeError

    try:
        ids = encode_text(args.reference, text)[: args.max_tokens]
        result = evaluate_ids(args.reference, args.exports, ids, threads=args.threads, progress=not args.json)
    except GemmaRuntimeError as err:
        raise ExportError(str(err)) from err
    if len(ids) < args.max_tokens:
        print(f"gemma-export eval: note: {args.text} has only {len(ids)} tokens (asked for {args.max_tokens})", file=sys.stderr)
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_table(result))
    return 0
