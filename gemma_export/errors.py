"""User-facing errors of the exporter.

Every error a user can cause (a bad path, a corrupt file, an unsupported config, no network)
is an ``ExportError`` with a message that says what is wrong and what to do; the command line
prints the message without a traceback. Anything else is a bug.
"""


class ExportError(Exception):
    """Base of all user-facing export errors."""


class CheckpointError(ExportError):
    """The checkpoint (folder, hub id or GGUF file) cannot be read as given."""
