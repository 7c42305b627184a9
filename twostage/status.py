"""The one place where domain errors become statuses: a gRPC code and, for the gateway's HTTP face, an HTTP
status, side by side in one table."""

import functools
import logging

import grpc

from twostage import errors

log = logging.getLogger(__name__)

# Error -> (gRPC code, HTTP status). Looked up along the error's class hierarchy, so a subclass without a row
# takes its parent's.
STATUSES: dict[type[errors.TwostageError], tuple[grpc.StatusCode, int]] = {
    errors.InvalidArgument: (grpc.StatusCode.INVALID_ARGUMENT, 422),
    errors.TooLarge: (grpc.StatusCode.RESOURCE_EXHAUSTED, 413),
    errors.TooLong: (grpc.StatusCode.OUT_OF_RANGE, 413),
    errors.ModelMismatch: (grpc.StatusCode.INVALID_ARGUMENT, 422),
    errors.Overloaded: (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    errors.NotReady: (grpc.StatusCode.UNAVAILABLE, 503),
    errors.Unavailable: (grpc.StatusCode.UNAVAILABLE, 503),
    errors.DeadlineExceeded: (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    errors.RequestTimeout: (grpc.StatusCode.DEADLINE_EXCEEDED, 408),
    errors.Cancelled: (grpc.StatusCode.CANCELLED, 499),  # the caller went away; nobody reads it
    errors.FailedPrecondition: (grpc.StatusCode.FAILED_PRECONDITION, 409),
    errors.NotFound: (grpc.StatusCode.NOT_FOUND, 404),
    errors.StorageFull: (grpc.StatusCode.RESOURCE_EXHAUSTED, 507),
    errors.Unauthenticated: (grpc.StatusCode.UNAUTHENTICATED, 401),
    errors.PermissionDenied: (grpc.StatusCode.PERMISSION_DENIED, 403),
    # Raised at start, not per request; mapped so nothing can ever surface as INTERNAL.
    errors.ConfigError: (grpc.StatusCode.FAILED_PRECONDITION, 409),
    errors.IndexLocked: (grpc.StatusCode.FAILED_PRECONDITION, 409),
}
STATUS_BY_ERROR: dict[type[errors.TwostageError], grpc.StatusCode] = {e: codes[0] for e, codes in STATUSES.items()}
# Statuses after which a retry may succeed: HTTP answers carry Retry-After (seconds; an Overloaded error that knows
# when the load will have drained says so itself).
RETRY_AFTER_S = {429: 1, 503: 1}


def _statuses(error: BaseException) -> tuple[grpc.StatusCode, int]:
    for error_type in type(error).__mro__:
        if error_type in STATUSES:
            return STATUSES[error_type]
    return grpc.StatusCode.INTERNAL, 500


def status_for(error: BaseException) -> grpc.StatusCode:
    return _statuses(error)[0]


def http_status_for(error: BaseException) -> int:
    """The HTTP status of a domain error (500 only for what is not one: a bug, never bad input)."""
    return _statuses(error)[1]


def translate_errors(method):
    """Decorate an async servicer method: domain errors abort with their status.

    Unexpected exceptions become INTERNAL with a generic message; the detail
    goes to the log, not to the caller.
    """

    @functools.wraps(method)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        try:
            return await method(self, request, context)
        except errors.TwostageError as error:
            await context.abort(status_for(error), str(error))
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("unhandled error in %s", method.__qualname__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")

    return wrapper


# Never read back from a stage's status. A stage refusing the gateway's own token is the deployment's fault, not
# the caller's: it stays UNAVAILABLE.
_NOT_FROM_A_STAGE = (errors.ModelMismatch, errors.ConfigError, errors.IndexLocked, errors.StorageFull,
                     errors.TooLarge, errors.Unauthenticated, errors.PermissionDenied, errors.RequestTimeout)
# Codes that several of the remaining errors share, and the error each means at the caller: a stage that is not
# ready is, to its caller, unavailable.
_SHARED_CODES: dict[grpc.StatusCode, type[errors.TwostageError]] = {grpc.StatusCode.UNAVAILABLE: errors.Unavailable}


def _error_by_status() -> dict[grpc.StatusCode, type[errors.TwostageError]]:
    candidates: dict[grpc.StatusCode, list[type[errors.TwostageError]]] = {}
    for error, code in STATUS_BY_ERROR.items():
        if error not in _NOT_FROM_A_STAGE:
            candidates.setdefault(code, []).append(error)
    shared = {code for code, found in candidates.items() if len(found) > 1}
    if shared != set(_SHARED_CODES):  # a new error sharing a code must say which one the code means
        raise AssertionError(f"statuses shared by several errors: {sorted(c.name for c in shared)}; "
                             f"choices made: {sorted(c.name for c in _SHARED_CODES)}")
    return {code: _SHARED_CODES.get(code, found[0]) for code, found in candidates.items()}


ERROR_BY_STATUS = _error_by_status()


def error_from_rpc(error: grpc.aio.AioRpcError, name: str, target: str) -> errors.TwostageError:
    """A downstream call's failure as a domain error (used by the gateway's clients).

    Callers see the tier by ``name`` ("recall shard 0"), never its address: transport details name
    internal hosts, so they go to this server's log instead."""
    error_type = ERROR_BY_STATUS.get(error.code(), errors.Unavailable)
    if issubclass(error_type, errors.CALLERS_MISTAKES):
        # The caller's mistake, passed on as the stage worded it.
        return error_type(error.details())
    log.warning("%s at %s: %s: %s", name, target, error.code().name, error.details())
    return error_type(f"{name}: {error.code().name}")

