"""gemma_runtime: run a gemma-export folder with onnxruntime, numpy and tokenizers (no torch)."""

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    ContextLengthError,
    GemmaRuntimeError,
    IntegrityError,
    ProviderError,
    TokenizerMissingError,
)
from .manifest import ManifestError  # noqa: E402
from .model import GenerationStats, Model  # noqa: E402

__all__ = [
    "ContextLengthError",
    "GemmaRuntimeError",
    "GenerationStats",
    "IntegrityError",
    "ManifestError",
    "Model",
    "ProviderError",
    "TokenizerMissingError",
    "__version__",
]
