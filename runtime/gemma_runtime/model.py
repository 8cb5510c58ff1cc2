"""Load an export folder and generate text with one onnxruntime session over the decoder.

The decoder graph's chunk dimension T is symbolic: prefill runs it with T = prefill_chunk
(the last chunk padded, `valid` = real count) and decode with T = 1, so prefill and decode
share one session and one in-memory copy of the weights.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .detokenize import StreamDecoder
from .errors import ContextLengthError, GemmaRuntimeError, IntegrityError, ProviderError, TokenizerMissingError
from .integrity import verify_files
from .kv_cache import KVCache
from .manifest import Manifest, ManifestError, read_manifest
from .sampling import greedy
from .tables import HostTableReader

KV_LAYOUT = "past_and_new_blocks"
DEFAULT_PROVIDER = "CPUExecutionProvider"
TOKENIZER_FILE = "tokenizer.json"
DEFAULT_MAX_NEW_TOKENS = 128
# Graph input/output element types this runtime feeds and reads.
_ORT_TYPES = {"float32": "tensor(float)", "int64": "tensor(int64)"}


@dataclass(frozen=True)
class GenerationStats:
    """Timings of the last generate/generate_ids call (model time only, not the caller's)."""

    prompt_tokens: int
    prefill_seconds: float
    decode_tokens: int  # tokens produced by decode steps (the first new token comes from prefill)
    decode_seconds: float
    time_to_first_token: float | None  # from the call to the first new token; None if none

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0


class Model:
    """A loaded export folder. Not thread-safe: one generation at a time per Model."""

    def __init__(self, folder: Path, manifest: Manifest, session: ort.InferenceSession,
                 embed: HostTableReader, per_layer: HostTableReader | None, provider: str):
        # Use Model.load: it checks the folder before anything is built.
        self.folder = folder
        self.manifest = manifest
        self.provider = provider
        self.last_stats: GenerationStats | None = None
        self._session = session
        self._embed = embed
        self._per_layer = per_layer
        self._cache = KVCache(manifest.caches)
        self._outputs = ["logits", *self._cache.output_names()]
        self._stop = frozenset(manifest.tokens.stop)
        self._tokenizer = None
        self._generation = 0  # bumped per call, so a stale stream cannot use a reset cache

    # ---- loading -------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path, provider: str | None = None, threads: int | None = None) -> "Model":
        folder = Path(path)
        manifest = read_manifest(folder)
        _check_manifest(manifest)
        _check_onnxruntime_version(manifest)
        provider = _pick_provider(provider)
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        # Checksums before any session or memory map: a broken file must not be half-loaded.
        verify_files(folder, manifest.files)
        embed = HostTableReader.open(folder, "embed_tokens", manifest.tables["embed_tokens"])
        per_layer = None
        if manifest.per_layer_inputs is not None:
            per_layer = HostTableReader.open(
                folder, "per_layer", manifest.tables["per_layer"], row0_from=manifest.per_layer_inputs.vocab_size
            )
        session = _open_session(folder, manifest, provider, threads)
        _check_session(session, manifest)
        return cls(folder, manifest, session, embed, per_layer, provider)

    # ---- text in / text out --------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Prompt ids: the tokenizer's encoding with BOS in front (no chat template)."""
        ids = list(self._get_tokenizer().encode(text).ids)
        bos = self.manifest.tokens.bos
        if bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._get_tokenizer().decode(list(ids), skip_special_tokens=False)

    def generate(self, prompt: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, stream: bool = False):
        """The raw completion of `prompt` (without the stop token's text), or with
        stream=True an iterator of text pieces that never split a character."""
        ids = self.encode(prompt)
        tokens = self._generate(ids, max_new_tokens)  # checks the prompt now, not on first next()
        if stream:
            return self._stream(tokens)
        return self.decode([t for t in tokens if t not in self._stop])

    def _stream(self, tokens: Iterator[int]) -> Iterator[str]:
        decoder = StreamDecoder(self.decode)
        for token in tokens:
            if token in self._stop:
                continue  # always the last one; keep iterating so the stats are recorded
            piece = decoder.push(token)
            if piece:
                yield piece
        rest = decoder.finish()
        if rest:
            yield rest

    def _get_tokenizer(self):
        if self._tokenizer is None:
            path = self.folder / TOKENIZER_FILE
            if not path.is_file():
                raise TokenizerMissingError(
                    f"{self.folder} has no {TOKENIZER_FILE}: the checkpoint had no tokenizer files, so "
                    f"text generation is not possible; use Model.generate_ids with token ids instead"
                )
            from tokenizers import Tokenizer  # only text users pay for the import

            try:
                self._tokenizer = Tokenizer.from_file(str(path))
            except Exception as err:  # tokenizers raises plain Exception on a bad file
                raise GemmaRuntimeError(f"{path} cannot be read by tokenizers: {err}") from err
        return self._tokenizer

    # ---- ids in / ids out ----------------------------------------------------------------

    def generate_ids(self, prompt_ids: Sequence[int], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> list[int]:
        """Greedy new ids for `prompt_ids`, ending with the stop token when one was generated."""
        return list(self._generate(prompt_ids, max_new_tokens))

    def _generate(self, prompt_ids: Sequence[int], max_new_tokens: int) -> Iterator[int]:
        ids = np.asarray(list(prompt_ids), dtype=np.int64)
        limit = self.manifest.max_context
        if ids.ndim != 1 or ids.size == 0 or ids.size >= limit:
            raise ContextLengthError(
                f"the prompt has {ids.size} tokens; it must have at least 1 and fewer than the "
                f"context limit of {limit} tokens (max_context of this export)"
            )
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        vocab_rows = self.manifest.tables["embed_tokens"].shape[0]
        if ids.min() < 0 or ids.max() >= vocab_rows:
            raise ValueError(f"prompt ids must lie in [0, {vocab_rows}), got {int(ids.min())}..{int(ids.max())}")
        self._generation += 1
        return self._run_generation(ids, max_new_tokens, self._generation)

    def _run_generation(self, ids: np.ndarray, max_new_tokens: int, generation: int) -> Iterator[int]:
        start = time.perf_counter()
        n = int(ids.size)
        prefill_s = decode_s = 0.0
        ttft = None
        produced = 0
        try:
            if max_new_tokens == 0:
                return
            self._cache.reset()
            chunk = self.manifest.prefill_chunk
            for first in range(0, n, chunk):
                logits = self._step(ids[first : first + chunk], first, chunk)
            prefill_s = time.perf_counter() - start
            token = greedy(logits)
            ttft = time.perf_counter() - start
            produced = 1
            yield token
            # The sequence (prompt + new) may fill the context; the last new token is never fed.
            while token not in self._stop and produced < max_new_tokens and n + produced < self.manifest.max_context:
                if generation != self._generation:
                    raise GemmaRuntimeError("another generation started on this Model while this one was streaming")
                t = time.perf_counter()
                logits = self._step(np.array([token], dtype=np.int64), n + produced - 1, 1)
                token = greedy(logits)
                decode_s += time.perf_counter() - t
                produced += 1
                yield token
        finally:
            self.last_stats = GenerationStats(n, prefill_s, max(produced - 1, 0), decode_s, ttft)

    def _step(self, ids: np.ndarray, position: int, chunk: int) -> np.ndarray:
        """Run the decoder on up to `chunk` ids starting at `position`; store their KV rows."""
        valid = int(ids.size)
        hidden = self.manifest.hidden_size
        # Padding rows are zeros: finite, and the graph masks them by `valid`.
        embeds = np.zeros((1, chunk, hidden), dtype=np.float32)
        embeds[0, :valid] = self._embed.lookup(ids)
        feeds = {
            "inputs_embeds": embeds,
            "position": np.array([position], dtype=np.int64),
            "valid": np.array([valid], dtype=np.int64),
            **self._cache.feeds(),
        }
        if self._per_layer is not None:
            pli = self.manifest.per_layer_inputs
            rows = np.zeros((1, chunk, pli.num_layers, pli.dim), dtype=np.float32)
            rows[0, :valid] = self._per_layer.lookup(ids).reshape(valid, pli.num_layers, pli.dim)
            feeds["per_layer_inputs"] = rows
        logits, *new_rows = self._session.run(self._outputs, feeds)
        for index in range(len(self._cache.specs)):
            self._cache.write(index, new_rows[2 * index], new_rows[2 * index + 1], position, valid)
        return logits


# ---- load-time checks ------------------------------------------------------------------------


def _check_manifest(m: Manifest) -> None:
    """Catch an export this runtime would misread before anything is hashed or loaded."""
    if m.kv_layout != KV_LAYOUT:
        raise ManifestError(
            f"kv_layout {m.kv_layout!r} is not supported by this runtime (it runs {KV_LAYOUT!r}); "
            f"upgrade gemma-runtime or re-export for another target"
        )
    if "decoder" not in m.graphs:
        raise ManifestError(f"manifest has no 'decoder' graph (graphs: {sorted(m.graphs)})")
    if m.prefill_chunk < 1 or m.max_context < 2:
        raise ManifestError(f"prefill_chunk {m.prefill_chunk} / max_context {m.max_context} are not usable")
    if "embed_tokens" not in m.tables:
        raise ManifestError("manifest has no 'embed_tokens' table")
    if m.tables["embed_tokens"].shape[1] != m.hidden_size:
        raise ManifestError(
            f"embed_tokens rows have {m.tables['embed_tokens'].shape[1]} columns, hidden_size is {m.hidden_size}"
        )
    if m.per_layer_inputs is not None:
        pli = m.per_layer_inputs
        if "per_layer" not in m.tables:
            raise ManifestError("manifest has per_layer_inputs but no 'per_layer' table")
        if m.tables["per_layer"].shape[1] != pli.num_layers * pli.dim:
            raise ManifestError(
                f"per_layer rows have {m.tables['per_layer'].shape[1]} columns, expected "
                f"num_layers * dim = {pli.num_layers * pli.dim}"
            )
    for spec in m.caches:
        if spec.kind == "global" and spec.length < m.max_context:
            raise ManifestError(
                f"global cache of layer {spec.layer} holds {spec.length} positions, fewer than max_context {m.max_context}"
            )
    # Every file the runtime opens must carry a checksum, or verification would be a gap.
    graph = m.graphs["decoder"]
    needed = [graph.file, graph.data_file, *(t.file for t in m.tables.values())]
    unlisted = sorted({f for f in needed if f and f not in m.files})
    if unlisted:
        raise IntegrityError(f"manifest lists no sha256 for {', '.join(unlisted)}: re-export the model")


def _version_tuple(text: str) -> tuple[int, ...]:
    # "1.32.0", "1.17", "1.20.0.dev2024": leading digits of each part, no packaging dependency.
    parts = []
    for part in str(text).split("."):
        digits = "".join(itertools.takewhile(str.isdigit, part))
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _check_onnxruntime_version(m: Manifest) -> None:
    needs = m.provenance.get("min_onnxruntime")
    if needs and _version_tuple(ort.__version__) < _version_tuple(needs):
        raise GemmaRuntimeError(
            f"this export needs onnxruntime >= {needs}, but {ort.__version__} is installed: "
            f"pip install -U onnxruntime"
        )


def _pick_provider(provider: str | None) -> str:
    available = ort.get_available_providers()
    provider = provider or DEFAULT_PROVIDER
    if provider not in available:
        raise ProviderError(
            f"execution provider {provider!r} is not available in this onnxruntime "
            f"({ort.__version__}); available: {', '.join(available)}"
        )
    return provider


def _open_session(folder: Path, m: Manifest, provider: str, threads: int | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    path = folder / m.graphs["decoder"].file
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=[provider])
    except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
        raise GemmaRuntimeError(
            f"onnxruntime {ort.__version__} cannot load {path.name}: {str(err).splitlines()[0]}"
        ) from err
    # onnxruntime falls back to CPU with only a warning when a provider fails to initialize.
    if session.get_providers()[0] != provider:
        raise ProviderError(
            f"execution provider {provider!r} failed to initialize (onnxruntime chose {session.get_providers()}); "
            f"check its libraries and drivers"
        )
    return session


def _check_session(session: ort.InferenceSession, m: Manifest) -> None:
    """The graph must have the inputs and outputs this runtime feeds, with the types it feeds."""
    want_in = {"inputs_embeds": "float32", "position": "int64", "valid": "int64"}
    if m.per_layer_inputs is not None:
        want_in["per_layer_inputs"] = "float32"
    want_out = {"logits": "float32"}
    for spec in m.caches:
        want_in.update({spec.past_key: "float32", spec.past_value: "float32"})
        want_out.update({spec.new_key: "float32", spec.new_value: "float32"})
    for kind, have, want in (
        ("input", session.get_inputs(), want_in),
        ("output", session.get_outputs(), want_out),
    ):
        types = {arg.name: arg.type for arg in have}
        missing = sorted(set(want) - set(types))
        if kind == "input":
            extra = sorted(set(types) - set(want))
            if extra:
                raise ManifestError(f"decoder graph has inputs the runtime does not feed: {', '.join(extra)}")
        if missing:
            raise ManifestError(f"decoder graph lacks {kind}s {', '.join(missing)} that the manifest implies")
        wrong = [f"{n} is {types[n]}" for n, d in want.items() if types[n] != _ORT_TYPES[d]]
        if wrong:
            raise ManifestError(f"decoder graph {kind} types differ from the runtime's: {'; '.join(wrong)}")
