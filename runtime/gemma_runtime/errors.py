"""Errors the runtime raises for problems with the export folder, the prompt or the machine.

Every one subclasses GemmaRuntimeError, so the CLI can print it as one line without a
traceback. ManifestError lives in manifest.py (the schema module) and subclasses it too.
ProviderFallbackWarning is a warning, not an error: the run goes on, on another provider.
"""


class GemmaRuntimeError(Exception):
    """Base of every error that names a problem with the user's input, folder or machine."""


class IntegrityError(GemmaRuntimeError):
    """A file of the export folder is missing or its sha256 differs from the manifest's."""


class ContextLengthError(GemmaRuntimeError):
    """The prompt is empty or does not leave room for a new token in the context."""


class TokenizerMissingError(GemmaRuntimeError):
    """The export folder has no tokenizer.json, so text in / text out is not possible."""


class GenerationConfigError(GemmaRuntimeError):
    """The export's generation_config.json cannot be read or holds a value of the wrong kind."""


class ProviderError(GemmaRuntimeError):
    """The requested onnxruntime execution provider is not available on this machine."""


class ProviderFallbackWarning(UserWarning):
    """The export target's preferred provider is not installed; its next choice (often the CPU) runs."""


class InvalidArgumentError(GemmaRuntimeError, ValueError):
    """An argument of a runtime call is out of range or of the wrong kind."""


class SamplingError(InvalidArgumentError):
    """A sampling setting is outside its range (e.g. a negative temperature)."""


class UnsupportedContentError(InvalidArgumentError):
    """A message part (image, audio) or an input this runtime cannot handle yet."""


class ImageError(InvalidArgumentError):
    """An image cannot be read (missing, unreadable, truncated, not an image) or processed."""


class AudioError(InvalidArgumentError):
    """Audio that cannot be read or used: unreadable, empty, silent, too long, bad sample rate."""


class MediaError(InvalidArgumentError):
    """Images or audio that do not fit the prompt (placeholder counts) or the export's encoders."""


class ChatTemplateError(GemmaRuntimeError):
    """The chat template cannot be read or rendered for these messages."""
