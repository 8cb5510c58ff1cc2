"""Load an export folder and generate text with one onnxruntime session over the decoder.

The decoder graph's chunk dimension T is symbolic: prefill runs it with T = prefill_chunk (the
last, shorter chunk unpadded; padded to T with `valid` = real count where T is static) and decode
with T = 1, so prefill and decode share one session and one in-memory copy of the weights.
Inputs and outputs are bound once to preallocated buffers (decoder_binding.py): a decode step
copies neither the KV cache nor the weights and allocates nothing.
Sampling: sampling.py; chat template: chat_template.py; KV reuse across calls: prompt_cache.py;
providers: providers.py; sessions and the optimized-graph cache: session_cache.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .chat_template import ChatTemplate, read_template
from .decoder_binding import DecoderBinding
from .detokenize import StreamDecoder
from .errors import (
    ContextLengthError,
    GemmaRuntimeError,
    IntegrityError,
    InvalidArgumentError,
    TokenizerMissingError,
    UnsupportedContentError,
)
from .generation_config import GenerationDefaults, read_generation_defaults
from .integrity import verify_files
from .kv_cache import KVCache
from .manifest import KV_BLOCKS, KV_IN_PLACE, KV_LAYOUTS, KV_SHARED_BUFFER, KV_SHARED_WINDOWED, Manifest, ManifestError, read_manifest
from .multimodal import MediaEncoders, as_list, collect_media, expand_placeholders
from .prompt_cache import PromptCache
from .providers import resolve_provider
from .sampling import Sampler, SamplingConfig, greedy
from .load_pages import release as release_load_pages
from .session_cache import CACHED_GRAPH, cached_graph_data, graph_cache_key, open_session
from .stop_strings import StopStrings, check_stop_strings
from .tables import HostTableReader, table_input_arrays

TOKENIZER_FILE = "tokenizer.json"
DEFAULT_MAX_NEW_TOKENS = 128
# Graph input/output element types this runtime feeds and reads.
_ORT_TYPES = {"float32": "tensor(float)", "int64": "tensor(int64)", "bool": "tensor(bool)", "int8": "tensor(int8)"}
# Why a generation ended (GenerationStats.stop_reason).
STOP_TOKEN, STOP_STRING, MAX_NEW_TOKENS, CONTEXT_FULL, ABANDONED = (
    "stop_token", "stop_string", "max_new_tokens", "context_full", "abandoned")


@dataclass(frozen=True)
class GenerationStats:
    """Timings of the last generate/generate_ids/chat call (model time only, not the caller's)."""

    prompt_tokens: int
    prefill_seconds: float
    decode_tokens: int  # tokens produced by decode steps (the first new token comes from prefill)
    decode_seconds: float
    time_to_first_token: float | None  # from the call to the first new token; None if none
    reused_tokens: int = 0  # prompt tokens whose KV rows were kept from the previous call (not prefilled)
    stop_reason: str | None = None  # stop_token | stop_string | max_new_tokens | context_full | abandoned

    @property
    def prefilled_tokens(self) -> int:
        return self.prompt_tokens - self.reused_tokens

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prefilled_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0


class Model:
    """A loaded export folder. Not thread-safe: one generation at a time per Model.

    KV reuse: the model remembers which ids its cache holds. A call with reuse_cache=True
    (the default of `chat`) keeps the rows of the longest prefix it can keep exactly (see
    prompt_cache.py) and prefills only the rest; `last_stats.reused_tokens` says how many.
    `generate` and `generate_ids` prefill from scratch unless reuse_cache=True. A call with images
    or audio never reuses rows and leaves nothing to reuse (the same placeholder ids stand for
    different pictures and sounds), so the call after it prefills from scratch.

    Images and audio (Gemma 3n exports with vision.onnx/audio.onnx): the encoder sessions are
    created on the first call that needs them, so text-only use never pays their memory.
    """

    def __init__(self, folder: Path, manifest: Manifest, session: ort.InferenceSession,
                 embed: HostTableReader, per_layer: HostTableReader | None, provider: str,
                 defaults: GenerationDefaults | None = None, session_source: str = "graph",
                 threads: int | None = None, io_binding: bool = True, graph_cache: bool = False,
                 table_inputs: tuple[tuple[str, np.ndarray], ...] = ()):
        # Use Model.load: it checks the folder before anything is built.
        self.folder = folder
        self.manifest = manifest
        self.provider = provider
        self.session_source = session_source  # "graph" | "cached optimized graph" | ...
        self.defaults = defaults or GenerationDefaults(SamplingConfig(), None)
        self.last_stats: GenerationStats | None = None
        self._session = session
        self._embed = embed
        self._per_layer = per_layer
        self._table_inputs = dict(table_inputs)  # graph inputs over host-table memory (manifest.table_inputs)
        self._steps_since_release = 0  # _release_table_pages
        self._cache = KVCache(manifest.caches)
        self._in_place = manifest.kv_layout in KV_IN_PLACE  # the graph writes the cache itself
        self._prompt_cache = PromptCache(self._cache, manifest.sliding_window, sliding=_SLIDING_BUFFERS[manifest.kv_layout])
        self._outputs = ["logits", *self._cache.output_names()]
        # io_binding=False: plain session.run with a feed dict and fresh outputs per step (the
        # loop before IOBinding, kept for benchmarks: bench/decode_profile.py --loop feeds).
        self._binding = None
        if io_binding:
            pli = manifest.per_layer_inputs
            self._binding = DecoderBinding(session, self._cache, manifest.hidden_size, manifest.vocab_size,
                                           manifest.prefill_chunk, None if pli is None else (pli.num_layers, pli.dim),
                                           in_place=self._in_place, fixed_inputs=table_inputs)
        self._stop = frozenset(manifest.tokens.stop)
        self._tokenizer = None
        self._template: ChatTemplate | None = None
        self._generation = 0  # bumped per call, so a stale stream cannot use a reset cache
        self._media = MediaEncoders(folder, manifest, provider, threads, graph_cache=graph_cache)
        self._cache_has_media = False  # the cached rows came from a call with images/audio
        embeds = next((t for t in manifest.graphs["decoder"].inputs if t.name == "inputs_embeds"), None)
        self._symbolic_chunk = embeds is not None and len(embeds.shape) == 3 and isinstance(embeds.shape[1], str)
        if self._in_place and not self._symbolic_chunk:
            # padding rows would be written into the buffers, past the valid positions
            raise ManifestError(f"kv_layout {manifest.kv_layout} needs a decoder with a symbolic chunk length")

    # ---- loading -------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path, provider: str | None = None, threads: int | None = None,
             graph_cache: bool = False, io_binding: bool = True) -> "Model":
        """provider: cpu | cuda | openvino | qnn | dml | coreml (or onnxruntime's own name);
        default: the first of the export target's providers that this onnxruntime has.
        graph_cache: keep onnxruntime's optimized graph in the runtime's cache folder
        (~/.cache/gemma_runtime or $GEMMA_RUNTIME_CACHE_DIR). io_binding=False: the plain
        session.run loop instead of the bound buffers (for comparison benchmarks)."""
        folder = Path(path)
        manifest = read_manifest(folder)
        if cls is Model and "decoder" not in manifest.graphs and {"prefill", "decode"} <= manifest.graphs.keys():
            # static NPU graphs (gemma-export --target qnn-htp): two sessions, host rope and masks
            from .npu_decoder import NpuModel  # it imports this module: not at the top

            return NpuModel.load(folder, provider=provider, threads=threads, graph_cache=graph_cache,
                                 io_binding=io_binding)
        _check_manifest(manifest)
        _check_onnxruntime_version(manifest)
        provider = resolve_provider(provider, manifest.target, manifest.providers)
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise InvalidArgumentError(f"threads must be a positive integer, got {threads!r}")
        # Checksums before any session or memory map: a broken file must not be half-loaded.
        verify_files(folder, manifest.files, drop_cache=manifest.table_files)
        defaults = read_generation_defaults(folder)
        embed = HostTableReader.open(folder, "embed_tokens", manifest.tables["embed_tokens"])
        per_layer = None
        if manifest.per_layer_inputs is not None:
            per_layer = HostTableReader.open(
                folder, "per_layer", manifest.tables["per_layer"], row0_from=manifest.per_layer_inputs.vocab_size
            )
        graph = manifest.graphs["decoder"]
        key = None
        if graph_cache:
            key = graph_cache_key(manifest.files[graph.file], manifest.files.get(graph.data_file), provider)
        session, source = open_session(folder / graph.file, provider, threads, key)
        _check_session(session, manifest)
        # the weights' pages that only prepacking read leave the resident set (load_pages.py)
        release_load_pages(cached_graph_data(key) if source == CACHED_GRAPH else folder / graph.data_file
                           if graph.data_file else None)
        fixed = _table_inputs(manifest, embed, per_layer)
        return cls(folder, manifest, session, embed, per_layer, provider, defaults, source, threads, io_binding,
                   graph_cache=graph_cache, table_inputs=fixed)

    def reset(self) -> None:
        """Forget the cached conversation: the next call prefills from scratch."""
        self._generation += 1
        self._prompt_cache.invalidate()
        self._cache.reset()

    # ---- text in / text out --------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Prompt ids: the tokenizer's encoding with BOS in front (no chat template)."""
        ids = list(self._get_tokenizer().encode(text).ids)
        bos = self.manifest.tokens.bos
        if add_bos and bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._get_tokenizer().decode(list(ids), skip_special_tokens=False)

    def generate(self, prompt: str, max_new_tokens: int | None = None, stream: bool = False,
                 images=None, audio=None, *, stop: str | Sequence[str] | None = None,
                 reuse_cache: bool = False, **sampling):
        """The raw completion of `prompt` (BOS added, no chat template; without the stop
        token's text, cut before the first stop string), or with stream=True an iterator of
        text pieces that never split a character. Sampling defaults: generation_config.json."""
        if not isinstance(prompt, str):
            raise InvalidArgumentError(f"prompt must be a string, got {type(prompt).__name__}")
        if not prompt:
            raise InvalidArgumentError(
                "the prompt is empty; give some text (for unconditional generation use "
                "generate_ids([bos]))"
            )
        config = self.defaults.sampling.override(**sampling)
        images, audio = as_list(images, "image"), as_list(audio, "audio")
        if images or audio:  # the prompt's soft tokens become the processor's full placeholder runs
            ids = list(self._get_tokenizer().encode(self._expand(prompt, images, audio), add_special_tokens=False).ids)
            bos = self.manifest.tokens.bos
            if bos is not None and (not ids or ids[0] != bos):
                ids.insert(0, bos)
        else:
            ids = self.encode(prompt)
        return self._text(ids, max_new_tokens, stream, stop, config, reuse_cache, images, audio)

    def chat(self, messages: Sequence[Mapping], max_new_tokens: int | None = None, stream: bool = False,
             *, stop: str | Sequence[str] | None = None, reuse_cache: bool = True, **sampling):
        """The model's answer to a conversation ([{"role": "system"|"user"|"assistant",
        "content": str | [{"type": "text", "text": ...}]}], rendered with the checkpoint's
        chat template): a str, or with stream=True an iterator of text pieces. Parts
        {"type": "image", "image": path | PIL.Image} and {"type": "audio", "audio": path |
        (array, sample_rate)} work on exports with encoders: each becomes the processor's
        placeholder run (boi + 256 image tokens + eoi, boa + 188 audio tokens + eoa).

        The cache of the previous call is reused where the new prompt extends it exactly
        (last_stats.reused_tokens). A conversation longer than the context (max_context) is a
        ContextLengthError naming the limit: nothing is dropped silently; the caller decides
        which turns to drop (the CLI asks the user to /reset)."""
        ids = self.chat_ids(messages)
        images, audio = collect_media(messages)
        config = self.defaults.sampling.override(**sampling)
        return self._text(ids, max_new_tokens, stream, stop, config, reuse_cache, images, audio)

    def render_chat(self, messages: Sequence[Mapping], add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation (the chat template's output)."""
        if self._template is None:
            tok = self._get_tokenizer()
            t = self.manifest.tokens
            name = lambda i: tok.id_to_token(i) if i is not None else None  # noqa: E731
            source, origin = read_template(self.folder)
            self._template = ChatTemplate(source, origin, {
                "bos_token": name(t.bos) or "", "eos_token": name(t.eos) or "", "pad_token": name(t.pad),
                "image_token": name(t.image) or "", "audio_token": name(t.audio) or "",
            })
        media = tuple(k for k in ("image", "audio") if self._media.has(k))
        return self._template.render(messages, add_generation_prompt, media=media)

    def chat_ids(self, messages: Sequence[Mapping]) -> list[int]:
        """Prompt ids of a conversation: the rendered template, tokenized without adding
        special tokens (the template writes BOS itself)."""
        text = self.render_chat(messages)
        images, audio = collect_media(messages)
        if images or audio:
            text = self._expand(text, images, audio)
        return list(self._get_tokenizer().encode(text, add_special_tokens=False).ids)

    def _expand(self, text: str, images: list, audio: list) -> str:
        """Gemma3nProcessor's placeholder expansion of the image/audio soft tokens in `text`."""
        for kind, items in (("image", images), ("audio", audio)):
            if items and not self._media.has(kind):
                raise UnsupportedContentError(
                    f"{kind}s are not supported by this export: it has no {'vision' if kind == 'image' else 'audio'} "
                    f"graph (a text model, or exported with --text-only)")
        tok = self._get_tokenizer()
        t = self.manifest.tokens
        names = {k: (tok.id_to_token(getattr(t, k)) if getattr(t, k) is not None else None)
                 for k in ("image", "audio", "boi", "eoi", "boa", "eoa")}
        counts = {k: self._media.soft_tokens(k) for k in ("image", "audio") if self._media.has(k)}
        return expand_placeholders(text, names, counts)

    def _text(self, ids, max_new_tokens, stream, stop, config, reuse_cache, images=(), audio=()):
        stops = check_stop_strings(stop)
        tokens = self._generate(ids, max_new_tokens, config, reuse_cache, images, audio)  # checks the prompt now
        pieces = self._stream(tokens, stops)
        return pieces if stream else "".join(pieces)

    def _stream(self, tokens: Iterator[int], stops: tuple[str, ...]) -> Iterator[str]:
        decoder = StreamDecoder(self.decode)
        cut = StopStrings(stops)
        for token in tokens:
            if token in self._stop:
                continue  # always the last one; keep iterating so the stats are recorded
            piece = cut.push(decoder.push(token))
            if piece:
                yield piece
            if cut.stopped:
                tokens.close()  # ends the generation now; its stats are recorded on close
                self.last_stats = dataclasses.replace(self.last_stats, stop_reason=STOP_STRING)
                return
        rest = cut.push(decoder.finish())
        rest += cut.finish()
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

    def generate_ids(self, prompt_ids: Sequence[int], max_new_tokens: int | None = None, images=None,
                     audio=None, *, reuse_cache: bool = False, **sampling) -> list[int]:
        """New ids for `prompt_ids`, ending with the stop token when one was generated.
        Greedy unless sampling arguments (temperature, top_k, ...) are given. images (paths or
        PIL images) and audio (paths or (array, sample_rate)) fill the prompt's placeholder runs
        in order: one run of image ids per image, of audio ids per clip, as the processor writes
        them; a count that differs is a MediaError."""
        config = SamplingConfig().override(**sampling)
        return list(self._generate(prompt_ids, max_new_tokens, config, reuse_cache,
                                   as_list(images, "image"), as_list(audio, "audio")))

    @property
    def loaded_encoders(self) -> tuple[str, ...]:
        """The encoder graphs with a session so far ("vision", "audio")."""
        return self._media.loaded

    @property
    def encoder_sources(self) -> dict[str, str]:
        """Encoder graph -> how its session was made, as session_source says for the decoder
        ("graph"; with graph_cache on qnn "EP context compiled and saved" | "cached EP context")."""
        return dict(self._media.sources)

    def _generate(self, prompt_ids: Sequence[int], max_new_tokens: int | None,
                  config: SamplingConfig = SamplingConfig(), reuse_cache: bool = False,
                  images: Sequence = (), audio: Sequence = ()) -> Iterator[int]:
        ids = np.asarray(list(prompt_ids), dtype=np.int64)
        limit = self.manifest.max_context
        if ids.ndim != 1 or ids.size == 0 or ids.size >= limit:
            raise ContextLengthError(
                f"the prompt has {ids.size} tokens; it must have at least 1 and fewer than the "
                f"context limit of {limit} tokens (max_context of this export)"
            )
        if max_new_tokens is None:
            max_new_tokens = self.defaults.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
            raise InvalidArgumentError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        vocab_rows = self.manifest.tables["embed_tokens"].shape[0]
        if ids.min() < 0 or ids.max() >= vocab_rows:
            raise InvalidArgumentError(
                f"prompt ids must lie in [0, {vocab_rows}), got {int(ids.min())}..{int(ids.max())}")
        soft = self._media.soft_rows(ids, list(images), list(audio))  # runs the encoders (checked first)
        self._generation += 1
        return self._run_generation(ids, int(max_new_tokens), self._generation, config, reuse_cache, soft)

    def _run_generation(self, ids: np.ndarray, max_new_tokens: int, generation: int,
                        config: SamplingConfig, reuse_cache: bool, soft=None) -> Iterator[int]:
        start = time.perf_counter()
        n = int(ids.size)
        prefill_s = decode_s = 0.0
        ttft = None
        produced = reused = 0
        reason = ABANDONED
        sampler = None if config.plain_greedy else Sampler(config, self.manifest.vocab_size, ids.tolist())
        choose = (lambda logits: greedy(logits)) if sampler is None else sampler.choose
        cache = self._prompt_cache
        try:
            if max_new_tokens == 0:
                reason = MAX_NEW_TOKENS
                return
            try:
                if self._cache_has_media or soft is not None:
                    cache.invalidate()  # placeholder ids do not say which image/clip made the rows
                    self._cache_has_media = soft is not None
                reused = cache.plan(ids.tolist()) if reuse_cache and soft is None else 0
                cache.prepare(ids.tolist(), reused)
                chunk = self.manifest.prefill_chunk
                for first in range(reused, n, chunk):
                    # A symbolic chunk dimension runs the last, short chunk unpadded (a small
                    # new turn after a reused cache costs its own length, not a whole chunk).
                    size = min(chunk, n - first) if self._symbolic_chunk else chunk
                    logits = self._forward(ids[first : first + chunk], first, size, soft)
                    cache.fed(ids[first : first + chunk])
                cache.mark()
            except BaseException:
                cache.invalidate()
                raise
            prefill_s = time.perf_counter() - start
            token = choose(logits)
            ttft = time.perf_counter() - start
            produced = 1
            yield token
            # The sequence (prompt + new) may fill the context; the last new token is never fed.
            while True:
                if token in self._stop:
                    reason = STOP_TOKEN
                    break
                if produced >= max_new_tokens:
                    reason = MAX_NEW_TOKENS
                    break
                if n + produced >= self.manifest.max_context:
                    reason = CONTEXT_FULL
                    break
                if generation != self._generation:
                    raise GemmaRuntimeError("another generation started on this Model while this one was streaming")
                t = time.perf_counter()
                try:
                    logits = self._forward(np.array([token], dtype=np.int64), n + produced - 1, 1)
                    cache.fed([token])
                except BaseException:
                    cache.invalidate()
                    raise
                if sampler is not None:
                    sampler.observe(token)
                token = choose(logits)
                decode_s += time.perf_counter() - t
                produced += 1
                yield token
        finally:
            self.last_stats = GenerationStats(n, prefill_s, max(produced - 1, 0), decode_s, ttft, reused, reason)

    def _step(self, ids: np.ndarray, position: int, chunk: int) -> np.ndarray:
        """Run the decoder on up to `chunk` ids starting at `position`; store their KV rows.
        For callers that drive the cache themselves (parity tests): the remembered cached ids
        are forgotten, so a later reuse_cache call prefills from scratch. Returns a copy (the
        loop's logits buffer is overwritten by the next step)."""
        self._prompt_cache.invalidate()
        return self._forward(ids, position, chunk).copy()

    def _forward(self, ids: np.ndarray, position: int, chunk: int, soft=None) -> np.ndarray:
        """Logits [1, V] of the last valid id; the KV rows of the valid ids are stored. With
        IOBinding the logits are the binding's buffer, valid until the next call."""
        if self._in_place:  # never padded: the op would take padding rows for tokens and keep them
            chunk = int(ids.size)
        if self._binding is None:
            return self._forward_feeds(ids, position, chunk, soft)
        valid = int(ids.size)
        io = self._binding.chunk(chunk)
        self._fill_inputs(ids, position, soft, io.embeds, io.per_layer)
        io.position[0] = position
        io.valid[0] = valid
        self._binding.run(io)
        if not self._in_place:
            for index in range(len(self._cache.specs)):
                self._cache.write(index, io.new_keys[index], io.new_values[index], position, valid)
        self._release_table_pages(chunk)
        return io.logits

    # host-table pages are dropped after every prefill chunk and every this many decode steps (a
    # rescored LM head gathers 512 rows of the token table a step). E2B-shaped int4 --lm-head 4 at
    # 4080 positions (bench/full_size_random.py --prompt-tokens 4064 --cold): peak RSS 2.42 GiB
    # without, 2.34 every 16 steps, 2.30 every 4; Gemma 3 270M --lm-head 4 decode: 0.98x every 4
    # steps, 0.93x every step
    TABLE_RELEASE_STEPS = 4

    def _release_table_pages(self, chunk: int) -> None:
        self._steps_since_release += 1
        if chunk > 1 or self._steps_since_release >= self.TABLE_RELEASE_STEPS:
            self._steps_since_release = 0
            for table in (self._embed, self._per_layer):
                if table is not None:
                    table.release_pages()

    def _fill_inputs(self, ids: np.ndarray, position: int, soft, embeds: np.ndarray,
                     per_layer: np.ndarray | None) -> None:
        """Host rows of `ids` into embeds [1,T,H] (and per_layer [1,T,L,P]), in place; padding
        rows are zeros: finite, and the graph masks them by `valid`."""
        valid = int(ids.size)
        self._embed.lookup(ids, out=embeds[0, :valid])
        embeds[0, valid:] = 0.0
        if soft is not None:  # encoder outputs at the placeholder positions of this chunk
            positions, rows = soft
            here = (positions >= position) & (positions < position + valid)
            embeds[0, positions[here] - position] = rows[here]
        if per_layer is not None:
            flat = per_layer.reshape(per_layer.shape[1], -1)  # a view: the buffer is contiguous
            self._per_layer.lookup(ids, out=flat[:valid])
            flat[valid:] = 0.0

    def _forward_feeds(self, ids: np.ndarray, position: int, chunk: int, soft=None) -> np.ndarray:
        valid = int(ids.size)
        embeds = np.empty((1, chunk, self.manifest.hidden_size), dtype=np.float32)
        per_layer = None
        if self._per_layer is not None:
            pli = self.manifest.per_layer_inputs
            per_layer = np.empty((1, chunk, pli.num_layers, pli.dim), dtype=np.float32)
        self._fill_inputs(ids, position, soft, embeds, per_layer)
        feeds = {
            "inputs_embeds": embeds,
            "position": np.array([position], dtype=np.int64),
            "valid": np.array([valid], dtype=np.int64),
            **self._cache.feeds(),
            **self._table_inputs,
        }
        if per_layer is not None:
            feeds["per_layer_inputs"] = per_layer
        logits, *new_rows = self._session.run(self._outputs, feeds)
        self._cache.store_outputs(new_rows, position, valid, whole_buffers=self._in_place)
        return logits


# ---- load-time checks ------------------------------------------------------------------------

# how each kv_layout keeps its sliding layers' buffers (prompt_cache.PromptCache)
_SLIDING_BUFFERS = {KV_BLOCKS: "rings", KV_SHARED_BUFFER: "linear", KV_SHARED_WINDOWED: "windowed"}


def _check_manifest(m: Manifest) -> None:
    """Catch an export this runtime would misread before anything is hashed or loaded."""
    if m.kv_layout not in KV_LAYOUTS:
        raise ManifestError(
            f"kv_layout {m.kv_layout!r} is not supported by this runtime (it runs {', '.join(KV_LAYOUTS)}); "
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
        linear = m.kv_layout == KV_SHARED_BUFFER or (m.kv_layout == KV_SHARED_WINDOWED and spec.kind == "global")
        if linear and spec.length < m.max_context:
            raise ManifestError(
                f"kv_layout {m.kv_layout}: the cache of layer {spec.layer} holds {spec.length} positions, "
                f"fewer than max_context {m.max_context} (its buffers are linear)"
            )
        if m.kv_layout == KV_SHARED_WINDOWED and spec.kind == "sliding" and spec.length < (m.sliding_window or 0):
            raise ManifestError(
                f"kv_layout {m.kv_layout}: the sliding cache of layer {spec.layer} holds {spec.length} positions, "
                f"fewer than the window {m.sliding_window}"
            )
        if spec.kind == "global" and spec.length < m.max_context:
            raise ManifestError(
                f"global cache of layer {spec.layer} holds {spec.length} positions, fewer than max_context {m.max_context}"
            )
    # Every file the runtime opens must carry a checksum, or verification would be a gap.
    needed = [f for g in m.graphs.values() for f in (g.file, g.data_file)] + [t.file for t in m.tables.values()]
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


def _table_inputs(m: Manifest, *tables: HostTableReader | None) -> tuple[tuple[str, np.ndarray], ...]:
    """The arrays of manifest.table_inputs, checked against the decoder's declared inputs."""
    arrays = table_input_arrays(m.table_inputs, *tables)
    declared = {t.name: t for t in m.graphs["decoder"].inputs}
    for name, array in arrays:
        spec = declared[name]  # _check_session made sure it is declared
        if array.dtype.name != spec.dtype or tuple(array.shape) != tuple(spec.shape):
            raise ManifestError(f"graph input {name!r} is {spec.dtype} {list(spec.shape)}, its table part "
                                f"{m.table_inputs[name]!r} is {array.dtype.name} {list(array.shape)}: re-export")
    return arrays


def _check_session(session: ort.InferenceSession, m: Manifest) -> None:
    """The graph must have the inputs and outputs this runtime feeds, with the types it feeds."""
    want_in = {"inputs_embeds": "float32", "position": "int64", "valid": "int64"}
    if m.per_layer_inputs is not None:
        want_in["per_layer_inputs"] = "float32"
    decoder_inputs = {t.name: t.dtype for t in m.graphs["decoder"].inputs}
    for name in m.table_inputs:
        if name not in decoder_inputs:
            raise ManifestError(f"manifest binds {name!r} to a host table, but the decoder's manifest inputs lack it")
        want_in[name] = decoder_inputs[name]
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
