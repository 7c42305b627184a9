"""``twostage health``: ask any twostage service (or several) whether it serves."""

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from twostage.cli.client import DEFAULT_TARGET, explain
from twostage.connect import PLAINTEXT, Credentials, add_credential_flags, credentials_from_args


def register(commands) -> None:
    parser = commands.add_parser("health", help="is a gateway, recall or rerank server serving? (exit 0 if all are)")
    parser.add_argument("--target", action="append", default=None, metavar="HOST:PORT",
                        help=f"a service to ask; repeat for several (default {DEFAULT_TARGET})")
    parser.add_argument("--service", default="",
                        help="a service name such as twostage.v1.Recall (default: the server as a whole)")
    parser.add_argument("--timeout-s", type=float, default=5.0)
    add_credential_flags(parser)
    parser.set_defaults(run=run)


def check(target: str, service: str, timeout_s: float, credentials: Credentials = PLAINTEXT) -> str:
    """SERVING, NOT_SERVING, SERVICE_UNKNOWN, or why there was no answer (health needs no token; one
    given is sent, so the check is not held to the cap on calls without a token)."""
    with credentials.channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s, metadata=credentials.metadata or None
            )
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            return f"NO ANSWER: {explain(error, target, 'grpc.health.v1.Health')}"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def run(args) -> int:
    healthy = True
    for target in args.target or [DEFAULT_TARGET]:
        status = check(target, args.service, args.timeout_s, credentials_from_args(args))
        healthy &= status == "SERVING"
        print(f"{target}{' ' + args.service if args.service else ''}: {status}")
    sys.stdout.flush()
    return 0 if healthy else 1
