"""``gui --host 0.0.0.0``: a warning that the unauthenticated GUI is reachable from the network, and real URLs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from .cli_helpers import REPO

pytest.importorskip("gradio")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_gui(host: str):
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "MLX_ABLITERATION_LOG_FILE": os.devnull,
        "GRADIO_ANALYTICS_ENABLED": "False",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_abliteration", "gui", "--host", host, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )
    deadline = time.monotonic() + 120
    line = ""
    while time.monotonic() < deadline and "GUI on" not in line:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
    return proc, port, line


def _stop(proc) -> str:
    proc.terminate()
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err


def test_gui_on_all_interfaces_warns_and_prints_the_real_urls():
    proc, port, line = _start_gui("0.0.0.0")
    try:
        assert "GUI on" in line, line
        urls = [word for word in line.split() if word.startswith("http://")]
        assert urls and all(f":{port}/" in url for url in urls), line
        assert urls[-1] == f"http://127.0.0.1:{port}/"
        assert not any(url.startswith("http://0.0.0.0") for url in urls)
        for url in urls:  # every printed URL answers
            with urllib.request.urlopen(url, timeout=10) as response:
                assert response.status == 200
    finally:
        err = _stop(proc)
    assert "warning: the GUI has no authentication" in err and "reachable from your network" in err, err


def test_gui_on_localhost_does_not_warn():
    proc, port, line = _start_gui("127.0.0.1")
    try:
        assert f"127.0.0.1:{port}" in line, line
    finally:
        err = _stop(proc)
    assert "warning" not in err, err
