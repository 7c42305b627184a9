"""Domain errors raised by models, indexes, batchers and servicers.

They carry no transport detail; ``twostage.status`` maps each one to a gRPC
status code in a single table, so this module stays free of grpc.
"""


class TwostageError(Exception):
    """Base class: the message is shown to the caller as is."""


class InvalidArgument(TwostageError):
    """The request is malformed or exceeds a documented limit."""


class Overloaded(TwostageError):
    """Load is shed: a queue is full. Safe to retry later or elsewhere (``retry_after_s``: when, if known)."""

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReady(TwostageError):
    """The service is loading, draining or shutting down."""


class Unavailable(TwostageError):
    """A dependency is missing and nothing useful can be returned."""


class DeadlineExceeded(TwostageError):
    """The caller's deadline passed before the work could be done."""


class RequestTimeout(TwostageError):
    """The caller did not finish sending its request in time (message_timeout_s): the server stopped waiting."""


class Cancelled(TwostageError):
    """The caller went away; the work was dropped."""


class FailedPrecondition(TwostageError):
    """The request is well formed but this server cannot take it in its state (a read-only replica)."""


class NotFound(TwostageError):
    """What the request names does not exist."""


class StorageFull(TwostageError):
    """The disk refused a write; nothing of it was stored. Retry once space is freed."""


class ConfigError(TwostageError):
    """A setting is missing or out of range; raised at start, never per request."""


class IndexLocked(TwostageError):
    """Another process holds the index directory for writing."""


class ModelMismatch(TwostageError):
    """An index or request refers to a model other than the one loaded."""


class TooLarge(InvalidArgument):
    """The request's body is over the size limit (gRPC refuses such a message itself)."""


class TooLong(InvalidArgument):
    """A text is longer than the model reads, and the caller asked for it not to be cut."""


class Unauthenticated(TwostageError):
    """No token, or one the tokens file does not hold."""


class PermissionDenied(TwostageError):
    """The token's role may not call this."""


def check_limit(field: str, value: int, low: int, high: int) -> None:
    """Raise InvalidArgument naming the field and its allowed range."""
    if not low <= value <= high:
        raise InvalidArgument(f"{field} must be between {low} and {high}, got {value}")


def check_text(field: str, text: str, max_chars: int) -> None:
    if not text or not text.strip():
        raise InvalidArgument(f"{field} must not be empty")
    if len(text) > max_chars:
        raise InvalidArgument(f"{field} is {len(text)} characters; the limit is {max_chars}")


# Errors that are the caller's to fix: answered as they are, never retried elsewhere, never a replica's fault.
CALLERS_MISTAKES = (InvalidArgument, FailedPrecondition, NotFound)


class ModelFailure(TwostageError):
    """The model raised while computing a batch; every caller in it gets this."""
