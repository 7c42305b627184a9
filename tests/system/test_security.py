"""TLS, mutual TLS and bearer tokens with real handshakes on loopback: a gateway
that serves TLS to callers and calls its stages with mutual TLS and its own token."""

import asyncio
import os
import socket
import ssl
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from twostage.auth import add_token
from twostage.connect import Credentials
from twostage.dev_certs import make_ca, write_dev_certs
from twostage.probe import Health
from twostage.v1 import (
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    recall_pb2,
    recall_pb2_grpc,
    rerank_pb2,
    rerank_pb2_grpc,
)


@pytest.fixture(scope="module")
def secrets_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("secrets")
    ca = make_ca()
    write_dev_certs(root / "tls", ca=ca)
    write_dev_certs(root / "other-ca")  # a different CA altogether
    tokens = root / "tokens"
    search, admin, gateway, replica = (add_token(tokens, role) for role in ("search", "admin", "admin", "replica"))
    (root / "gateway-token").write_text(gateway)
    return {"root": root, "ca": ca, "tls": root / "tls", "other": root / "other-ca", "tokens": tokens,
            "search": search, "admin": admin, "replica": replica, "gateway_token_file": root / "gateway-token"}


@pytest.fixture(scope="module")
async def secured(secrets_dir, tmp_path_factory, built_index):
    """Recall and rerank requiring mutual TLS and tokens; a gateway with TLS and tokens in front."""
    import shutil

    from gateway.config import GatewaySettings
    from gateway.servicer import build_server as build_gateway
    from recall_server.config import RecallSettings
    from recall_server.service import RecallService
    from recall_server.servicer import build_server as build_recall
    from rerank_server.config import RerankSettings
    from rerank_server.service import RerankService
    from rerank_server.servicer import build_server as build_rerank

    security = {"tls_dir": secrets_dir["tls"], "auth_tokens": secrets_dir["tokens"]}
    index_dir = tmp_path_factory.mktemp("secured") / "index"
    shutil.copytree(built_index, index_dir)
    recall = build_recall(RecallService(RecallSettings(port=0, index_dir=index_dir, **security)))
    rerank = build_rerank(RerankService(RerankSettings(port=0, **security)))
    recall_port, rerank_port = await recall.start(), await rerank.start()
    gateway = build_gateway(GatewaySettings(
        port=0, http_port=0, recall_targets=f"127.0.0.1:{recall_port}", rerank_targets=f"127.0.0.1:{rerank_port}",
        stage_token_file=secrets_dir["gateway_token_file"], **security,
    ))
    gateway_port = await gateway.start()
    yield {"gateway": f"127.0.0.1:{gateway_port}", "recall": f"127.0.0.1:{recall_port}",
           "rerank": f"127.0.0.1:{rerank_port}", "gateway-http": f"127.0.0.1:{gateway.listeners[0].port}"}
    for server in (gateway, recall, rerank):
        await server.stop(grace_s=0)


def search_request(query="vitamin B12 and homocysteine"):
    return gateway_pb2.SearchRequest(query=query, recall_k=4, top_k=3)


async def call_gateway(credentials: Credentials, target: str, method="Search", request=None):
    async with credentials.aio_channel(target) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        return await getattr(stub, method)(request or search_request(), timeout=60, metadata=credentials.metadata)


async def status_of(coroutine) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await coroutine
    return caught.value.code(), caught.value.details()


async def code_of(call) -> grpc.StatusCode:
    """How a call left open (unary or streaming) ended."""
    try:
        if hasattr(call, "read"):
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def test_a_search_token_searches_end_to_end(secured, secrets_dir):
    reply = await call_gateway(Credentials(secrets_dir["tls"], secrets_dir["search"]), secured["gateway"])
    assert len(reply.hits) == 3 and reply.reranked == 4 and not reply.degraded


async def test_plaintext_and_foreign_ca_clients_fail_the_handshake(secured, secrets_dir):
    code, _ = await status_of(call_gateway(Credentials(None, secrets_dir["search"]), secured["gateway"]))
    assert code is grpc.StatusCode.UNAVAILABLE
    code, _ = await status_of(call_gateway(Credentials(secrets_dir["other"], secrets_dir["search"]), secured["gateway"]))
    assert code is grpc.StatusCode.UNAVAILABLE


async def test_a_stage_refuses_a_client_without_a_certificate(secured, secrets_dir, tmp_path):
    ca_only = tmp_path / "ca-only"
    ca_only.mkdir()
    (ca_only / "ca.pem").write_bytes((secrets_dir["tls"] / "ca.pem").read_bytes())
    request = rerank_pb2.RerankRequest(query="q", documents=["d"])
    for tls_dir, expected in ((ca_only, grpc.StatusCode.UNAVAILABLE), (secrets_dir["tls"], None)):
        credentials = Credentials(tls_dir, secrets_dir["search"])
        async with credentials.aio_channel(secured["rerank"]) as channel:
            call = rerank_pb2_grpc.RerankStub(channel).Rerank(request, timeout=30, metadata=credentials.metadata)
            if expected is None:
                assert len((await call).results) == 1  # the same call with the client certificate passes
            else:
                assert (await status_of(call))[0] is expected


async def test_tokens_and_roles(secured, secrets_dir):
    tls = secrets_dir["tls"]
    code, details = await status_of(call_gateway(Credentials(tls), secured["gateway"]))
    assert code is grpc.StatusCode.UNAUTHENTICATED and "missing token" in details
    code, details = await status_of(call_gateway(Credentials(tls, "ts_not-a-real-token"), secured["gateway"]))
    assert code is grpc.StatusCode.UNAUTHENTICATED and details == "unknown token"
    doc = common_pb2.Document(id="secured-1", title="Axolotl regeneration", text="Axolotls regrow their limbs.")
    upsert = common_pb2.UpsertRequest(documents=[doc])
    code, details = await status_of(
        call_gateway(Credentials(tls, secrets_dir["search"]), secured["gateway"], "Upsert", upsert)
    )
    assert code is grpc.StatusCode.PERMISSION_DENIED and "needs an admin token" in details
    # An admin token writes; the gateway passes the write on with its own credentials.
    reply = await call_gateway(Credentials(tls, secrets_dir["admin"]), secured["gateway"], "Upsert", upsert)
    assert reply.upserted == 1
    got = await call_gateway(Credentials(tls, secrets_dir["search"]), secured["gateway"], "Get",
                             common_pb2.GetRequest(ids=["secured-1"]))
    assert [d.id for d in got.documents] == ["secured-1"]


async def test_health_needs_no_token_and_reflection_is_hidden(secured, secrets_dir):
    credentials = Credentials(secrets_dir["tls"])
    for target in (secured["gateway"], secured["recall"], secured["rerank"]):
        async with credentials.aio_channel(target) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    async with credentials.aio_channel(secured["gateway"]) as channel:
        # Sent and half-closed in one batch: a streaming client can still be sending when the server refuses,
        # and then sees gRPC core's INTERNAL instead of the server's status. A served reflection method would
        # answer this call too.
        list_services = channel.unary_unary(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await list_services(reflection_pb2.ServerReflectionRequest(list_services=""), timeout=10)
        assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED


async def test_a_token_added_while_serving_is_accepted(secured, secrets_dir):
    token = add_token(secrets_dir["tokens"], "search", "added later")
    credentials = Credentials(secrets_dir["tls"], token)
    deadline = time.monotonic() + 30
    while True:  # the file is re-read at most once a second
        try:
            await call_gateway(credentials, secured["gateway"])
            break
        except grpc.aio.AioRpcError as error:
            assert error.code() is grpc.StatusCode.UNAUTHENTICATED and time.monotonic() < deadline
            await asyncio.sleep(0.2)


def served_certificate(target: str, ca_file) -> bytes:
    """The certificate a fresh TLS connection is shown (DER)."""
    host, port = target.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(ca_file))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=host) as tls_socket:
        return tls_socket.getpeercert(binary_form=True)


async def test_a_rotated_certificate_is_served_without_restart(secured, secrets_dir):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    def current_file() -> bytes:
        pem = (secrets_dir["tls"] / "server.pem").read_bytes()
        return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)

    ca_file = secrets_dir["tls"] / "ca.pem"
    credentials = Credentials(secrets_dir["tls"], secrets_dir["search"])
    async with credentials.aio_channel(secured["gateway"]) as open_channel:
        stub = gateway_pb2_grpc.GatewayStub(open_channel)
        await stub.Search(search_request(), timeout=60, metadata=credentials.metadata)
        before = await asyncio.to_thread(served_certificate, secured["gateway"], ca_file)
        assert before == current_file()
        write_dev_certs(secrets_dir["tls"], ca=secrets_dir["ca"])  # new leaves, same CA: what cert-manager does
        after = await asyncio.to_thread(served_certificate, secured["gateway"], ca_file)
        assert after == current_file() != before
        # The connection opened before the rotation keeps working.
        reply = await stub.Search(search_request(), timeout=60, metadata=credentials.metadata)
        assert reply.hits
    # And so does the whole path (the gateway's own client certificate toward the stages changed too).
    assert (await call_gateway(credentials, secured["gateway"])).reranked == 4


async def test_errors_do_not_reveal_internal_addresses(secrets_dir):
    from gateway.config import GatewaySettings
    from gateway.servicer import build_server as build_gateway

    gateway = build_gateway(GatewaySettings(port=0, recall_targets="127.0.0.1:1", rerank_targets="127.0.0.1:2",
                                            startup_wait_s=0))
    target = f"127.0.0.1:{await gateway.start()}"
    try:
        code, details = await status_of(call_gateway(Credentials(), target))
    finally:
        await gateway.stop(grace_s=0)
    assert code is grpc.StatusCode.UNAVAILABLE and "recall shard 0" in details
    assert "127.0.0.1" not in details and ":1" not in details


async def test_probes_get_health_in_plaintext_on_their_own_port(secrets_dir, models):
    """Kubernetes gRPC probes cannot speak TLS: a plaintext port serves health and nothing else."""
    from rerank_server.config import RerankSettings
    from rerank_server.service import RerankService
    from rerank_server.servicer import build_server as build_rerank

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        health_port = probe.getsockname()[1]
    server = build_rerank(RerankService(RerankSettings(port=0, tls_dir=secrets_dir["tls"],
                                                       auth_tokens=secrets_dir["tokens"], health_port=health_port)))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await rerank_pb2_grpc.RerankStub(channel).Rerank(rerank_pb2.RerankRequest(query="q", documents=["d"]),
                                                                 timeout=10)
            assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(grace_s=0)


async def test_a_replica_token_may_catch_up_and_do_nothing_else(secured, secrets_dir):
    credentials = Credentials(secrets_dir["tls"], secrets_dir["replica"])
    async with credentials.aio_channel(secured["recall"]) as channel:
        stub, metadata = recall_pb2_grpc.RecallStub(channel), credentials.metadata
        # This recall follows no snapshots, so its catch-up methods answer FAILED_PRECONDITION: from the
        # servicer itself, past the token check.
        for call in (stub.Changes(recall_pb2.ChangesRequest(limit=10), timeout=30, metadata=metadata),
                     stub.Digest(recall_pb2.DigestRequest(), timeout=30, metadata=metadata),
                     stub.Versions(recall_pb2.VersionsRequest(buckets=[0]), timeout=30, metadata=metadata)):
            code, details = await status_of(call)
            assert code is grpc.StatusCode.FAILED_PRECONDITION and "snapshot" in details
        doc = common_pb2.Document(id="replica-1", title="t", text="x")
        for call in (stub.Upsert(common_pb2.UpsertRequest(documents=[doc]), timeout=30, metadata=metadata),
                     stub.Delete(common_pb2.DeleteRequest(ids=["replica-1"]), timeout=30, metadata=metadata),
                     stub.Search(recall_pb2.RecallSearchRequest(query="q", k=1), timeout=30, metadata=metadata)):
            code, details = await status_of(call)
            assert code is grpc.StatusCode.PERMISSION_DENIED and "replica token may not" in details
    # Nor through the gateway.
    code, _ = await status_of(call_gateway(Credentials(secrets_dir["tls"], secrets_dir["replica"]), secured["gateway"]))
    assert code is grpc.StatusCode.PERMISSION_DENIED
    # And a search token may not read the store in bulk.
    search = Credentials(secrets_dir["tls"], secrets_dir["search"])
    async with search.aio_channel(secured["recall"]) as channel:
        code, _ = await status_of(recall_pb2_grpc.RecallStub(channel).Changes(
            recall_pb2.ChangesRequest(limit=1), timeout=30, metadata=search.metadata))
        assert code is grpc.StatusCode.PERMISSION_DENIED


async def test_search_callers_see_no_addresses_in_info_and_admins_do(secured, secrets_dir):
    request = common_pb2.InfoRequest()
    shown = await call_gateway(Credentials(secrets_dir["tls"], secrets_dir["search"]), secured["gateway"], "Info",
                               request)
    assert not shown.recall_targets and not shown.rerank_targets
    assert "127.0.0.1" not in str(shown)
    assert shown.default_top_k > 0  # the rest of Info is still there
    admin = await call_gateway(Credentials(secrets_dir["tls"], secrets_dir["admin"]), secured["gateway"], "Info",
                               request)
    assert list(admin.recall_targets) == [secured["recall"]] and list(admin.rerank_targets) == [secured["rerank"]]


async def test_a_tokens_file_rewritten_in_place_never_refuses_a_valid_token(secured, secrets_dir):
    """Truncate-then-write, as an editor or a config tool does, in a loop while calls run. Midway the writer
    adds a token and holds still: the server must take that token once the file settles (a server that
    never re-read the file would pass the rest), then the rewrites go on with both tokens."""
    import threading

    from twostage.auth import new_token, token_line

    tokens = secrets_dir["tokens"]
    content = tokens.read_bytes()
    added = new_token()
    current = [content]  # what the writer writes; replaced midway
    stop, hold, held, resume = threading.Event(), threading.Event(), threading.Event(), threading.Event()
    rewrites = 0

    def rewrite_in_place():
        nonlocal rewrites
        while not stop.is_set():
            data = current[0]
            with open(tokens, "r+b") as f:
                f.truncate(0)
                f.flush()
                os.fsync(f.fileno())  # the empty file is visible before the tokens come back
                f.write(data[: len(data) // 2])
                f.flush()
                f.write(data[len(data) // 2:])
            rewrites += 1
            if hold.is_set() and data is current[0]:  # the file now holds the new token: pause
                hold.clear()
                held.set()
                resume.wait()

    writer = threading.Thread(target=rewrite_in_place)
    writer.start()
    refused = []
    credentials = Credentials(secrets_dir["tls"], secrets_dir["search"])
    later = Credentials(secrets_dir["tls"], added)
    request = rerank_pb2.RerankRequest(query="q", documents=["d"])
    try:
        async with credentials.aio_channel(secured["rerank"]) as channel:
            stub = rerank_pb2_grpc.RerankStub(channel)

            async def calls_for(seconds: float, *callers: Credentials) -> int:
                calls, deadline = 0, time.monotonic() + seconds
                while time.monotonic() < deadline:
                    for caller in callers:
                        try:
                            await stub.Rerank(request, timeout=30, metadata=caller.metadata)
                        except grpc.aio.AioRpcError as error:
                            refused.append(error.code())
                        calls += 1
                return calls

            calls = await calls_for(3, credentials)  # several re-reads of the file (one a second at most)
            current[0] = content + token_line(added, "search", "added mid-rewrite").encode()
            hold.set()
            assert await asyncio.to_thread(held.wait, 10), "the writer did not pause"
            paused_at, deadline = time.monotonic(), time.monotonic() + 15
            while True:  # the file holds still now: the new token is taken within a few re-checks
                try:
                    await stub.Rerank(request, timeout=30, metadata=later.metadata)
                    break
                except grpc.aio.AioRpcError as error:
                    assert error.code() is grpc.StatusCode.UNAUTHENTICATED and time.monotonic() < deadline
                    await asyncio.sleep(0.1)
            accepted_after_s = time.monotonic() - paused_at
            resume.set()
            calls += await calls_for(3, credentials, later)
    finally:
        stop.set()
        resume.set()
        await asyncio.to_thread(writer.join)
        tokens.write_bytes(content)
    assert rewrites > 100 and calls > 10
    assert refused == []
    assert accepted_after_s < 15


async def test_unauthenticated_callers_cannot_take_the_slots_searches_need(secured, secrets_dir):
    """Health Watch streams and calls that never send their message, more than the server's cap, while
    authenticated searches run: every search succeeds and the unauthenticated excess is refused."""
    from gateway.config import GatewaySettings
    from gateway.servicer import build_server as build_gateway

    cap, open_cap = 8, 4
    floods = 2 * cap + open_cap + 4  # of each kind: more than gRPC's own cap (twice the slots, plus the open ones)
    gateway = build_gateway(GatewaySettings(
        port=0, recall_targets=secured["recall"], rerank_targets=secured["rerank"],
        stage_token_file=secrets_dir["gateway_token_file"], tls_dir=secrets_dir["tls"],
        auth_tokens=secrets_dir["tokens"], max_concurrent_rpcs=cap, max_open_rpcs=open_cap, message_timeout_s=2,
    ))
    target = f"127.0.0.1:{await gateway.start()}"
    attacker = Credentials(secrets_dir["tls"])  # TLS, no token
    channels = [attacker.aio_channel(target) for _ in range(3)]
    try:
        watch = channels[0].unary_stream("/grpc.health.v1.Health/Watch",
                                         request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                         response_deserializer=health_pb2.HealthCheckResponse.FromString)
        # Headers sent, message never: stream-unary calls that are never written to.
        stalled_check = channels[1].stream_unary("/grpc.health.v1.Health/Check",
                                                 request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                                 response_deserializer=health_pb2.HealthCheckResponse.FromString)
        stalled_search = channels[2].stream_unary("/twostage.v1.Gateway/Search",
                                                  request_serializer=gateway_pb2.SearchRequest.SerializeToString,
                                                  response_deserializer=gateway_pb2.SearchResponse.FromString)
        watches = [watch(health_pb2.HealthCheckRequest(), timeout=30) for _ in range(floods)]
        stalled = [stalled_check(timeout=30) for _ in range(floods)] + [stalled_search(timeout=30)
                                                                       for _ in range(floods)]
        for call in [*watches, *stalled]:  # every call's headers are out (some are refused at once)
            try:
                await call.wait_for_connection()
            except grpc.aio.AioRpcError:
                pass
        searcher = Credentials(secrets_dir["tls"], secrets_dir["search"])
        async with searcher.aio_channel(target) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            results = []
            for _ in range(3):  # rounds of as many searches at once as the cap allows
                results += await asyncio.gather(*(
                    stub.Search(search_request(), timeout=60, metadata=searcher.metadata) for _ in range(cap)
                ), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        assert not failed, failed[:3]

        codes = await asyncio.gather(*(code_of(c) for c in [*watches, *stalled]))
    finally:
        for channel in channels:
            await channel.close()
        await gateway.stop(grace_s=0)
    watch_codes, check_codes, search_codes = codes[:floods], codes[floods:2 * floods], codes[2 * floods:]
    assert set(watch_codes) == {grpc.StatusCode.UNIMPLEMENTED}  # Watch lives on the health port
    assert set(search_codes) == {grpc.StatusCode.UNAUTHENTICATED}  # refused on its headers, no message needed
    # Beyond the open cap: refused at once; within it: ended when no message came.
    assert check_codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= floods - open_cap
    assert set(check_codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}


def first_certificate_der(pem: bytes) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


@pytest.mark.slow
async def test_client_certificate_and_stage_token_rotate_under_load(secrets_dir, tmp_path, built_index):
    """cert-manager renews the gateway's client certificate and an operator rotates its stage token (new token
    added, gateway's file rewritten, old token revoked) while `twostage loadtest` runs: nothing fails, and the
    stage sees new connections present the new certificate and the new token."""
    import json
    import shutil
    import sys

    from gateway.config import GatewaySettings
    from gateway.servicer import build_server as build_gateway
    from recall_server.config import RecallSettings
    from recall_server.service import RecallService
    from recall_server.servicer import build_server as build_recall
    from rerank_server.config import RerankSettings
    from rerank_server.service import RerankService
    from rerank_server.servicer import RerankServicer
    from twostage.auth import token_line
    from twostage.server import GrpcService

    tls, tokens, gateway_token_file = tmp_path / "tls", tmp_path / "tokens", tmp_path / "gateway-token"
    write_dev_certs(tls, ca=secrets_dir["ca"])
    search, old_token = add_token(tokens, "search"), add_token(tokens, "admin", "gateway")
    gateway_token_file.write_text(old_token + "\n")
    seen: list[tuple[float, bytes, str]] = []  # (when, the client certificate, the token) per Rerank call

    class Recording(RerankServicer):
        async def Rerank(self, request, context):
            certificate = context.auth_context().get("x509_pem_cert", [b""])[0]
            token = dict(context.invocation_metadata()).get("authorization", "").removeprefix("Bearer ")
            seen.append((time.monotonic(), first_certificate_der(certificate), token))
            return await super().Rerank(request, context)

    security = {"tls_dir": tls, "auth_tokens": tokens}
    index_dir = tmp_path / "index"
    shutil.copytree(built_index, index_dir)
    rerank_service = RerankService(RerankSettings(port=0, **security))
    rerank = GrpcService("rerank", rerank_service.settings, ["twostage.v1.Rerank"],
                         lambda server: rerank_pb2_grpc.add_RerankServicer_to_server(Recording(rerank_service), server),
                         rerank_service)
    recall = build_recall(RecallService(RecallSettings(port=0, index_dir=index_dir, **security)))
    recall_port, rerank_port = await recall.start(), await rerank.start()
    gateway = build_gateway(GatewaySettings(
        port=0, recall_targets=f"127.0.0.1:{recall_port}", rerank_targets=f"127.0.0.1:{rerank_port}",
        stage_token_file=gateway_token_file, **security))
    target = f"127.0.0.1:{await gateway.start()}"
    report_file = tmp_path / "load.json"
    load = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "twostage", "loadtest", "--target", target, "--rate-rps", "3", "--duration-s", "14", "--recall-k", "4", "--top-k", "3", "--budget-ms", "10000",
        "--tls-dir", str(tls), "--json", str(report_file), env={**os.environ, "TWOSTAGE_TOKEN": search},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not seen:  # the load has reached the stage
            assert time.monotonic() < deadline and load.returncode is None, "the load never reached the stage"
            await asyncio.sleep(0.1)
        old_certificate = first_certificate_der((tls / "client.pem").read_bytes())
        assert seen[-1][1:] == (old_certificate, old_token)

        rotated_at = time.monotonic()
        write_dev_certs(tls, ca=secrets_dir["ca"])  # new leaves and keys, in place
        new_certificate = first_certificate_der((tls / "client.pem").read_bytes())
        # The token, in the order that never refuses a call: the stages accept it, then the gateway sends it.
        new_token = add_token(tokens, "admin", "gateway, rotated")
        probe = Credentials(tls, new_token)
        async with probe.aio_channel(f"127.0.0.1:{rerank_port}") as channel:
            while True:
                try:
                    await rerank_pb2_grpc.RerankStub(channel).Rerank(
                        rerank_pb2.RerankRequest(query="q", documents=["d"]), timeout=30, metadata=probe.metadata)
                    break
                except grpc.aio.AioRpcError as error:
                    assert error.code() is grpc.StatusCode.UNAUTHENTICATED and time.monotonic() - rotated_at < 20
                    await asyncio.sleep(0.1)
        token_at = time.monotonic()
        gateway_token_file.write_text(new_token + "\n")
        while not any(when > token_at and (cert, token) == (new_certificate, new_token)
                      for when, cert, token in seen):
            assert time.monotonic() - token_at < 20, "the gateway kept its old certificate or token"
            await asyncio.sleep(0.1)
        rotation_s = time.monotonic() - token_at
        # Revoke the old token: written beside and moved into place, as a Secret update is.
        kept = [line for line in tokens.read_text().splitlines(keepends=True)
                if line != token_line(old_token, "admin", "gateway")]
        (tmp_path / "tokens.new").write_text("".join(kept))
        os.replace(tmp_path / "tokens.new", tokens)
        revoked_at = time.monotonic()
        _, stderr = await asyncio.wait_for(load.communicate(), 120)
        assert load.returncode == 0, stderr.decode()[-2000:]
    finally:
        if load.returncode is None:
            load.kill()
            await load.wait()
        for server in (gateway, recall, rerank):
            await server.stop(grace_s=0)
    report = json.loads(report_file.read_text())
    print(f"new certificate and token in use {rotation_s:.2f} s after the token file changed; load: {report['requests']} requests, {report['ok']} ok")
    # Zero failed requests, and no answer without rerank for want of credentials (slow answers on a busy
    # machine may still be partly reranked).
    assert report["errors"] == {} and "rerank_unavailable" not in report["degraded"], report
    assert report["ok"] == report["requests"] > 20
    assert [when for when, _, _ in seen if when > revoked_at], "no load after the revocation"
    assert {token for when, _, token in seen if when > revoked_at + 1} == {new_token}


# Suites no TLS listener may accept, in any protocol version (IANA names).
WEAK = ("NULL", "anon", "EXPORT", "RC4", "DES", "MD5", "PSK", "SRP")


def sslyze_scan(port: int, ca_file: Path, client_tls: Path | None, full: bool = True):
    """A TLS scan (sslyze) of one listener: what a security scanner would flag."""
    from sslyze import (
        ClientAuthenticationCredentials,
        ScanCommand,
        Scanner,
        ServerNetworkConfiguration,
        ServerNetworkLocation,
        ServerScanRequest,
    )
    from sslyze.plugins.certificate_info.implementation import CertificateInfoExtraArgument
    from sslyze.scanner.models import ScanCommandsExtraArguments

    credentials = None if client_tls is None else ClientAuthenticationCredentials(
        certificate_chain_path=client_tls / "client.pem", key_path=client_tls / "client.key")
    request = ServerScanRequest(
        server_location=ServerNetworkLocation("localhost", port, ip_address="127.0.0.1"),
        network_configuration=ServerNetworkConfiguration("localhost", tls_client_auth_credentials=credentials),
        scan_commands={ScanCommand.CERTIFICATE_INFO, ScanCommand.SSL_2_0_CIPHER_SUITES,
                       ScanCommand.SSL_3_0_CIPHER_SUITES, ScanCommand.TLS_1_0_CIPHER_SUITES,
                       ScanCommand.TLS_1_1_CIPHER_SUITES, ScanCommand.TLS_1_2_CIPHER_SUITES,
                       ScanCommand.TLS_1_3_CIPHER_SUITES} if full else set(),
        scan_commands_extra_arguments=ScanCommandsExtraArguments(
            certificate_info=CertificateInfoExtraArgument(custom_ca_file=ca_file) if full else None),
    )
    scanner = Scanner()
    scanner.queue_scans([request])
    return next(iter(scanner.get_results()))


@pytest.mark.parametrize("tier", ["gateway", "gateway-http", "recall", "rerank"])
async def test_every_tls_listener_passes_the_scan(secured, secrets_dir, tier):
    # Imported, not skipped when missing: sslyze is a test dependency, and a broken install must fail here.
    from sslyze import ClientAuthRequirementEnum, ServerScanStatusEnum

    port = int(secured[tier].rsplit(":", 1)[1])
    ca_file = secrets_dir["tls"] / "ca.pem"
    stage = tier not in ("gateway", "gateway-http")
    # The stages are scanned as the gateway (with its client certificate): without one nothing gets through.
    result = await asyncio.to_thread(sslyze_scan, port, ca_file, secrets_dir["tls"] if stage else None)
    assert result.scan_status is ServerScanStatusEnum.COMPLETED, result.connectivity_error_trace
    if stage:  # probed without a client certificate, the stage completes no handshake at all
        bare = await asyncio.to_thread(sslyze_scan, port, ca_file, None, False)
        assert bare.scan_status is ServerScanStatusEnum.ERROR_NO_CONNECTIVITY and bare.connectivity_result is None
    else:
        assert result.connectivity_result.client_auth_requirement is ClientAuthRequirementEnum.DISABLED
    scans = result.scan_result
    for old in ("ssl_2_0_cipher_suites", "ssl_3_0_cipher_suites", "tls_1_0_cipher_suites", "tls_1_1_cipher_suites"):
        attempt = getattr(scans, old)
        assert attempt.result is not None, (old, attempt.error_trace)
        assert not attempt.result.accepted_cipher_suites, old  # TLS 1.2 and 1.3 only
    accepted = []
    for current in ("tls_1_2_cipher_suites", "tls_1_3_cipher_suites"):
        attempt = getattr(scans, current)
        assert attempt.result is not None, (current, attempt.error_trace)
        assert attempt.result.accepted_cipher_suites, current  # both are served
        accepted += [s.cipher_suite for s in attempt.result.accepted_cipher_suites]
    for suite in accepted:
        assert not suite.is_anonymous and suite.key_size >= 128, suite.name
        assert not any(weak in suite.name for weak in WEAK), suite.name
        # Forward secrecy: an ephemeral key exchange (TLS 1.3 suites always have one).
        assert suite.name.startswith(("TLS_ECDHE_", "TLS_DHE_")) or suite.openssl_name.startswith("TLS_"), suite.name
    # gRPC's policy on every listener: on TLS 1.2, ECDHE with an AEAD cipher and nothing else (no CBC, no DHE).
    for accepted in scans.tls_1_2_cipher_suites.result.accepted_cipher_suites:
        name = accepted.cipher_suite.name
        assert name.startswith("TLS_ECDHE_") and ("_GCM_" in name or "_CHACHA20_POLY1305_" in name), (tier, name)
    deployments = scans.certificate_info.result.certificate_deployments
    validations = [v for d in deployments for v in d.path_validation_results if v.trust_store.path == ca_file]
    assert validations and all(v.was_validation_successful for v in validations), validations


async def test_a_tokens_file_that_fails_to_parse_keeps_the_last_good_tokens(tmp_path, caplog):
    from twostage.auth import TokenFile

    path = tmp_path / "tokens"
    token = add_token(path, "search")
    tokens = TokenFile(path, recheck_s=0)
    good = path.read_bytes()
    for bad in (b"\xff\xfe not utf-8\n", b"sha256:short search\n"):
        path.write_bytes(bad)
        for _ in range(3):  # seen twice unchanged, then read (and refused)
            assert await tokens.role_of(token) == "search"
        path.write_bytes(good)
        await tokens.role_of(token)
    assert "keeping the previous tokens" in caplog.text


class _NoLifecycle:
    async def start(self) -> None: ...

    async def close(self) -> None: ...


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_a_flood_on_the_health_port_cannot_fail_a_probe():
    """More Watch streams and header-only Checks than the old cap of 64 on the plaintext health port:
    Watch is refused, stalled Checks end on the message timeout, and a probe's Check still answers."""
    from twostage.config import ServiceSettings
    from twostage.server import GrpcService

    health_port = free_port()
    service = GrpcService("probe-flood", ServiceSettings(port=0, health_port=health_port, message_timeout_s=3),
                          [], lambda server: None, _NoLifecycle())
    await service.start()
    target, floods = f"127.0.0.1:{health_port}", 80
    attacker = grpc.aio.insecure_channel(target)
    try:
        watch = attacker.unary_stream("/grpc.health.v1.Health/Watch",
                                      request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                      response_deserializer=health_pb2.HealthCheckResponse.FromString)
        stalled_check = attacker.stream_unary("/grpc.health.v1.Health/Check",
                                              request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                              response_deserializer=health_pb2.HealthCheckResponse.FromString)
        watches = [watch(health_pb2.HealthCheckRequest(), timeout=60) for _ in range(floods)]
        stalled = [stalled_check(timeout=60) for _ in range(floods)]
        for call in [*watches, *stalled]:
            try:
                await call.wait_for_connection()
            except grpc.aio.AioRpcError:
                pass
        async with grpc.aio.insecure_channel(target) as probe:
            reply = await health_pb2_grpc.HealthStub(probe).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

        # Bounded well below the calls' own 60 s deadline: the server ends them, not the client.
        watch_codes = await asyncio.wait_for(asyncio.gather(*(code_of(c) for c in watches)), 20)
        check_codes = await asyncio.wait_for(asyncio.gather(*(code_of(c) for c in stalled)), 20)
    finally:
        await attacker.close()
        await service.stop(grace_s=0)
    assert set(watch_codes) == {grpc.StatusCode.UNIMPLEMENTED}
    assert set(check_codes) == {grpc.StatusCode.DEADLINE_EXCEEDED}


async def test_stalled_checks_cannot_fail_the_health_checks_of_callers_with_a_token(secrets_dir):
    """Header-only Checks fill the open slots of a stage with auth; a Check with a valid token still answers,
    and so does the gateway's own health check of that stage (its rerank client, with its stage token)."""
    from gateway.clients import RerankClient
    from twostage.config import ServiceSettings
    from twostage.connect import ReloadingCredentials
    from twostage.server import GrpcService

    open_cap = 2
    stage = GrpcService("stage", ServiceSettings(port=0, tls_dir=secrets_dir["tls"], tls_client_auth=True,
                                                 auth_tokens=secrets_dir["tokens"], max_open_rpcs=open_cap,
                                                 message_timeout_s=30),
                        [], lambda server: None, _NoLifecycle())
    target = f"127.0.0.1:{await stage.start()}"
    attacker = Credentials(secrets_dir["tls"]).aio_channel(target)  # a client certificate, no token
    client = RerankClient(target, "rerank 0", ReloadingCredentials(secrets_dir["tls"],
                                                                   secrets_dir["gateway_token_file"]).load())
    try:
        stalled_check = attacker.stream_unary("/grpc.health.v1.Health/Check",
                                              request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                              response_deserializer=health_pb2.HealthCheckResponse.FromString)
        stalled = [stalled_check(timeout=60) for _ in range(open_cap)]
        for call in stalled:
            await call.wait_for_connection()
        check = health_pb2_grpc.HealthStub(attacker).Check
        # The open slots are full: a Check without a token is refused...
        code, _ = await status_of(check(health_pb2.HealthCheckRequest(), timeout=10))
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
        # ...and one with a token is not.
        searcher = Credentials(secrets_dir["tls"], secrets_dir["search"])
        async with searcher.aio_channel(target) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10,
                                                                     metadata=searcher.metadata)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert await client.health_status(10) is Health.SERVING
        for call in stalled:
            call.cancel()
    finally:
        await client.close()
        await attacker.close()
        await stage.stop(grace_s=0)


async def test_an_open_reflection_stream_ends_on_the_message_timeout(secrets_dir):
    """Reflection served beside auth: a stream without a token that asks once and then stays open, or never
    asks at all, is ended by the server after message_timeout_s, not held for as long as its caller likes."""
    from twostage.config import ServiceSettings
    from twostage.server import GrpcService

    service = GrpcService("reflecting", ServiceSettings(port=0, tls_dir=secrets_dir["tls"],
                                                        auth_tokens=secrets_dir["tokens"], reflection="on",
                                                        message_timeout_s=2),
                          [], lambda server: None, _NoLifecycle())
    target = f"127.0.0.1:{await service.start()}"
    try:
        async with Credentials(secrets_dir["tls"]).aio_channel(target) as channel:
            info = channel.stream_stream(
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )
            silent, asking = info(timeout=60), info(timeout=60)
            await asking.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            reply = await asyncio.wait_for(asking.read(), 10)
            assert "grpc.health.v1.Health" in [s.name for s in reply.list_services_response.service]

            async def code_of(call):
                try:
                    while await call.read() is not grpc.aio.EOF:
                        pass
                except grpc.aio.AioRpcError as error:
                    return error.code()
                return grpc.StatusCode.OK

            # Bounded well below the calls' own 60 s deadline: the server ends them, not the client.
            codes = await asyncio.wait_for(asyncio.gather(code_of(silent), code_of(asking)), 20)
    finally:
        await service.stop(grace_s=0)
    assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 2


async def test_a_tokens_file_deleted_while_serving_keeps_the_last_good_tokens(tmp_path, caplog):
    """The tokens file vanishes (a Secret unmounted, a botched edit) while calls run: the tokens already
    loaded still work, no call comes back UNKNOWN, and the loss is logged once."""
    from twostage.auth import TokenAuthInterceptor, TokenFile

    path = tmp_path / "tokens"
    token = add_token(path, "search")
    interceptor = TokenAuthInterceptor(TokenFile(path, recheck_s=0), open_reflection=False)
    server = grpc.aio.server(interceptors=[interceptor])
    info = grpc.unary_unary_rpc_method_handler(
        lambda request, context: asyncio.sleep(0, common_pb2.InfoRequest()),
        request_deserializer=common_pb2.InfoRequest.FromString,
        response_serializer=common_pb2.InfoRequest.SerializeToString)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("twostage.v1.Rerank", {"Info": info})])
    target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    codes = []
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            call = channel.unary_unary("/twostage.v1.Rerank/Info",
                                       request_serializer=common_pb2.InfoRequest.SerializeToString,
                                       response_deserializer=common_pb2.InfoRequest.FromString)
            metadata = (("authorization", f"Bearer {token}"),)
            await call(common_pb2.InfoRequest(), timeout=10, metadata=metadata)
            path.unlink()
            for _ in range(50):  # every call re-checks the missing file
                try:
                    await call(common_pb2.InfoRequest(), timeout=10, metadata=metadata)
                    codes.append(grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as error:
                    codes.append((error.code(), error.details()))
            # The file comes back with another token: read once it held still over two checks.
            later = add_token(path, "search")
            replies = []
            for _ in range(3):
                try:
                    await call(common_pb2.InfoRequest(), timeout=10, metadata=(("authorization", f"Bearer {later}"),))
                    replies.append(grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as error:
                    replies.append(error.code())
    finally:
        await server.stop(0)
    assert codes == [grpc.StatusCode.OK] * 50
    assert replies[-1] is grpc.StatusCode.OK and set(replies) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED}
    assert caplog.text.count("keeping the previous tokens") == 1


async def test_one_connection_holds_at_most_max_streams_per_connection_calls(secrets_dir):
    from twostage.config import ServiceSettings
    from twostage.server import GrpcService

    service = GrpcService("streams", ServiceSettings(port=0, tls_dir=secrets_dir["tls"],
                                                     auth_tokens=secrets_dir["tokens"], max_streams_per_connection=2,
                                                     message_timeout_s=30),
                          [], lambda server: None, _NoLifecycle())
    target = f"127.0.0.1:{await service.start()}"
    credentials = Credentials(secrets_dir["tls"])
    try:
        async with credentials.aio_channel(target) as crowded, credentials.aio_channel(target) as other:
            stalled_check = crowded.stream_unary("/grpc.health.v1.Health/Check",
                                                 request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                                 response_deserializer=health_pb2.HealthCheckResponse.FromString)
            stalled = [stalled_check(timeout=60) for _ in range(2)]
            for call in stalled:
                await call.wait_for_connection()
            # A third call on that connection waits for a free stream (and here runs out of time)...
            code, _ = await status_of(health_pb2_grpc.HealthStub(crowded).Check(health_pb2.HealthCheckRequest(),
                                                                                timeout=2))
            assert code is grpc.StatusCode.DEADLINE_EXCEEDED
            # ...while another connection is served at once.
            reply = await health_pb2_grpc.HealthStub(other).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            for call in stalled:
                call.cancel()
    finally:
        await service.stop(grace_s=0)
