"""Typed errors shared by the library, the CLI and (later) the gRPC servicers.

Each maps to one CLI exit code and, later, one gRPC status code; the message is one line meant for the
person who caused it.
"""


class SpecserveError(Exception):
    """Base class of every error specserve raises on purpose."""

    exit_code = 1


class InvalidRequestError(SpecserveError, ValueError):
    """A request or its parameters are malformed (empty prompt, bad sampling values, too long)."""

    exit_code = 2


class ModelLoadError(SpecserveError):
    """A model file or directory is missing, unreadable, corrupt or of an unsupported architecture."""

    exit_code = 3


class ModelFetchError(SpecserveError):
    """The default model could not be fetched (offline with no cached copy, checksum mismatch)."""

    exit_code = 4


class DraftCheckpointError(SpecserveError):
    """A learned drafter's checkpoint is missing, corrupt, of another kind, or made for another target."""

    exit_code = 5
