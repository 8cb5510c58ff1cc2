"""Execution providers: short names, the default from the export's target, clear errors.

A provider asked for explicitly (--provider / provider=) that the installed onnxruntime lacks is
an error naming the package that has it; a provider that is present but fails to initialize
(onnxruntime then falls back to CPU with only a warning) is caught after the session is made
(session_cache.py). Never a silent CPU fallback.

The default provider is the first of the manifest's `providers` (the export target's list, most
preferred first) that this onnxruntime has. Taking a later one than the first (cuda.toml lists
["cuda", "cpu"]: the graphs run on the CPU too) is a ProviderFallbackWarning naming the missing
provider and its package, so a user who installed plain onnxruntime learns why it is slow; none
of them installed is a ProviderError. Plugin execution providers (onnxruntime >= 1.22's EP
libraries, e.g. PyPI's onnxruntime-qnn) are registered on first use and added to a session by
their devices, with onnxruntime's CPU fallback disabled: a node the accelerator cannot take is an
error when the session is made, not a slow silent CPU run.
"""

from __future__ import annotations

import importlib
import json
import os
import warnings
from dataclasses import dataclass

import onnxruntime as ort

from .errors import ProviderError, ProviderFallbackWarning


@dataclass(frozen=True)
class Provider:
    name: str  # --provider NAME
    ort_name: str  # onnxruntime's provider name
    package: str  # what to install to get it
    plugin: str | None = None  # Python module of a plugin EP library (get_ep_name, get_library_path)


PROVIDERS = {
    p.name: p
    for p in (
        Provider("cpu", "CPUExecutionProvider", "onnxruntime"),
        Provider("cuda", "CUDAExecutionProvider", "onnxruntime-gpu"),
        Provider("openvino", "OpenVINOExecutionProvider", "onnxruntime-ep-openvino", plugin="onnxruntime_ep_openvino"),
        Provider("qnn", "QNNExecutionProvider", "onnxruntime-qnn", plugin="onnxruntime_qnn"),
        Provider("dml", "DmlExecutionProvider", "onnxruntime-directml"),
        Provider("coreml", "CoreMLExecutionProvider", "onnxruntime (its macOS build has CoreML)"),
    )
}
_BY_ORT_NAME = {p.ort_name: p for p in PROVIDERS.values()}


def provider_for_target(target: str) -> Provider:
    """The default provider of a build target: the target name, or its part before '-'
    ('cpu', 'cuda', 'qnn-x-elite' -> qnn)."""
    for key in (target, target.split("-", 1)[0]):
        if key in PROVIDERS:
            return PROVIDERS[key]
    raise ProviderError(
        f"the export's target {target!r} names no known execution provider; pass one explicitly "
        f"(--provider / provider=): {', '.join(PROVIDERS)}"
    )


def resolve_provider(requested: str | None, target: str, preferred: tuple[str, ...] = ()) -> str:
    """onnxruntime's provider name for `requested` (a short name or onnxruntime's own name),
    or the first of `preferred` (the manifest's providers) that this onnxruntime has, or the
    target's default; ProviderError when this onnxruntime does not have it."""
    if requested is None and preferred:
        unknown = [p for p in preferred if p not in PROVIDERS]
        if unknown:
            raise ProviderError(f"the export names unknown execution providers {unknown}; pass one explicitly "
                                f"(--provider / provider=): {', '.join(PROVIDERS)}")
        have = [p for p in preferred if is_available(PROVIDERS[p])]
        if not have:
            raise ProviderError(
                f"none of the execution providers of target {target!r} ({', '.join(preferred)}) is in the installed "
                f"onnxruntime {ort.__version__}: install {' or '.join(PROVIDERS[p].package for p in preferred)}, "
                f"or pass --provider cpu to run it on the CPU"
            )
        chosen = PROVIDERS[have[0]]
        skipped = [PROVIDERS[p] for p in preferred[: preferred.index(have[0])]]
        if skipped:
            warnings.warn(fallback_message(skipped, chosen, target), ProviderFallbackWarning, stacklevel=3)
        return chosen.ort_name
    if requested is None:
        provider = provider_for_target(target)
    elif requested.lower() in PROVIDERS:
        provider = PROVIDERS[requested.lower()]
    elif requested in _BY_ORT_NAME:
        provider = _BY_ORT_NAME[requested]
    else:
        provider = None
    available = ort.get_available_providers()
    if provider is None:
        raise ProviderError(
            f"unknown execution provider {requested!r}; use one of {', '.join(PROVIDERS)} "
            f"(onnxruntime {ort.__version__}; available: {', '.join(available)})"
        )
    if not is_available(provider):
        if provider.plugin is not None and _plugin_module(provider) is not None:
            raise ProviderError(_why_no_devices(provider))  # installed, but nothing here for it to run on
        # a plugin EP library installs beside onnxruntime; other builds replace it
        how = (f"pip install {provider.package}" if provider.plugin is not None
               else f"pip uninstall onnxruntime && pip install {provider.package.split()[0]}")
        raise ProviderError(
            f"execution provider {provider.name!r} ({provider.ort_name}) is not in the installed onnxruntime "
            f"{ort.__version__} (available: {', '.join(available)}); install {provider.package} ({how})"
        )
    return provider.ort_name


def fallback_message(skipped: list[Provider], chosen: Provider, target: str) -> str:
    names = ", ".join(f"{p.name!r} ({p.ort_name})" for p in skipped)
    verb = "is" if len(skipped) == 1 else "are"
    idle = [_why_no_devices(p) for p in skipped if p.plugin is not None and _plugin_module(p) is not None]
    return (f"execution provider {names} of the export's target {target!r} {verb} not in the installed "
            f"onnxruntime {ort.__version__}{''.join(f' ({why})' for why in idle)}, so the model runs on "
            f"{chosen.name!r}, the target's next choice, which may be much slower: install "
            f"{' or '.join(p.package for p in skipped)} to use it, or pass --provider {chosen.name} "
            f"(provider={chosen.name!r}) to choose {chosen.name!r} and silence this warning")


# ---- plugin execution providers -----------------------------------------------------------------

_REGISTERED: set[str] = set()
# options a plugin EP needs: QNN's HTP backend (the NPU; on x86-64 an emulator), with the graph's
# input Quantize / output Dequantize nodes on the HTP too (QNN otherwise hands them to the CPU)
# CUDA computes float32 MatMuls in TF32 unless told not to: a float32 export's logits then miss
# DESIGN.md's fp32 budget by 10x (tiny Gemma on an H200: 4e-3 against 3e-4, bench/cuda_provider.py)
_BUILTIN_OPTIONS = {"CUDAExecutionProvider": {"use_tf32": "0"}}

# OpenVINO: float32 arithmetic. Its CPU plugin otherwise infers in bfloat16 on CPUs that have it
# (AVX512-BF16, AMX): the tiny Gemma's fp32 decoder then missed the fp32 budget by 300x (0.103
# against 3.5e-4 on the lent Intel Xeon, bench/openvino_provider.py), in float32 1e-6 (OpenVINO
# 2026.4 here, tests/test_openvino.py). The plugin takes OpenVINO properties only through its
# load_config option (a JSON map: device -> properties); it ignores "precision". NPUs compute in
# float16 only, so they keep their default.
OPENVINO_PROPERTIES = {"INFERENCE_PRECISION_HINT": "f32"}  # lower case: the CPU plugin refuses "F32"


def _openvino_options(devices: list) -> dict:
    device = devices[0].ep_metadata.get("ov_device", "CPU")
    return {} if device.upper() == "NPU" else {"load_config": json.dumps({device: OPENVINO_PROPERTIES})}


_PLUGIN_OPTIONS = {"onnxruntime_qnn": lambda module, devices: {"backend_path": module.get_qnn_htp_path(),
                                                               "offload_graph_io_quantization": "0"},
                   "onnxruntime_ep_openvino": lambda module, devices: _openvino_options(devices)}

# Which of a plugin's devices a session takes. OpenVINO offers one OrtEpDevice per OpenVINO device
# (CPU, GPU, NPU): GEMMA_OPENVINO_DEVICE picks one (default CPU, which every OpenVINO install has).
OPENVINO_DEVICE_ENV = "GEMMA_OPENVINO_DEVICE"


def _chosen_devices(provider: Provider, devices: list) -> list:
    if provider.plugin != "onnxruntime_ep_openvino":
        return devices
    want = os.environ.get(OPENVINO_DEVICE_ENV, "CPU").upper()
    chosen = [d for d in devices if d.ep_metadata.get("ov_device", "").upper() == want]
    if devices and not chosen:
        have = sorted({d.ep_metadata.get("ov_device", "?") for d in devices})
        raise ProviderError(f"{OPENVINO_DEVICE_ENV}={want}: OpenVINO offers no such device here (it offers {', '.join(have)})")
    return chosen[:1]


def unavailable_reason(provider: Provider) -> str:
    """Why `provider` cannot run here, in a few words: not installed, or installed without a device."""
    if provider.plugin is not None and _plugin_module(provider) is not None:
        return _why_no_devices(provider)
    return f"not installed here ({provider.package})"


def _why_no_devices(provider: Provider) -> str:
    """Why an installed plugin offers no device: the OpenVINO plugin claims Intel hardware only."""
    if provider.plugin == "onnxruntime_ep_openvino":
        vendors = sorted({d.device.vendor for d in ort.get_ep_devices()} - {""})
        return (f"{provider.package} is installed but offers no device: its plugin takes Intel CPUs, GPUs and NPUs "
                f"only, and this machine's devices are {', '.join(vendors) or 'of no named vendor'}")
    return f"execution provider {provider.name!r} is not installed: pip install {provider.package}"


def is_available(provider: Provider) -> bool:
    """In this onnxruntime, built in or as an installed plugin EP library."""
    if provider.ort_name in ort.get_available_providers():
        return True
    return provider.plugin is not None and bool(_plugin_devices(provider))


def _plugin_module(provider: Provider):
    try:
        return importlib.import_module(provider.plugin)
    except ImportError:
        return None


def _plugin_devices(provider: Provider) -> list:
    """The plugin's OrtEpDevices, registering its library first; [] when it is not installed."""
    module = _plugin_module(provider)
    if module is None or not hasattr(ort, "register_execution_provider_library"):
        return []
    ep_name = module.get_ep_name()
    if ep_name not in _REGISTERED:
        try:
            ort.register_execution_provider_library(ep_name, module.get_library_path())
        except Exception as err:  # onnxruntime raises its own types
            if "already registered" not in str(err):
                raise ProviderError(f"{provider.package} is installed but its EP library does not load: {err}") from err
        _REGISTERED.add(ep_name)
    return [d for d in ort.get_ep_devices() if d.ep_name == ep_name]


def configure_session(options: ort.SessionOptions, ort_name: str, cpu_fallback: bool = False) -> list[str] | None:
    """Adds a plugin EP to `options` (its devices, options, CPU fallback off unless `cpu_fallback`:
    gemma-export check measures which nodes would fall back) and returns None, or returns the
    `providers` list to pass to InferenceSession for a built-in provider."""
    provider = _BY_ORT_NAME.get(ort_name)
    # a registered plugin is then listed by get_available_providers() too, but by name it would
    # start without its options (QNN: no HTP backend path): plugins always go by device
    if provider is None or provider.plugin is None or _plugin_module(provider) is None:
        return [(ort_name, _BUILTIN_OPTIONS[ort_name])] if ort_name in _BUILTIN_OPTIONS else [ort_name]
    devices = _chosen_devices(provider, _plugin_devices(provider))
    if not devices:
        raise ProviderError(_why_no_devices(provider))
    module = _plugin_module(provider)
    options.add_provider_for_devices(devices, _PLUGIN_OPTIONS.get(provider.plugin, lambda m, d: {})(module, devices))
    if not cpu_fallback:
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    return None
