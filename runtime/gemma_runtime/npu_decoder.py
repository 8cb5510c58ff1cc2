"""Exports with static NPU decoder graphs (gemma-export --target qnn-htp): two graphs, two sessions.

    prompt chunk of n ids, 2 <= n <= T:  prefill.onnx (T = prefill_chunk), padded to T
    one id (a new token, a 1-id chunk):  decode.onnx  (T = 1)

    inputs_embeds [1,T,H] (+ per_layer_inputs [1,T,L,P])  host tables, padding rows zero
    cos.K, sin.K, mask_past.K, mask_new.K, last           npu_inputs.py, from the manifest
    past_key.N, past_value.N                              the KVCache's buffers (no copy)
      -> logits [1,V], new_key.N, new_value.N [1,KV,T,d]  the first n rows written into the
                                                          KVCache (kv_layout past_and_new_blocks)

A static-shape provider compiles each graph for its own T, so prefill and decode are separate
sessions (QNN shares weights between them only through its EP-context files, not used here).
The qnn provider runs with onnxruntime's CPU fallback off (providers.py): a node the HTP cannot
take is a ProviderError when the model loads, not a slow CPU run. `provider="cpu"` runs the same
QDQ graphs on onnxruntime's CPU provider.

NpuModel is Model with this step in place of its one-session forward; the tokenizer, chat
template, sampling, stop ids and strings, streaming, statistics and the prompt cache are Model's.
`load_model` opens either kind of export folder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import GemmaRuntimeError, InvalidArgumentError, ProviderError
from .generation_config import GenerationDefaults, read_generation_defaults
from .integrity import verify_files
from .kv_cache import KVCache
from .manifest import Manifest, ManifestError, read_manifest
from .model import Model, _check_manifest, _check_onnxruntime_version
from .npu_inputs import host_inputs
from .providers import _BY_ORT_NAME, resolve_provider
from .session_cache import compiling_plugin, open_compiled_session, open_session, session_cache_key
from .tables import HostTableReader

GRAPHS = ("prefill", "decode")
KV_LAYOUT = "past_and_new_blocks"  # the graphs return the new rows; the runtime writes them


def is_npu_export(manifest: Manifest) -> bool:
    """A folder of static prefill/decode graphs (an NPU target) rather than one decoder graph."""
    return "decoder" not in manifest.graphs and all(g in manifest.graphs for g in GRAPHS)


def load_model(path: str | Path, provider: str | None = None, threads: int | None = None,
               graph_cache: bool = False) -> Model:
    """Model.load for any export folder: an NpuModel for static NPU graphs, else a Model."""
    cls = NpuModel if is_npu_export(read_manifest(Path(path))) else Model
    return cls.load(path, provider=provider, threads=threads, graph_cache=graph_cache)


class NpuDecoder:
    """The prefill and decode sessions over one KVCache: forward(ids, position) -> logits [1, V]."""

    def __init__(self, sessions: Mapping[str, ort.InferenceSession], manifest: Manifest, cache: KVCache,
                 embed: HostTableReader, per_layer: HostTableReader | None):
        self._sessions = dict(sessions)
        self._spec = manifest.npu_inputs
        self._cache = cache
        self._embed, self._per_layer = embed, per_layer
        self.chunk = manifest.prefill_chunk
        self._lengths = {"prefill": self.chunk, "decode": 1}
        self._outputs = ["logits", *cache.output_names()]
        pli = manifest.per_layer_inputs
        # inputs_embeds / per_layer_inputs of each graph, allocated once and filled in place
        self._embeds = {g: np.zeros((1, t, manifest.hidden_size), np.float32) for g, t in self._lengths.items()}
        self._rows = {g: None if pli is None else np.zeros((1, t, pli.num_layers, pli.dim), np.float32)
                      for g, t in self._lengths.items()}

    def graph_for(self, valid: int) -> str:
        return "decode" if valid == 1 else "prefill"

    def forward(self, ids: np.ndarray, position: int, soft=None) -> np.ndarray:
        """Logits [1, V] after `ids` (1..T of them) at absolute `position`; their KV rows are stored.
        soft: (positions, rows) of encoder outputs to put at those positions of inputs_embeds."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        valid = int(ids.size)
        if not 1 <= valid <= self.chunk:
            raise ValueError(f"{valid} ids: a step takes 1..{self.chunk} (the prefill chunk)")
        graph = self.graph_for(valid)
        chunk = self._lengths[graph]
        embeds, rows = self._embeds[graph], self._rows[graph]
        self._embed.lookup(ids, out=embeds[0, :valid])
        embeds[0, valid:] = 0.0  # padding rows: finite; `last` and the masks keep them out
        if soft is not None:
            positions, values = soft
            here = (positions >= position) & (positions < position + valid)
            embeds[0, positions[here] - position] = values[here]
        feeds = {"inputs_embeds": embeds}
        if rows is not None:
            flat = rows.reshape(chunk, -1)  # a view: the buffer is contiguous
            self._per_layer.lookup(ids, out=flat[:valid])
            flat[valid:] = 0.0
            feeds["per_layer_inputs"] = rows
        feeds.update(host_inputs(self._spec, position, valid, chunk))
        feeds.update(self._cache.feeds())
        logits, *new = self._sessions[graph].run(self._outputs, feeds)
        self._cache.store_outputs(new, position, valid)
        return logits


class NpuModel(Model):
    """A loaded NPU export folder (graphs "prefill" and "decode"); see the module doc."""

    def __init__(self, folder: Path, manifest: Manifest, sessions: Mapping[str, ort.InferenceSession],
                 embed: HostTableReader, per_layer: HostTableReader | None, provider: str,
                 defaults: GenerationDefaults | None = None, session_source: str = "graph",
                 threads: int | None = None, graph_cache: bool = False):
        # Use NpuModel.load (or load_model). Model's state is built from a view of the manifest in
        # which the decode graph stands for Model's "decoder": its static T tells Model to pad
        # every prompt chunk to prefill_chunk. The step itself is _forward below.
        view = dataclasses.replace(manifest, graphs={**manifest.graphs, "decoder": manifest.graphs["decode"]})
        super().__init__(folder, view, sessions["decode"], embed, per_layer, provider, defaults, session_source,
                         threads, io_binding=False, graph_cache=graph_cache)
        self.manifest = manifest
        self.sessions = dict(sessions)
        self._npu = NpuDecoder(sessions, manifest, self._cache, embed, per_layer)

    @classmethod
    def load(cls, path: str | Path, provider: str | None = None, threads: int | None = None,
             graph_cache: bool = False, io_binding: bool = True) -> "NpuModel":
        """As Model.load. graph_cache: on the cpu provider onnxruntime's optimized graph; on a
        compiling plugin provider (qnn) its compiled EP context (session_cache.open_compiled_session),
        so that a later load skips the HTP's graph compilation; on qnn the vision and audio encoders'
        contexts too, when each is first used (MediaEncoders). io_binding is accepted for
        Model.load's signature; the NPU loop feeds each step's inputs by name."""
        folder = Path(path)
        manifest = read_manifest(folder)
        check_npu_manifest(manifest)
        _check_onnxruntime_version(manifest)
        provider = resolve_provider(provider, manifest.target, manifest.providers)
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise InvalidArgumentError(f"threads must be a positive integer, got {threads!r}")
        verify_files(folder, manifest.files, drop_cache=manifest.table_files)  # before any session or memory map
        defaults = read_generation_defaults(folder)
        embed = HostTableReader.open(folder, "embed_tokens", manifest.tables["embed_tokens"])
        per_layer = None
        if manifest.per_layer_inputs is not None:
            per_layer = HostTableReader.open(folder, "per_layer", manifest.tables["per_layer"],
                                             row0_from=manifest.per_layer_inputs.vocab_size)
        sessions, sources = {}, set()
        for graph in GRAPHS:
            spec = manifest.graphs[graph]
            key = None
            if graph_cache:
                key = session_cache_key(manifest.files[spec.file], manifest.files.get(spec.data_file), provider)
            sessions[graph], source = _open(folder / spec.file, provider, threads, key,
                                            compiled=compiling_plugin(provider) is not None)
            check_npu_session(graph, sessions[graph], manifest)
            sources.add(source)
        source = " / ".join(sorted(sources))
        return cls(folder, manifest, sessions, embed, per_layer, provider, defaults, source, threads,
                   graph_cache=graph_cache)

    def _forward(self, ids: np.ndarray, position: int, chunk: int, soft=None) -> np.ndarray:
        # `chunk` is Model's padded length; the static graph for len(ids) decides it here
        return self._npu.forward(ids, position, soft)


def _open(path: Path, provider: str, threads: int | None, key: str | None,
          compiled: bool = False) -> tuple[ort.InferenceSession, str]:
    try:
        if compiled and key is not None:
            return open_compiled_session(path, provider, threads, key)
        return open_session(path, provider, threads, key)
    except ProviderError:
        raise
    except GemmaRuntimeError as err:
        p = _BY_ORT_NAME.get(provider)
        if p is None or p.name == "cpu":
            raise
        # with the CPU fallback off, a graph the accelerator cannot take entirely fails here
        raise ProviderError(
            f"execution provider {p.name!r} ({provider}) cannot run all of {path.name} with onnxruntime's CPU "
            f"fallback off (onnxruntime's log names the nodes it cannot take): "
            f"{str(err.__cause__ or err).strip().splitlines()[0]}; "
            f"pass --provider cpu (provider='cpu') to run it on the CPU"
        ) from err


# ---- load-time checks ------------------------------------------------------------------------


def check_npu_manifest(m: Manifest) -> None:
    """Catch an NPU export this runtime would misread before anything is hashed or loaded."""
    missing = [g for g in GRAPHS if g not in m.graphs]
    if missing:
        raise ManifestError(f"an NPU export needs graphs prefill and decode; the manifest lacks {', '.join(missing)}")
    if m.npu_inputs is None:
        raise ManifestError("the manifest of this NPU export has no npu_inputs (rope and mask parameters); "
                            "it was made by an older gemma-export: re-export it")
    if m.kv_layout != KV_LAYOUT:
        raise ManifestError(f"kv_layout {m.kv_layout!r} is not supported for static NPU graphs "
                            f"(they run {KV_LAYOUT!r})")
    if m.prefill_chunk < 2:
        raise ManifestError(f"prefill_chunk {m.prefill_chunk}: an NPU export's prefill graph takes at least 2 ids")
    spec = m.npu_inputs
    if not spec.kinds:
        raise ManifestError("npu_inputs lists no attention kinds")
    lengths = {c.length for c in m.caches if c.kind == "sliding"}
    for kind in spec.kinds:
        ok = kind.mask_length in lengths if kind.window is not None else kind.mask_length == m.max_context
        if not ok:
            raise ManifestError(f"npu_inputs kind {kind.name!r}: mask_length {kind.mask_length} (window {kind.window}) "
                                f"fits none of the manifest's caches")
        if kind.rope_theta <= 0 or kind.rope_linear_factor <= 0 or len(kind.inv_freq) * 2 != spec.head_dim:
            raise ManifestError(f"npu_inputs kind {kind.name!r}: rope parameters do not fit head_dim {spec.head_dim}")
        want = 1.0 / kind.rope_theta ** (np.arange(0, spec.head_dim, 2) / spec.head_dim)
        if not np.allclose(kind.inv_freq, want, rtol=1e-5, atol=0):
            raise ManifestError(f"npu_inputs kind {kind.name!r}: inv_freq is not 1 / rope_theta^(2i / head_dim)")
    if any(c.head_dim != spec.head_dim for c in m.caches):
        raise ManifestError(f"npu_inputs head_dim {spec.head_dim} differs from the caches' head_dim")
    # the checks of a CPU export (tables, per-layer inputs, caches, checksums) on the decode graph
    _check_manifest(dataclasses.replace(m, graphs={**m.graphs, "decoder": m.graphs["decode"]}))


def _expected(graph: str, m: Manifest) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """name -> shape of the inputs and outputs this runtime feeds and reads (all float32)."""
    t = m.prefill_chunk if graph == "prefill" else 1
    spec = m.npu_inputs
    inputs: dict[str, tuple] = {"inputs_embeds": (1, t, m.hidden_size)}
    if m.per_layer_inputs is not None:
        inputs["per_layer_inputs"] = (1, t, m.per_layer_inputs.num_layers, m.per_layer_inputs.dim)
    for kind in spec.kinds:
        inputs.update({kind.cos: (t, spec.head_dim), kind.sin: (t, spec.head_dim)})
    for kind in spec.kinds:
        inputs.update({kind.mask_past: (t, kind.mask_length), kind.mask_new: (t, t)})
    inputs[spec.last] = (1, 1, t)
    outputs: dict[str, tuple] = {"logits": (1, m.vocab_size)}
    for c in m.caches:
        past, new = (1, c.kv_heads, c.length, c.head_dim), (1, c.kv_heads, t, c.head_dim)
        inputs.update({c.past_key: past, c.past_value: past})
        outputs.update({c.new_key: new, c.new_value: new})
    return inputs, outputs


def check_npu_session(graph: str, session: ort.InferenceSession, m: Manifest) -> None:
    """The static graph must take and return exactly what this runtime feeds and reads."""
    inputs, outputs = _expected(graph, m)
    for kind, have, want in (("input", session.get_inputs(), inputs), ("output", session.get_outputs(), outputs)):
        got = {a.name: (a.type, tuple(a.shape)) for a in have}
        if set(got) != set(want):
            extra, lacks = sorted(set(got) - set(want)), sorted(set(want) - set(got))
            raise ManifestError(f"{graph} graph {kind}s differ from the manifest's NPU contract"
                                + (f"; unexpected: {', '.join(extra)}" if extra else "")
                                + (f"; missing: {', '.join(lacks)}" if lacks else ""))
        wrong = [f"{n} is {got[n][0]} {list(got[n][1])}" for n, shape in want.items()
                 if got[n] != ("tensor(float)", shape)]
        if wrong:
            raise ManifestError(f"{graph} graph {kind}s are not the float32 static shapes the manifest implies: "
                                f"{'; '.join(wrong)}")
