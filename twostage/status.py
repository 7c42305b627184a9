"""The one place where domain errors become gRPC status codes."""

import functools
import logging

import grpc

from twostage import errors

log = logging.getLogger(__name__)

STATUS_BY_ERROR: dict[type[errors.TwostageError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ModelMismatch: grpc.StatusCode.INVALID_ARGUMENT,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.NotReady: grpc.StatusCode.UNAVAILABLE,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.StorageFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    # Raised at start, not per request; mapped so nothing can ever surface as INTERNAL.
    errors.ConfigError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.IndexLocked: grpc.StatusCode.FAILED_PRECONDITION,
}


def status_for(error: BaseException) -> grpc.StatusCode:
    for error_type in type(error).__mro__:
        if error_type in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[error_type]
    return grpc.StatusCode.INTERNAL


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


ERROR_BY_STATUS: dict[grpc.StatusCode, type[errors.TwostageError]] = {
    code: error for error, code in STATUS_BY_ERROR.items()
    if error not in (errors.ModelMismatch, errors.ConfigError, errors.IndexLocked, errors.StorageFull)
}


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

