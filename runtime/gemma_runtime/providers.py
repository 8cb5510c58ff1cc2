"""Execution providers: short names, the default from the export's target, clear errors.

A provider the installed onnxruntime lacks is an error naming the package that has it; a
provider that is present but fails to initialize (onnxruntime then falls back to CPU with only
a warning) is caught after the session is made (model.py). Never a silent CPU fallback.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnxruntime as ort

from .errors import ProviderError


@dataclass(frozen=True)
class Provider:
    name: str  # --provider NAME
    ort_name: str  # onnxruntime's provider name
    package: str  # what to install to get it


PROVIDERS = {
    p.name: p
    for p in (
        Provider("cpu", "CPUExecutionProvider", "onnxruntime"),
        Provider("cuda", "CUDAExecutionProvider", "onnxruntime-gpu"),
        Provider("openvino", "OpenVINOExecutionProvider", "onnxruntime-openvino"),
        Provider("qnn", "QNNExecutionProvider", "onnxruntime-qnn"),
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


def resolve_provider(requested: str | None, target: str) -> str:
    """onnxruntime's provider name for `requested` (a short name or onnxruntime's own name),
    or for the target's default; ProviderError when this onnxruntime does not have it."""
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
    if provider.ort_name not in available:
        raise ProviderError(
            f"execution provider {provider.name!r} ({provider.ort_name}) is not in the installed onnxruntime "
            f"{ort.__version__} (available: {', '.join(available)}); install {provider.package} "
            f"(pip uninstall onnxruntime && pip install {provider.package.split()[0]})"
        )
    return provider.ort_name
