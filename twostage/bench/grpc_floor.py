"""The floor under a gateway hop: a minimal grpc.aio unary echo between two
processes on loopback, with the same Python and grpcio, carrying bytes the
size of a recall reply and of a rerank request (no protobuf, no interceptor,
no handler work). What a hop measures above it is ours.

``python -m twostage.bench.grpc_floor --port P`` serves; ``floor`` starts one
and times calls to it.
"""

import argparse
import asyncio
import statistics
import sys
import time

import grpc

SERVICE = "twostage.bench.Floor"
ANSWER = b"x" * 64  # a rerank reply: a few scores and timings


def _sizes(request: bytes) -> tuple[int, int]:
    """A request says how many bytes to answer with (its first 8), whatever it carries after them."""
    return int.from_bytes(request[:8], "big"), len(request)


async def _echo(request: bytes, context) -> bytes:
    size, _ = _sizes(request)
    return b"x" * size if size else ANSWER


async def serve(port: int) -> None:
    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(_echo)  # bytes in, bytes out
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {"Echo": handler})])
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"floor serving on port {bound}", flush=True)
    await server.wait_for_termination()


def shapes(candidates: int, text_bytes: int = 1100) -> dict[str, tuple[int, int]]:
    """(request bytes, reply bytes) of a recall hop (a query out, ``candidates`` documents back) and of a rerank
    hop (the query and the documents out, their scores back)."""
    documents = candidates * (text_bytes + 40)  # text and title, id, scores and framing
    return {"recall": (120, documents), "rerank": (documents, 0)}


async def floor(requests: int, candidates: int, rounds: int = 3) -> dict:
    """p50 round trip, in ms, of each hop shape against a fresh echo server in its own process; the shapes take
    turns call by call, ``rounds`` rounds of ``requests`` calls each, the median of the rounds' p50s."""
    server = await asyncio.create_subprocess_exec(sys.executable, "-m", __name__, "--port", "0",
                                                  stdout=asyncio.subprocess.PIPE)
    try:
        line = (await asyncio.wait_for(server.stdout.readline(), 60)).decode()
        if not line.startswith("floor serving on port"):
            raise RuntimeError(f"the echo server did not start: {line!r}")
        port = int(line.rsplit(" ", 1)[1])
        sizes = shapes(candidates)
        bodies = {name: reply.to_bytes(8, "big") + b"q" * max(0, request - 8) for name, (request, reply) in sizes.items()}
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            echo = channel.unary_unary(f"/{SERVICE}/Echo")
            for _ in range(50):  # warm: the connection, both ends' code
                for body in bodies.values():
                    await echo(body)
            p50s = {name: [] for name in bodies}
            for _ in range(rounds):
                times = {name: [] for name in bodies}
                for _ in range(requests):
                    for name, body in bodies.items():
                        start = time.perf_counter()
                        await echo(body)
                        times[name].append(1000 * (time.perf_counter() - start))
                for name, each in times.items():
                    p50s[name].append(statistics.median(each))
    finally:
        if server.returncode is None:  # a server that died at start has its own error, not this one's
            server.terminate()
        await server.wait()
    return {"candidates": candidates, "bytes": {name: {"request": r, "reply": a} for name, (r, a) in sizes.items()},
            "p50_ms": {name: round(statistics.median(each), 3) for name, each in p50s.items()},
            "p50_ms_each": {name: [round(v, 3) for v in each] for name, each in p50s.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    asyncio.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
