"""Where a run's one-time GPU costs go (issue 17, items 3 and the machine's first run).

    python bench/gpu_diag.py kernels --model DIR [--prompts 64]    # which NVRTC kernels, from where
    python bench/gpu_diag.py probe --model DIR [--passes 3] [--clear-between] [--order desc] [--warmup] [--profile-writers]
    python bench/gpu_diag.py logprobs --model DIR [--variant code|gather|masked]    # the layer choice's base log-probs

``kernels``: runs ``mlx-abliterate run -m DIR --no-eval --use-layer auto --json``
in this process with ``MLX_PTX_CACHE_DIR`` pointing at a new empty folder
(unless already set): MLX's CUDA backend writes ``<module>.ptx`` there once it
has compiled a kernel module with NVRTC. A thread polls the folder every
10 ms and records each new module's name, when it appeared, the stage of the
run (from the ``--json`` events) and the main thread's Python stack at that
moment (the evaluation that needed it). One JSON line on stdout.

``probe``: loads the model, finds the writers (as ``run`` does before
probing), then probes the 256+256 prompts ``--passes`` times in this new
process, timing every batch (first pass vs warm: issue 17 item 3).
``--clear-between`` empties MLX's buffer cache before every pass (do fresh
allocations explain the first pass?); ``--order desc`` runs each set's
batches longest first; ``--warmup`` probes 2 prompts first (timed apart).
``--profile-writers`` adds cProfile's top functions
of the writer discovery. One JSON line on stdout.

``logprobs``: loads the model, finds the writers, then times
``shared_first_token_logprobs`` on 32+32 prompts (what the automatic layer
choice computes per candidate) in this new process: the first call of each
set, then 5 warm rounds. ``--variant``: ``code`` runs
``prefix_batch._suffix_prefill`` as it is; ``gather`` and ``masked`` replace it
with the whole-suffix pass of 750e1ba-9d27e9a (logits at every position from
the shortest suffix on), each row's last logits taken by
``logits[arange(B), lengths - shortest]`` (750e1ba) or by a one-hot ``where``
and a sum over positions. (bench/README.md 4e's "slices" is ``code`` at
9d27e9a: one slice per row and a stack.)

Runs anywhere (on the CPU nothing is compiled, the folder stays empty).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

T0 = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _stack(frame, limit: int = 14) -> list[str]:
    rows = traceback.extract_stack(frame)
    keep = [r for r in rows if "site-packages" not in r.filename or "mlx_lm" in r.filename]
    return [f"{Path(r.filename).name}:{r.lineno} {r.name}: {r.line or ''}".strip() for r in keep[-limit:]]


class _Watcher(threading.Thread):
    def __init__(self, folder: str, stage: list[str]):
        super().__init__(daemon=True)
        self.folder, self.stage, self.found, self.done = folder, stage, [], threading.Event()
        self.main = threading.main_thread().ident
        self.seen = set(os.listdir(folder))

    def run(self) -> None:
        while not self.done.wait(0.01):
            self.poll()

    def poll(self) -> None:
        names = set(os.listdir(self.folder)) - self.seen
        new = sorted(n for n in names if n.endswith(".ptx"))
        if not new:
            return
        frame = sys._current_frames().get(self.main)
        stack = _stack(frame) if frame is not None else []
        for name in new:
            self.found.append(
                {
                    "module": name[: -len(".ptx")],
                    "t": round(time.perf_counter() - T0, 2),
                    "stage": self.stage[0],
                    "stack": stack,
                }
            )
        self.seen |= set(new)


class _Tee(io.TextIOBase):
    """stdout that keeps the last ``stage`` event's message (the run prints its --json events there)."""

    def __init__(self, stage: list[str], sink):
        self.stage, self.sink, self.events = stage, sink, []

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.startswith("{"):
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                event["t"] = round(time.perf_counter() - T0, 2)
                if event.get("event") in ("stage", "done", "layers"):
                    self.stage[0] = event.get("message", "")
                    self.events.append({k: event[k] for k in ("event", "message", "t") if k in event})
        return len(text)


def kernels(args) -> dict:
    folder = os.environ.get("MLX_PTX_CACHE_DIR") or tempfile.mkdtemp(prefix="ptx-")
    os.environ["MLX_PTX_CACHE_DIR"] = folder
    os.makedirs(folder, exist_ok=True)  # MLX creates it at its first kernel; the watcher lists it from the start
    stage = ["imports"]
    watcher = _Watcher(folder, stage)
    watcher.start()
    from mlx_abliteration.cli.main import main

    out = tempfile.mkdtemp(prefix="diag-out-")
    tee = _Tee(stage, sys.stdout)
    real = sys.stdout
    sys.stdout = tee
    started = time.perf_counter()
    try:
        code = main(
            [
                "run",
                "-m",
                str(args.model),
                "-o",
                out + "/o",
                "--no-eval",
                "--use-layer",
                "auto",
                "--max-prompts",
                str(args.prompts),
                "--json",
            ]
        )
    finally:
        sys.stdout = real
    watcher.done.set()
    watcher.join()
    watcher.poll()
    return {
        "mode": "kernels",
        "returncode": code,
        "seconds": round(time.perf_counter() - started, 2),
        "ptx_dir": folder,
        "stages": tee.events,
        "modules": watcher.found,
    }


def probe(args) -> dict:
    from mlx_abliteration.runtime.backend import keep_torch_out

    keep_torch_out()
    import mlx.core as mx

    import mlx_abliteration.probe.capture as P
    from mlx_abliteration.data.datasets import load_prompts
    from mlx_abliteration.io.model_io import load_model
    from mlx_abliteration.probe.positions import ProbeSpec
    from mlx_abliteration.probe.writers import model_writers

    out: dict = {
        "mode": "probe",
        "imports": round(time.perf_counter() - T0, 2),
        "args": vars(args) | {"model": str(args.model)},
    }
    t = time.perf_counter()
    model, tok, _ = load_model(args.model)
    mx.synchronize()
    out["load"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    if args.profile_writers:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        model_writers(model)
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
        out["writers_profile_tottime"] = text.getvalue()[-7000:]
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(30)
        out["writers_profile_cumulative"] = text.getvalue()[-7000:]
    else:
        model_writers(model)
    mx.synchronize()
    out["writers"] = round(time.perf_counter() - t, 2)
    mx.clear_cache()  # as run does at every stage
    sets = [load_prompts(None, kind)[: args.prompts] for kind in ("harmful", "harmless")]
    if args.order == "desc":
        real_sorted = sorted

        def descending(iterable, key=None, reverse=False):  # probe_prompts' batch order (the keyed sort), reversed
            return real_sorted(iterable, key=key, reverse=reverse if key is None else not reverse)

        P.sorted = descending  # module-level name lookup in probe_prompts
    if args.warmup:  # a tiny probe first: how much of the first pass's set-up does it take on?
        t = time.perf_counter()
        P.probe_prompts(model, tok, sets[0][:2])
        mx.synchronize()
        out["warmup"] = round(time.perf_counter() - t, 3)
    passes = []
    for n in range(args.passes):
        if args.clear_between and n:
            mx.clear_cache()
        record = {"sets": []}
        started = time.perf_counter()
        for prompts in sets:
            ids, _ = P.encode_for_probe(tok, prompts, ProbeSpec())
            stamps: list[float] = []
            t1 = time.perf_counter()
            P.probe_prompts(model, tok, prompts, progress=lambda d, n, label, s=stamps: s.append(time.perf_counter()))
            mx.synchronize()
            times = [t1] + stamps
            record["sets"].append(
                {
                    "tokens": sum(map(len, ids)),
                    "batch_s": [round(b - a, 4) for a, b in zip(times, times[1:])],
                    "seconds": round(time.perf_counter() - t1, 3),
                }
            )
        record["seconds"] = round(time.perf_counter() - started, 3)
        record["mlx_active"], record["mlx_cache"] = mx.get_active_memory(), mx.get_cache_memory()
        passes.append(record)
        print(
            f"# pass {n}: {record['seconds']:.3f} s {[s['batch_s'] for s in record['sets']]}",
            file=sys.stderr,
            flush=True,
        )
    out["passes"] = passes
    warm = min(p["seconds"] for p in passes[1:]) if len(passes) > 1 else None
    out["first_over_warm_rate"] = round(warm / passes[0]["seconds"], 3) if warm else None
    return out


def _suffix_variant(name: str):
    """``prefix_batch._suffix_prefill`` with another way to take each row's last logits."""
    import mlx.core as mx
    from mlx_lm.models.cache import BatchKVCache

    def suffix_prefill(model, prefix_cache, suffixes):
        lengths = [len(s) for s in suffixes]
        width, shortest = max(lengths), min(lengths)
        caches = [BatchKVCache.merge([c] * len(suffixes)) for c in prefix_cache]
        for c in caches:
            c.prepare(right_padding=[width - n for n in lengths])
        tokens = mx.array([s + [0] * (width - len(s)) for s in suffixes], dtype=mx.int32)
        if shortest > 1:
            model(tokens[:, : shortest - 1], cache=caches)
            mx.eval([c.state for c in caches])
        logits = model(tokens[:, shortest - 1 :], cache=caches)
        if name == "gather":
            last = logits[mx.arange(len(suffixes)), mx.array(lengths) - shortest]
        else:
            span = logits.shape[1]
            pick = mx.array([[t == n - shortest for t in range(span)] for n in lengths])[:, :, None]
            last = mx.where(pick, logits, 0).sum(1)
        mx.eval(last)
        for c in caches:
            c.finalize()
        return last, caches

    return suffix_prefill


def logprobs(args) -> dict:
    from mlx_abliteration.runtime.backend import keep_torch_out

    keep_torch_out()
    import mlx.core as mx

    import mlx_abliteration.probe.prefix_batch as PB
    from mlx_abliteration.data.chat import encode_chats
    from mlx_abliteration.data.datasets import load_prompts
    from mlx_abliteration.io.model_io import load_model
    from mlx_abliteration.probe.writers import model_writers

    if args.variant != "code":
        PB._suffix_prefill = _suffix_variant(args.variant)
    out: dict = {"mode": "logprobs", "variant": args.variant, "imports": round(time.perf_counter() - T0, 2)}
    t = time.perf_counter()
    model, tok, _ = load_model(args.model)
    mx.synchronize()
    out["load"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    model_writers(model)
    mx.synchronize()
    out["writers"] = round(time.perf_counter() - t, 2)
    mx.clear_cache()
    ids = [encode_chats(tok, load_prompts(None, kind)[:32], None) for kind in ("harmful", "harmless")]
    rounds = []
    for _ in range(6):
        times = []
        for token_lists in ids:
            t = time.perf_counter()
            PB.shared_first_token_logprobs(model, token_lists, 16)
            times.append(round(time.perf_counter() - t, 4))
        rounds.append(times)
    out["rounds_seconds"] = rounds
    out["first"] = round(sum(rounds[0]), 4)
    out["warm_median"] = round(sorted(sum(r) for r in rounds[1:])[2], 4)
    print(f"# {args.variant}: {rounds}", file=sys.stderr, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("kernels", "probe", "logprobs"))
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=256, help="prompts per kind")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--clear-between", action="store_true")
    parser.add_argument("--order", choices=("asc", "desc"), default="asc")
    parser.add_argument("--profile-writers", action="store_true")
    parser.add_argument("--warmup", action="store_true", help="probe 2 prompts before the timed passes")
    parser.add_argument("--variant", choices=("code", "gather", "masked"), default="code")
    args = parser.parse_args()
    result = {"kernels": kernels, "probe": probe, "logprobs": logprobs}[args.mode](args)
    result["env"] = {
        k: os.environ.get(k)
        for k in (
            "MLX_PTX_CACHE_DIR",
            "MLX_CUDA_USE_CUDNN_SDPA",
            "MLX_USE_CUDA_GRAPHS",
            "MLX_DISABLE_COMPILE",
            "CUDA_MODULE_LOADING",
        )
    }
    result["total"] = round(time.perf_counter() - T0, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
