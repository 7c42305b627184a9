"""The command line as a user runs it: ``twostage serve all`` in its own
process, ``twostage search`` against it, then SIGTERM."""

import json
import os
import signal
import socket
import subprocess
import sys

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
    assert "search failed: UNAVAILABLE" in capsys.readouterr().out


def test_errors_exit_2_with_a_message(capsys, tmp_path):
    assert main(["index", "build", "--corpus", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "ix")]) == 2
    assert "twostage: error: no corpus at" in capsys.readouterr().err
    assert not (tmp_path / "ix").exists()
