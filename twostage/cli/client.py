"""What every client command shares: the channel to a target and failures
explained in words, with a hint when the cause is a common mistake."""

import grpc

from twostage.connect import add_credential_flags

DEFAULT_TARGET = "localhost:50051"


def add_target_flag(parser, default: str = DEFAULT_TARGET, what: str = "gateway") -> None:
    """--target, plus --tls-dir and --token for a secured stack."""
    parser.add_argument("--target", default=default, help=f"{what} host:port (default {default})")
    add_credential_flags(parser)


def explain(error: grpc.RpcError, target: str, service: str = "twostage.v1.Gateway") -> str:
    """One line for the user: the status, what the server said, and a hint where one helps."""
    code, details = error.code(), error.details() or ""
    lowered = details.lower()
    # A plaintext client at a TLS port gets a closed socket (the server drops the handshake it cannot read),
    # not a refusal: something answers there.
    if code == grpc.StatusCode.UNAVAILABLE and any(
        text in lowered for text in ("socket closed", "connection reset", "end of file", "eof")
    ) and "connection refused" not in lowered:
        return (f"{target} closed the connection ({details}); if the stack serves TLS, pass --tls-dir with its "
                "ca.pem (and client.pem/client.key where it requires them)")
    if code == grpc.StatusCode.UNAVAILABLE and any(
        text in lowered for text in ("connection refused", "failed to connect", "dns resolution failed")
    ):
        return (f"nothing answers at {target} ({details}); start the stack with 'twostage serve all' "
                "(or 'make demo'), or pass --target HOST:PORT")
    if code == grpc.StatusCode.UNAVAILABLE and any(
        text in details.lower() for text in ("ssl", "handshake", "tls", "certificate")
    ):
        return (f"TLS handshake with {target} failed ({details}); pass --tls-dir with the stack's ca.pem (and "
                "client.pem/client.key where the server requires them)")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return (f"{target} does not serve {service}: is that a recall or rerank port? The gateway listens on "
                "50051 unless 'serve all --port' moved it")
    return f"{code.name}: {details}"
