"""A hub server that accepts the connection but never answers: a one-line error in seconds, no hang."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from .cli_helpers import REPO


@pytest.fixture
def silent_hub():
    """``http://127.0.0.1:PORT`` that accepts connections and never answers; it stops by itself after 60 s."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    stop = threading.Event()
    accepted = []

    def serve():
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                accepted.append(server.accept()[0])  # keep it open, say nothing
            except OSError:
                pass
        for conn in accepted:
            conn.close()
        server.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", accepted
    stop.set()
    thread.join(5)


def _cli(endpoint: str, *args: str, timeout: str = "2") -> tuple[subprocess.CompletedProcess, float]:
    env = {
        **os.environ,
        "HF_ENDPOINT": endpoint,
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_ETAG_TIMEOUT": timeout,
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        "MLX_ABLITERATION_LOG_FILE": os.devnull,
    }
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy", "HF_TOKEN"):
        env.pop(name, None)
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_abliteration", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    return proc, time.monotonic() - start


def _assert_fast_one_line(proc, elapsed, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "did not answer within 2 s" in last, last
    for needle in needles:
        assert needle in last, last
    assert elapsed < 40, elapsed


def test_silent_hub_model_fails_in_seconds(silent_hub, tmp_path):
    endpoint, accepted = silent_hub
    proc, elapsed = _cli(
        endpoint,
        "probe",
        "-m",
        "someone/some-model",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--output",
        str(tmp_path / "d.safetensors"),
    )
    assert accepted, "the CLI never connected to the test server"
    _assert_fast_one_line(proc, elapsed, "someone/some-model", endpoint)
    assert not (tmp_path / "d.safetensors").exists()


def test_silent_hub_dataset_fails_in_seconds(silent_hub, tiny_model, tmp_path):
    endpoint, accepted = silent_hub
    proc, elapsed = _cli(
        endpoint,
        "probe",
        "-m",
        str(tiny_model()),
        "--harmful-dataset",
        "someone/some-dataset",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--output",
        str(tmp_path / "d.safetensors"),
    )
    assert accepted, "the CLI never connected to the test server"
    _assert_fast_one_line(proc, elapsed, "someone/some-dataset")


@pytest.mark.parametrize("value, hub, ours", [("abc", 10, 10.0), ("2.5", 3, 3.0), ("0", 10, 10.0), ("inf", 10, 10.0)])
def test_a_timeout_huggingface_hub_cannot_parse_falls_back_instead_of_breaking_its_import(value, hub, ours):
    """huggingface_hub int()s the variable at import (mlx-lm imports it): the package makes it parseable first."""
    code = (
        "import mlx_abliteration, mlx_lm\n"
        "from huggingface_hub import constants\n"
        "from mlx_abliteration.io.asset_resolver import hub_timeout\n"
        "print(constants.HF_HUB_ETAG_TIMEOUT, constants.HF_HUB_DOWNLOAD_TIMEOUT, hub_timeout())"
    )
    env = {**os.environ, "HF_HUB_ETAG_TIMEOUT": value, "HF_HUB_DOWNLOAD_TIMEOUT": value}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(hub), str(hub), str(ours)]


def test_a_fractional_timeout_is_rounded_up_and_used_on_a_silent_hub(silent_hub, tmp_path):
    endpoint, accepted = silent_hub
    proc, elapsed = _cli(
        endpoint,
        "probe",
        "-m",
        "someone/some-model",
        "--cache-dir",
        str(tmp_path / "c"),
        "--output",
        str(tmp_path / "d"),
        timeout="1.5",
    )
    assert accepted and proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "did not answer within 2 s" in proc.stderr.strip().splitlines()[-1] and elapsed < 40
