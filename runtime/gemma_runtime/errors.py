"""Errors the runtime raises for problems with the export folder, the prompt or the machine.

Every one subclasses GemmaRuntimeError, so the CLI can print it as one line without a
traceback. ManifestError lives in manifest.py (the schema module) and subclasses it too.
"""


class GemmaRuntimeError(Exception):
    """Base of every error that names a problem with the user's input, folder or machine."""


class IntegrityError(GemmaRuntimeError):
    """A file of the export folder is missing or its sha256 differs from the manifest's."""


class ContextLengthError(GemmaRuntimeError):
    """The prompt is empty or does not leave room for a new token in the context."""


class TokenizerMissingError(GemmaRuntimeError):
    """The export folder has no tokenizer.json, so text in / text out is not possible."""


class ProviderError(GemmaRuntimeError):
    """The requested onnxruntime execution provider is not available on this machine."""
