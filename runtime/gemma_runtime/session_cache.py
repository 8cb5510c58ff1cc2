"""onnxruntime sessions, optionally with an on-disk cache of the optimized graph.

With `graph_cache=True` the first load saves onnxruntime's optimized graph (and its own copy of
the weights, as external data) under <cache dir>/graphs/<key>/, never in the export folder; later
loads open that with graph optimizations off. The key hashes the graph's and weights' sha256,
the onnxruntime version, the provider, the optimization level and the machine, since a graph
optimized at ORT_ENABLE_ALL may hold hardware-specific layouts.

Measured on gemma3-270m fp32 (bench/start_time.py): the optimization step is a small part of a
start (the weights must be read either way), and the cache doubles the weights on disk, so it
is off by default.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort

from .errors import GemmaRuntimeError, ProviderError
from .integrity import default_cache_dir
from .load_pages import OwnMappedWeights
from .providers import _BY_ORT_NAME, configure_session

GRAPHS = "graphs"
OPT_LEVEL = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
ENCODER_LEVEL = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # _encoder_options


def _options(threads: int | None, profile: str | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    # No memory patterns: with the symbolic chunk length onnxruntime plans one per input shape and
    # keeps each block, so a second prefill grew E2B's resident set by another 0.1 GiB; decode and
    # prefill speed were unchanged without them (Gemma 3 270M int4, interleaved runs).
    options.enable_mem_pattern = False
    if threads is not None:
        options.intra_op_num_threads = threads
    if profile is not None:  # onnxruntime's per-node trace, written by session.end_profiling() (benchmarks)
        options.enable_profiling = True
        options.profile_file_prefix = profile
    return options


def _create(path: Path, options: ort.SessionOptions, provider: str) -> ort.InferenceSession:
    try:
        # plugin EPs (onnxruntime-qnn) go into the options by device; built-in ones by name
        session = ort.InferenceSession(str(path), sess_options=options, providers=configure_session(options, provider))
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


def _create_releasing_weights(path: Path, options: ort.SessionOptions, provider: str) -> ort.InferenceSession:
    """_create, on the CPU provider with the weights over the runtime's own map, whose pages are
    dropped while onnxruntime prepacks them (load_pages.OwnMappedWeights)."""
    weights = OwnMappedWeights.of(path) if provider == "CPUExecutionProvider" else None
    if weights is None:
        return _create(path, options, provider)
    weights.add_to(options)
    with weights.released_while_loading():
        session = _create(path, options, provider)
    session._gemma_own_mapped_weights = weights  # the initializers' memory lives as long as the session
    return session


def graph_cache_key(graph_sha256: str, data_sha256: str | None, provider: str, **extra: str) -> str:
    """extra: what else the cached file depends on (an EP context: the plugin EP's version)."""
    parts = {
        "graph": graph_sha256, "data": data_sha256, "onnxruntime": ort.__version__, "provider": provider,
        "level": str(OPT_LEVEL), "machine": platform.machine(), "processor": platform.processor(), **extra,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def compiling_plugin(provider: str) -> str | None:
    """The plugin EP module of a provider whose sessions are cached as compiled EP contexts (qnn's
    onnxruntime_qnn), or None for a provider cached as an optimized graph (or not at all)."""
    p = _BY_ORT_NAME.get(provider)
    return None if p is None else p.plugin


def session_cache_key(graph_sha256: str, data_sha256: str | None, provider: str,
                      level: ort.GraphOptimizationLevel = OPT_LEVEL) -> str:
    """graph_cache_key of a graph on `provider`. A plugin's compiled context depends on the plugin's
    version too, and on the optimization level it was compiled at (`level`: the level of the
    session options it is compiled with; the decoders' OPT_LEVEL, the encoders' ENCODER_LEVEL)."""
    plugin = compiling_plugin(provider)
    extra = {"plugin": f"{plugin}=={_distribution_version(plugin)}", "compile_level": str(level)} if plugin else {}
    return graph_cache_key(graph_sha256, data_sha256, provider, **extra)


def _distribution_version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module.replace("_", "-"))
    except PackageNotFoundError:
        return "unknown"


def _encoder_options(threads: int | None) -> ort.SessionOptions:
    """Options for an encoder graph (vision.onnx, audio.onnx), which runs once per image or clip:
    optimizations up to EXTENDED (no NCHWc layout pass, whose reordered copies of the conv weights
    cost 1.5 GiB for the vision tower: its weights stay memory-mapped from vision.data) and no CPU
    memory arena (activations go back after each call instead of staying reserved). Measured on the
    full-size vision tower (bench/multimodal_rss.py): resident set after a run 2.2 -> 1.2 GiB."""
    options = _options(threads)
    options.graph_optimization_level = ENCODER_LEVEL
    options.enable_cpu_mem_arena = False
    return options


def open_encoder_session(path: Path, provider: str, threads: int | None) -> ort.InferenceSession:
    """A session for an encoder graph, with _encoder_options."""
    return _create(path, _encoder_options(threads), provider)


def open_cached_encoder_session(path: Path, provider: str, threads: int | None, graph_sha256: str,
                                data_sha256: str | None, cache_dir: Path | None = None) -> tuple[ort.InferenceSession, str]:
    """(session, how it was made) for an encoder graph under graph_cache: on a compiling provider
    (qnn; compiling_plugin) from its compiled EP context, kept as the decoder graphs' are
    (open_compiled_session, with _encoder_options); other providers keep no encoder cache (an
    optimized graph saved at EXTENDED would be a second copy of the weights on disk, for a graph
    that runs once per image or clip), so this is open_encoder_session's session, "graph"."""
    if compiling_plugin(provider) is None:
        return open_encoder_session(path, provider, threads), "graph"
    key = session_cache_key(graph_sha256, data_sha256, provider, ENCODER_LEVEL)
    return open_compiled_session(path, provider, threads, key, cache_dir, options=_encoder_options)


CACHED_GRAPH = "cached optimized graph"  # open_session's "how it was made" for a cache hit
CACHED_DATA = "model.data"


def cached_graph_data(cache_key: str, cache_dir: Path | None = None) -> Path:
    """The weights file of the cached optimized graph under cache_key."""
    return Path(cache_dir if cache_dir is not None else default_cache_dir()) / GRAPHS / cache_key / CACHED_DATA


def open_session(path: Path, provider: str, threads: int | None, cache_key: str | None = None,
                 cache_dir: Path | None = None, profile: str | None = None) -> tuple[ort.InferenceSession, str]:
    """(session, how it was made: "graph" | "cached optimized graph" | "graph, optimized graph saved").
    profile: a path prefix for onnxruntime's profiler trace, which turns the profiler on (no graph cache)."""
    if cache_key is None or profile is not None:
        return _create_releasing_weights(path, _options(threads, profile), provider), "graph"
    root = Path(cache_dir if cache_dir is not None else default_cache_dir()) / GRAPHS
    entry = root / cache_key
    if (entry / "done").is_file():
        options = _options(threads)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            return _create(entry / "model.onnx", options, provider), CACHED_GRAPH
        except ProviderError:
            raise
        except GemmaRuntimeError as err:
            warnings.warn(f"the cached optimized graph {entry} is unusable ({err}); rebuilding it", stacklevel=3)
            shutil.rmtree(entry, ignore_errors=True)
    options = _options(threads)
    options.graph_optimization_level = OPT_LEVEL
    staging = _staging(root, cache_key)
    if staging is None:  # an unwritable cache must not stop the model from running
        return _create(path, _options(threads), provider), "graph"
    try:
        options.optimized_model_filepath = str(staging / "model.onnx")
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", CACHED_DATA)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        options.log_severity_level = 3  # quiet the "hardware specific optimizations" notice: the key has the machine
        session = _create(path, options, provider)
        _publish(staging, entry, path)
        return session, "graph, optimized graph saved"
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


CONTEXTS = "contexts"
CONTEXT_MODEL = "model_ctx.onnx"


def open_compiled_session(path: Path, provider: str, threads: int | None, cache_key: str,
                          cache_dir: Path | None = None,
                          options: Callable[[int | None], ort.SessionOptions] = _options,
                          ) -> tuple[ort.InferenceSession, str]:
    """(session, how it was made) for a compiling provider (QNN): from the provider's compiled EP
    context, kept under <cache dir>/contexts/<key>/. The first load compiles the graph with
    onnxruntime's ModelCompiler (QNN writes its context binary beside the EPContext model) and
    later loads open that, skipping the provider's graph compilation (real Gemma 3 270M qnn-htp
    export: 13.7 s -> 0.6 s, 521 MiB of contexts; bench/qnn_context_load.py). An unwritable cache
    falls back to a plain session; an unusable cached context is rebuilt, with a warning.
    options: threads -> the session options of the compilation (its optimization level too: the
    key must say it, see session_cache_key) and of every session opened (_encoder_options for the
    encoders)."""
    root = Path(cache_dir if cache_dir is not None else default_cache_dir()) / CONTEXTS
    entry = root / cache_key
    if (entry / "done").is_file():
        try:
            return _create(entry / CONTEXT_MODEL, options(threads), provider), "cached EP context"
        except ProviderError:
            raise
        except GemmaRuntimeError as err:
            warnings.warn(f"the cached EP context {entry} is unusable ({err}); rebuilding it", stacklevel=3)
            shutil.rmtree(entry, ignore_errors=True)
    staging = _staging(root, cache_key)
    if staging is None:  # an unwritable cache must not stop the model from running
        return _create(path, options(threads), provider), "graph"
    try:
        compile_options = options(threads)
        configure_session(compile_options, provider)
        try:
            # at the options' level, as a plain session optimizes before the provider takes the graph
            # (ModelCompiler's own default is no optimization: the audio encoder's context then gave
            # other rows than a plain qnn session, cosine 0.89 to it, at ORT_DISABLE_ALL)
            compiler = ort.ModelCompiler(compile_options, str(path),
                                         graph_optimization_level=compile_options.graph_optimization_level)
            compiler.compile_to_file(str(staging / CONTEXT_MODEL))
        except Exception as err:  # onnxruntime raises its own types
            raise GemmaRuntimeError(
                f"onnxruntime {ort.__version__} cannot compile {path.name} for {provider}: {str(err).strip().splitlines()[0]}"
            ) from err
        _publish(staging, entry, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _create(entry / CONTEXT_MODEL, options(threads), provider), "EP context compiled and saved"


def _staging(root: Path, cache_key: str) -> Path | None:
    """A fresh folder beside the entry to build it in, or None where the cache cannot be written."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=root, prefix=f".{cache_key}-"))
    except OSError:
        return None


def _publish(staging: Path, entry: Path, source: Path) -> None:
    """The built folder becomes the cache entry in one rename (marked done first); if another
    process saved the entry first, the staging folder is left for the caller to remove."""
    (staging / "done").write_text(json.dumps({"source": str(source), "onnxruntime": ort.__version__}))
    try:
        os.replace(staging, entry)
    except OSError:  # another process saved it first
        pass
