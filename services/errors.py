"""Typed errors shared by the library, the CLI and (later) the gRPC servicers.

Each maps to one CLI exit code and, later, one gRPC status code; the message is one line meant for the
person who caused it.
"""


class SpecserveError(Exception):
    """Base class of every error specserve raises on purpose."""

    exit_code = 1
    # The gRPC status name ("INVALID_ARGUMENT", ...) when the error came back from a server; else None.
    code: str | None = None


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


class OverloadedError(SpecserveError):
    """The server's admission queue is full; retry later (gRPC RESOURCE_EXHAUSTED)."""

    exit_code = 6


class UnavailableError(SpecserveError):
    """A backend replica is unreachable or draining and no other replica can take the work."""

    exit_code = 7


class DeadlineExceededError(SpecserveError):
    """The call's deadline passed before the server answered (gRPC DEADLINE_EXCEEDED)."""

    exit_code = 8


class RequestCancelledError(SpecserveError):
    """The call was cancelled, by the caller or by the server (gRPC CANCELLED)."""

    exit_code = 9


class RpcError(SpecserveError):
    """A gRPC failure no other error names (INTERNAL, UNIMPLEMENTED, FAILED_PRECONDITION, ...); see `code`."""
