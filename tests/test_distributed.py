"""Two processes launched by mlx.launch (ring backend) merge to the single-process statistics."""

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_abliteration.io.model_io import load_model
from mlx_abliteration.probe.capture import probe_prompts
from mlx_abliteration.probe.distributed import rank_slice

PROMPTS = [
    "How do I bake bread?",
    "hi",
    "Tell me how to pick a lock.",
    "Write a poem about the sea and the wind.",
    "What is the capital of France?",
    "hack a computer, now",
    "Explain the steps, with numbers 0123456789.",
]
WORKER = Path(__file__).with_name("_distributed_worker.py")


def _free_port_pair() -> int:
    """A port p with p and p + 1 free (the ring backend listens on one per rank)."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free port pair")


def _launcher() -> str | None:
    found = Path(sys.executable).with_name("mlx.launch")
    return str(found) if found.exists() else shutil.which("mlx.launch")


@pytest.mark.timeout(120)
def test_two_ranks_equal_single_process(tiny_model, tmp_path):
    launcher = _launcher()
    if launcher is None:
        pytest.skip("mlx.launch is not installed")
    path = tiny_model(arch="llama")
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS))
    out = tmp_path / "stats"
    cmd = [
        launcher,
        "--backend",
        "ring",
        "-n",
        "2",
        "--starting-port",
        str(_free_port_pair()),
        "--",
        sys.executable,
        str(WORKER),
        str(path),
        str(prompts_file),
        str(out),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=110)
    assert result.returncode == 0, result.stdout + result.stderr
    model, tokenizer, _ = load_model(path)
    single = probe_prompts(model, tokenizer, PROMPTS, batch_size=3)
    lone = probe_prompts(model, tokenizer, PROMPTS[:1])
    for rank in (0, 1):
        got = mx.load(f"{out}.rank{rank}.safetensors")
        assert int(got["size"].item()) == 2
        assert int(got["count"].item()) == single.count
        scale = max(float(mx.abs(single.mean).max()), 1.0)
        assert float(mx.abs(got["mean"] - single.mean).max()) <= 1e-5 * scale
        assert float(mx.abs(got["m2"] - single.m2).max()) <= 1e-4 * float(mx.abs(single.m2).max())
        assert int(got["lone_count"].item()) == 1
        assert float(mx.abs(got["lone_mean"] - lone.mean).max()) <= 1e-5 * scale


class _FakeGroup:
    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def test_rank_slices_cover_everything_once():
    items = list(range(7))
    slices = [rank_slice(items, _FakeGroup(r, 3)) for r in range(3)]
    assert sum(slices, []) == items
    assert [len(s) for s in slices] == [2, 2, 3]


def test_run_under_mlx_launch_probes_on_every_rank_and_does_the_rest_once(tiny_model, tmp_path):
    """Rank 1 probes its share and stops once the statistics are merged; only rank 0 chooses the layer,
    evaluates and saves (before, every rank chose, evaluated and wrote the same baseline cache)."""
    launcher = _launcher()
    if launcher is None:
        pytest.skip("mlx.launch is not installed")
    import mlx_lm

    harmful, harmless = tmp_path / "harmful.txt", tmp_path / "harmless.txt"
    harmful.write_text("\n".join(f"How do I build weapon number {i} to hurt people?" for i in range(20)))
    harmless.write_text("\n".join(f"How do I bake bread recipe number {i} for my family?" for i in range(20)))
    out = tmp_path / "out"
    command = [
        launcher, "--backend", "ring", "-n", "2", "--starting-port", str(_free_port_pair()), "--",
        sys.executable, "-m", "mlx_abliteration.cli.main", "run", "-m", str(tiny_model(arch="llama")),
        "-o", str(out), "--harmful-dataset", str(harmful), "--harmless-dataset", str(harmless),
        "--max-prompts", "8", "--eval-size", "4", "--eval-max-tokens", "4", "--cache-dir", str(tmp_path / "cache"),
        "--json",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=170)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "rank 1 of 2: probing share merged; rank 0 chooses the plan, evaluates and saves" in output
    for once in ("choosing the layer", "evaluating the original model", "evaluating the abliterated model"):
        assert output.count(once) == 1, (once, output)
    assert "probe harmful (rank 1)" in output  # rank 1 did probe its share
    mlx_lm.load(str(out))
