"""User-facing export errors: the CLI prints these as one line, without a traceback."""


class ExportError(Exception):
    """Base of every error that names a problem with the user's input or machine."""


class CheckpointError(ExportError):
    """The checkpoint cannot be found, read or trusted."""
