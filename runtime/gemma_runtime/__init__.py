"""gemma_runtime: run a gemma-export folder with onnxruntime, numpy, tokenizers and jinja2 (no torch)."""

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    AudioError,
    ChatTemplateError,
    ContextLengthError,
    GemmaRuntimeError,
    GenerationConfigError,
    ImageError,
    IntegrityError,
    InvalidArgumentError,
    MediaError,
    ProviderError,
    ProviderFallbackWarning,
    SamplingError,
    TokenizerMissingError,
    UnsupportedContentError,
)
from .manifest import ManifestError  # noqa: E402
from .model import GenerationStats, Model  # noqa: E402
from .providers import PROVIDERS  # noqa: E402
from .sampling import SamplingConfig  # noqa: E402

__all__ = [
    "AudioError",
    "ChatTemplateError",
    "ContextLengthError",
    "GemmaRuntimeError",
    "GenerationConfigError",
    "GenerationStats",
    "ImageError",
    "IntegrityError",
    "InvalidArgumentError",
    "ManifestError",
    "MediaError",
    "Model",
    "PROVIDERS",
    "ProviderError",
    "ProviderFallbackWarning",
    "SamplingConfig",
    "SamplingError",
    "TokenizerMissingError",
    "UnsupportedContentError",
    "__version__",
]
