import grpc

from twostage import errors
from twostage.status import STATUS_BY_ERROR, status_for


def test_every_domain_error_has_a_status():
    domain_errors = [
        cls for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.TwostageError) and cls is not errors.TwostageError
    ]
    unmapped = [cls.__name__ for cls in domain_errors if cls not in STATUS_BY_ERROR and cls is not errors.ModelFailure]
    assert unmapped == []
    assert status_for(errors.Overloaded("x")) is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_for(errors.ModelFailure("x")) is grpc.StatusCode.INTERNAL
    assert status_for(ValueError("x")) is grpc.StatusCode.INTERNAL


def test_limits_name_the_field():
    import pytest

    with pytest.raises(errors.InvalidArgument, match="top_k must be between 1 and 100, got 0"):
        errors.check_limit("top_k", 0, 1, 100)
    with pytest.raises(errors.InvalidArgument, match="query must not be empty"):
        errors.check_text("query", "  ", 10)
    with pytest.raises(errors.InvalidArgument, match="query is 11 characters; the limit is 10"):
        errors.check_text("query", "x" * 11, 10)


def test_the_status_table_gives_each_error_its_codes():
    """What callers rely on, written out here rather than read back from the table."""
    from twostage.status import http_status_for

    expected = {
        errors.InvalidArgument("x"): (grpc.StatusCode.INVALID_ARGUMENT, 422),
        errors.TooLarge("x"): (grpc.StatusCode.RESOURCE_EXHAUSTED, 413),
        errors.Overloaded("x"): (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        errors.Unauthenticated("x"): (grpc.StatusCode.UNAUTHENTICATED, 401),
        errors.PermissionDenied("x"): (grpc.StatusCode.PERMISSION_DENIED, 403),
        errors.NotFound("x"): (grpc.StatusCode.NOT_FOUND, 404),
        errors.RequestTimeout("x"): (grpc.StatusCode.DEADLINE_EXCEEDED, 408),
        errors.FailedPrecondition("x"): (grpc.StatusCode.FAILED_PRECONDITION, 409),
        errors.NotReady("x"): (grpc.StatusCode.UNAVAILABLE, 503),
        errors.Unavailable("x"): (grpc.StatusCode.UNAVAILABLE, 503),
        errors.DeadlineExceeded("x"): (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
        errors.StorageFull("x"): (grpc.StatusCode.RESOURCE_EXHAUSTED, 507),
        errors.ModelFailure("x"): (grpc.StatusCode.INTERNAL, 500),
        ValueError("a bug"): (grpc.StatusCode.INTERNAL, 500),
    }
    for error, (code, http) in expected.items():
        assert (status_for(error), http_status_for(error)) == (code, http), type(error).__name__


def test_a_stages_status_reads_back_as_the_error_it_means_at_the_caller():
    """Written out: UNAVAILABLE is Unavailable (a stage not ready is, to its caller, unavailable), and errors that
    only this server raises (a refused token, a full disk) are never read back from a stage's status."""
    from twostage.status import ERROR_BY_STATUS

    assert ERROR_BY_STATUS == {
        grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
        grpc.StatusCode.OUT_OF_RANGE: errors.TooLong,
        grpc.StatusCode.RESOURCE_EXHAUSTED: errors.Overloaded,
        grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
        grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
        grpc.StatusCode.CANCELLED: errors.Cancelled,
        grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
        grpc.StatusCode.NOT_FOUND: errors.NotFound,
    }
