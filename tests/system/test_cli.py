"""The command line as a user runs it: ``twostage serve all`` in its own
process, ``twostage search`` against it, then SIGTERM."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys

import grpc
import pytest

from twostage.cli import main

pytestmark = pytest.mark.slow


def free_port_run(count: int) -> int:
    """A base port with ``count`` consecutive free ports after it."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count >= 65535:
            continue
        try:
            sockets = [socket.create_server(("127.0.0.1", base + i)) for i in range(count)]
        except OSError:
            continue
        for s in sockets:
            s.close()
        return base
    raise RuntimeError("no run of free ports")


def twostage(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "twostage", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_serve_all_search_then_sigterm(built_index):
    port = free_port_run(3)
    stack = subprocess.Popen(
        [sys.executable, "-m", "twostage", "serve", "all", "--port", str(port), "--index-dir", str(built_index)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        lines = []
        for line in stack.stdout:  # blocks until the stack prints that it is ready (or exits)
            lines.append(line)
            if line.startswith("twostage is serving"):
                break
        else:
            pytest.fail("stack exited before serving:\n" + "".join(lines))
        result = twostage("search", "homocysteine and vitamin B12", "--target", f"127.0.0.1:{port}",
                          "--recall-k", "8", "--top-k", "3", "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        response = json.loads(result.stdout)
        assert len(response["hits"]) == 3 and not response["degraded"]
        assert all(hit["rerank_score"] is not None and hit["recall_rank"] >= 1 for hit in response["hits"])
    finally:
        stack.send_signal(signal.SIGTERM)
        remaining, _ = stack.communicate(timeout=60)
    assert stack.returncode == 0, remaining
    assert remaining.count("stopped") == 3  # every tier drained and stopped


def test_search_against_nothing_fails_cleanly(capsys):
    assert main(["search", "anything", "--target", "127.0.0.1:1", "--timeout-s", "2"]) == 1
    error = capsys.readouterr().err
    assert "search failed: nothing answers at 127.0.0.1:1" in error
    assert "start the stack with 'twostage serve all'" in error


def test_errors_exit_2_with_a_message(capsys, tmp_path):
    assert main(["index", "build", "--corpus", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "ix")]) == 2
    assert "twostage: error: no corpus at" in capsys.readouterr().err
    assert not (tmp_path / "ix").exists()


def wait_for_line(process: subprocess.Popen, prefix: str) -> list[str]:
    """Read the process's output until a line starts with ``prefix``; fail if it exits first."""
    lines = []
    for line in process.stdout:  # blocks until the line comes (or the process exits)
        lines.append(line)
        if line.startswith(prefix):
            return lines
    pytest.fail(f"exited before printing {prefix!r}:\n" + "".join(lines))


def test_day_one_on_a_sharded_stack(sharded_index, tmp_path):
    """Serve two shards, check health, add documents with metadata from the CLI, find them in search with
    their metadata, read and delete them, then kill a child: the stack says which one died."""
    import shutil

    index = tmp_path / "index"
    shutil.copytree(sharded_index, index)
    port = free_port_run(5)  # gateway, 2 recall shards, 1 rerank
    metrics = free_port_run(4)
    stack = subprocess.Popen(
        [sys.executable, "-m", "twostage", "serve", "all", "--port", str(port), "--index-dir", str(index),
         "--recall-shards", "2", "--metrics-port", str(metrics)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    gateway = f"127.0.0.1:{port}"
    try:
        ready = wait_for_line(stack, "twostage is serving")[-1]
        assert f"metrics on ports {metrics}, {metrics + 1}, {metrics + 2}, {metrics + 3}" in ready
        targets = [f"127.0.0.1:{port + i}" for i in range(4)]
        health = twostage("health", *[arg for t in targets for arg in ("--target", t)])
        assert health.returncode == 0 and health.stdout.count(": SERVING") == 4, health.stdout

        docs = tmp_path / "docs.jsonl"
        rows = [{"_id": f"cli-{i}", "title": f"Tardigrade study {i}", "lang": "en", "year": 2000 + i,
                 "text": "Tardigrades survive complete desiccation by entering a tun state.", "tags": ["bio"]}
                for i in range(6)]
        docs.write_text("".join(json.dumps(r) + "\n" for r in rows))
        upsert = twostage("docs", "upsert", str(docs), "--target", gateway, "--batch-size", "4")
        assert upsert.returncode == 0 and "upserted 6 documents" in upsert.stdout, upsert.stderr

        got = twostage("docs", "get", "cli-3", "--target", gateway)
        assert got.returncode == 0
        assert json.loads(got.stdout)["metadata"] == {"lang": "en", "year": 2003, "tags": ["bio"]}

        found = twostage("search", "tardigrades surviving desiccation", "--target", gateway, "--recall-k", "10",
                         "--top-k", "6", "--json")
        hits = json.loads(found.stdout)["hits"]
        assert {h["id"] for h in hits} == {r["_id"] for r in rows}  # one copy each, from its own shard
        assert all(h["metadata"]["lang"] == "en" and h["metadata"]["year"] >= 2000 for h in hits)

        deleted = twostage("docs", "delete", "cli-0", "cli-1", "never-stored", "--target", gateway)
        assert deleted.returncode == 0 and "deleted 2 of 3" in deleted.stdout
        missing = twostage("docs", "get", "cli-0", "cli-2", "--target", gateway)
        assert missing.returncode == 1 and "not found: cli-0" in missing.stderr and '"cli-2"' in missing.stdout

        # A reader that goes away early gets no traceback.
        piped = subprocess.run(
            f"{sys.executable} -m twostage search tardigrades --target {gateway} --recall-k 100 --top-k 100 "
            "--budget-ms 50 --json | head -c 10", shell=True, capture_output=True, text=True, timeout=120, check=False,
        )
        assert piped.stdout == '{\n  "hits"' and "Traceback" not in piped.stderr and "Broken pipe" not in piped.stderr

        recall = subprocess.run(["pgrep", "-f", f"recall_server --host 127.0.0.1 --port {port + 1}"],
                                capture_output=True, text=True, check=True).stdout.split()
        os.kill(int(recall[0]), signal.SIGKILL)
        _, errors = stack.communicate(timeout=60)
        assert stack.returncode == 1
        assert f"recall shard 0 (pid {recall[0]}) was killed by SIGKILL; stopping the stack" in errors
    finally:
        if stack.poll() is None:
            stack.send_signal(signal.SIGTERM)
            stack.communicate(timeout=60)


def test_serve_all_refuses_a_busy_port_naming_it(built_index):
    port = free_port_run(3)
    with socket.create_server(("127.0.0.1", port + 1)):
        result = twostage("serve", "all", "--port", str(port), "--index-dir", str(built_index))
    assert result.returncode == 2
    assert f"port 127.0.0.1:{port + 1} is in use" in result.stderr and "Traceback" not in result.stderr


def test_a_server_refuses_a_port_another_server_holds(built_index):
    """Without SO_REUSEPORT a second server on the same port fails instead of sharing the traffic."""
    port = free_port_run(1)
    with socket.create_server(("127.0.0.1", port)):
        result = twostage("serve", "gateway", "--port", str(port), "--startup-wait-s", "0")
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}: the port is in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_all_with_a_wrong_index_dir_fails_in_one_line(tmp_path):
    result = twostage("serve", "all", "--port", str(free_port_run(3)), "--index-dir", str(tmp_path / "nothing"))
    assert result.returncode == 2
    assert result.stderr.strip() == (f"twostage: error: no index at {tmp_path / 'nothing'}; build one with "
                                     "'twostage index build (or twostage demo)'")


async def test_client_commands_explain_common_mistakes(recall_target, capsys):
    # In a thread: the servers run on this test's event loop.
    assert await asyncio.to_thread(main, ["search", "anything", "--target", recall_target]) == 1
    assert "does not serve twostage.v1.Gateway: is that a recall or rerank port?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["search", "anything", "--top-k", "-1"])
    assert "argument --top-k: must be at least 0, got -1" in capsys.readouterr().err


async def test_health_reports_each_target(recall_target, rerank_target, capsys):
    assert await asyncio.to_thread(main, ["health", "--target", recall_target, "--target", rerank_target]) == 0
    assert capsys.readouterr().out.count(": SERVING") == 2
    assert await asyncio.to_thread(main, ["health", "--target", recall_target, "--service", "twostage.v1.Gateway"]) == 1
    assert "SERVICE_UNKNOWN" in capsys.readouterr().out
    assert main(["health", "--target", "127.0.0.1:1", "--timeout-s", "2"]) == 1
    assert "NO ANSWER: nothing answers at 127.0.0.1:1" in capsys.readouterr().out


def test_a_busy_metrics_port_is_named():
    port = free_port_run(1)
    with socket.create_server(("127.0.0.1", port)):
        result = twostage("serve", "gateway", "--port", "0", "--metrics-port", str(port), "--startup-wait-s", "0")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}: Address already in use; choose another --metrics-port" in (
        result.stderr
    )


def test_serve_all_and_search_with_tls_and_tokens(built_index, tmp_path):
    """The demo flow with every hop on TLS and every call carrying a token."""
    tls = tmp_path / "tls"
    assert twostage("certs", "dev", "--out", str(tls)).returncode == 0
    assert sorted(p.name for p in tls.iterdir()) == ["ca.pem", "client.key", "client.pem", "server.key", "server.pem"]
    assert oct((tls / "server.key").stat().st_mode & 0o777) == "0o600"
    tokens = tmp_path / "tokens"
    made = twostage("auth", "add-token", "--role", "search", "--file", str(tokens))
    token = made.stdout.strip()
    assert made.returncode == 0 and token.startswith("ts_") and token not in tokens.read_text()

    port = free_port_run(3)
    stack = subprocess.Popen(
        [sys.executable, "-m", "twostage", "serve", "all", "--port", str(port), "--index-dir", str(built_index),
         "--tls-dir", str(tls), "--auth-tokens", str(tokens)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    target = f"127.0.0.1:{port}"
    try:
        wait_for_line(stack, "twostage is serving")
        env = {**os.environ, "TWOSTAGE_TOKEN": token}
        found = subprocess.run(
            [sys.executable, "-m", "twostage", "search", "homocysteine and vitamin B12", "--target", target,
             "--tls-dir", str(tls), "--recall-k", "4", "--top-k", "2", "--json"],
            capture_output=True, text=True, timeout=120, check=False, env=env,
        )
        assert found.returncode == 0, found.stderr
        assert json.loads(found.stdout)["reranked"] == 4
        refused = twostage("search", "x", "--target", target, "--tls-dir", str(tls))
        assert refused.returncode == 1 and "UNAUTHENTICATED: missing token" in refused.stderr
        plaintext = twostage("search", "x", "--target", target, "--token", token, "--timeout-s", "5")
        assert plaintext.returncode == 1
        health = twostage("health", "--target", target, "--target", f"127.0.0.1:{port + 1}", "--tls-dir", str(tls))
        assert health.returncode == 0, health.stdout  # probes need no token
    finally:
        stack.send_signal(signal.SIGTERM)
        stack.communicate(timeout=60)
    assert stack.returncode == 0


async def test_search_with_filters_and_options_from_the_command_line(gateway_target, channel_to, capsys):
    from twostage.convert import document_to_proto
    from twostage.corpus import Document
    from twostage.v1 import common_pb2, gateway_pb2_grpc

    products = [Document(f"shop-{i}", f"Camping kettle {i}", "A steel kettle that boils water over a camp stove.",
                         {"shop_price": 10 * i, "shop_cat": ["garden", "outdoor", "kitchen"][i % 3],
                          "shop_tags": ["travel"] if i % 2 else ["home"], "shop_in_stock": i != 4})
                for i in range(6)]
    stub = gateway_pb2_grpc.GatewayStub(channel_to(gateway_target))
    await stub.Upsert(common_pb2.UpsertRequest(documents=[document_to_proto(d) for d in products]))

    async def search(*flags: str) -> dict:
        code = await asyncio.to_thread(main, ["search", "camping kettle", "--target", gateway_target, "--recall-k",
                                              "50", "--top-k", "50", "--json", *flags])
        out, err = capsys.readouterr()
        assert code == 0, err
        return json.loads(out)

    def shop_ids(response: dict) -> set[str]:
        return {h["id"] for h in response["hits"] if h["id"].startswith("shop-")}

    assert shop_ids(await search("--filter", "shop_price<=30", "--filter", "shop_tags=travel")) == {"shop-1", "shop-3"}
    assert shop_ids(await search("--filter", "shop_cat in garden,outdoor", "--filter", "shop_in_stock=true")) == {
        "shop-0", "shop-1", "shop-3"}
    assert shop_ids(await search("--filter", '{"shop_price": {"gt": 10, "lt": 50}}')) == {"shop-2", "shop-3", "shop-4"}
    lexical = await search("--filter", "shop_price>=0", "--recall-mode", "lexical", "--skip-rerank")
    assert lexical["reranked"] == 0 and not lexical["degraded"] and shop_ids(lexical) == {f"shop-{i}" for i in range(6)}
    assert all(h["lexical_score"] > 0 for h in lexical["hits"])
    fused = await search("--filter", "shop_price>=0", "--fusion", "none", "--score-threshold", "0")
    assert all(h["score"] == h["rerank_score"] >= 0 for h in fused["hits"])

    assert await asyncio.to_thread(main, ["search", "x", "--target", gateway_target, "--filter", "shop_price<=cheap"]) == 2
    assert "<= compares with a number, got 'cheap'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["search", "x", "--alpha", "2"])
    assert "must be between 0 and 1" in capsys.readouterr().err


async def test_a_plaintext_client_at_a_tls_port_is_told_to_pass_tls_dir(tmp_path, capsys):
    from twostage.dev_certs import write_dev_certs
    from twostage.tls import server_credentials

    write_dev_certs(tmp_path)
    server = grpc.aio.server()
    port = server.add_secure_port("127.0.0.1:0", server_credentials(tmp_path, False))
    await server.start()
    try:
        code = await asyncio.to_thread(main, ["search", "x", "--target", f"127.0.0.1:{port}", "--timeout-s", "5"])
    finally:
        await server.stop(None)
    error = capsys.readouterr().err
    assert code == 1 and "if the stack serves TLS, pass --tls-dir" in error and "nothing answers" not in error
