"""Where ablate + save spends its time on a GPU machine (issue 17 item 2), against `cp -r`.

    python bench/gpu_save_diag.py --work /tmp/gpubench --out $OUT [--steps cp,save,...] [--repeat 2]

Builds (or reuses) the 8B-shaped random bf16 Llama of gpu_probe_ablate.py and times, each
followed by `sync` (the page cache flushed before each step starts):

  cp          `cp -r` of the model
  pycopy*     the shard files copied by Python (1 thread or one per shard; with SHA256 of
              every byte as it passes; with writeback started per chunk): the ceiling for a
              writer that streams unedited bytes
  save        save_ablated_model as the code stands (the plan's writers found beforehand)
  phases      the same save with each phase forced and timed: shard load (read into memory),
              edits, mx.save_safetensors, the wait for the SHA256 threads
  gpuwrite    writing a GPU-computed array vs a CPU-resident one (MLX's unified memory)
  keep        save into WORK/ref-out and keep it; a later `verify` (run from another checkout)
              saves again and compares every tensor's bytes and the recorded SHA256 digests

For every step: seconds, seconds of the sync after it, and from /proc what the disk wrote
during the step and the most dirty page cache. Writes OUT/save_diag.json.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402

import mlx_abliteration  # noqa: E402,F401

CHUNK = 1 << 26
GPUWRITE_SHAPE = (32768, 16384)  # 1 GiB of bf16


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":")
            out[key] = int(value.split()[0]) * 1024
    return out


def _disk_line(path: Path) -> tuple[int, int]:
    dev = os.stat(path).st_dev
    return os.major(dev), os.minor(dev)


def _sectors_written(dev: tuple[int, int]) -> int:
    with open("/proc/diskstats") as f:
        for line in f:
            parts = line.split()
            if (int(parts[0]), int(parts[1])) == dev:
                return int(parts[9])
    return 0


class Monitor:
    """Polls dirty/writeback page cache and the disk's written sectors every 0.1 s."""

    def __init__(self, path: Path) -> None:
        self.dev = _disk_line(path)
        self.samples: list[tuple[float, int, int, int]] = []
        self.done = threading.Event()

    def __enter__(self) -> Monitor:
        self.t0 = time.perf_counter()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self) -> None:
        while True:
            m = _meminfo()
            self.samples.append(
                (time.perf_counter() - self.t0, m["Dirty"], m["Writeback"], _sectors_written(self.dev) * 512)
            )
            if self.done.wait(0.1):
                return

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()

    def summary(self, until: float) -> dict:
        inside = [s for s in self.samples if s[0] <= until] or self.samples[:1]
        written = inside[-1][3] - self.samples[0][3]
        # when the disk started writing at > 100 MB/s
        start = next((s[0] for a, s in zip(inside, inside[1:]) if s[3] - a[3] > 1e7), None)
        timeline = [
            (round(s[0], 1), round(s[1] / 1e9, 2), round(s[2] / 1e9, 2), round((s[3] - self.samples[0][3]) / 1e9, 2))
            for s in self.samples[::5]
        ]
        return {
            "disk_written_during_step_gb": round(written / 1e9, 2),
            "disk_written_total_gb": round((self.samples[-1][3] - self.samples[0][3]) / 1e9, 2),
            "disk_writing_from_s": start and round(start, 2),
            "max_dirty_gb": round(max(s[1] for s in self.samples) / 1e9, 2),
            "timeline_t_dirty_writeback_written": timeline,
        }


def timed(name: str, work: Path, fn, results: dict, out: Path) -> dict:
    os.sync()
    with Monitor(work) as mon:
        started = time.perf_counter()
        extra = fn() or {}
        step = time.perf_counter() - started
        os.sync()
        synced = time.perf_counter() - started - step
        time.sleep(0.15)
    entry = {"seconds": round(step, 2), "sync_seconds": round(synced, 2), "total": round(step + synced, 2)}
    entry.update(mon.summary(step))
    entry.update(extra)
    results.setdefault(name, []).append(entry)
    log(f"{name}: {step:.2f} s + sync {synced:.2f} s = {step + synced:.2f} s; {json.dumps(extra)[:600]}")
    (out / "save_diag.json").write_text(json.dumps(results, indent=1, default=str))
    return entry


_libc = ctypes.CDLL(None, use_errno=True)
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int, offset: int, length: int) -> None:
    _libc.sync_file_range(fd, ctypes.c_longlong(offset), ctypes.c_longlong(length), _SYNC_FILE_RANGE_WRITE)


def _copy_file(src: Path, dst: Path, hash_it: bool, writeback: bool) -> str | None:
    digest = hashlib.sha256() if hash_it else None
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    offset = 0
    with open(src, "rb", buffering=0) as fi, open(dst, "wb", buffering=0) as fo:
        while n := fi.readinto(buf):
            chunk = view[:n]
            if digest:
                digest.update(chunk)
            fo.write(chunk)
            if writeback:
                _start_writeback(fo.fileno(), offset, n)
            offset += n
    return digest.hexdigest() if digest else None


def pycopy(model: Path, dst: Path, threads: int, hash_it: bool, writeback: bool) -> None:
    from concurrent.futures import ThreadPoolExecutor

    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir()
    files = sorted(model.glob("*.safetensors"))
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda p: _copy_file(p, dst / p.name, hash_it, writeback), files))


def make_plan(model: Path):
    from mlx_abliteration.edit.orthogonalize import uniform_plan
    from mlx_abliteration.export.source_layout import discover_writers_in_dir
    from mlx_abliteration.io.model_io import read_config

    config = read_config(model)
    mx.random.seed(1)
    started = time.perf_counter()
    writers = discover_writers_in_dir(model)
    discover = time.perf_counter() - started
    plan = uniform_plan(mx.random.normal((config["hidden_size"],)), config["num_hidden_layers"]).with_writers(writers)
    mx.clear_cache()
    return plan, round(discover, 2)


def save(model: Path, dst: Path, plan) -> dict:
    from mlx_abliteration.export.save import save_ablated_model

    shutil.rmtree(dst, ignore_errors=True)
    mx.reset_peak_memory()
    summary = save_ablated_model(model, dst, plan)
    return {"mlx_peak_gb": round(mx.get_peak_memory() / 1e9, 2), "shards": len(summary["output_sha256"])}


def _range_digests(path: Path) -> dict[str, str]:
    """SHA256 of each tensor's bytes in a safetensors file (header parsed here, independent of the code)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                out[name] = json.dumps(info, sort_keys=True)
                continue
            begin, end = info["data_offsets"]
            f.seek(8 + length + begin)
            digest = hashlib.sha256(f"{info['dtype']}{info['shape']}".encode())
            left = end - begin
            while left:
                block = f.read(min(left, CHUNK))
                if not block:
                    raise OSError(f"{path} is short")
                digest.update(block)
                left -= len(block)
            out[name] = digest.hexdigest()
    return out


def verify(model: Path, dst: Path, reference: Path, plan) -> dict:
    """Save with this tree, then compare every tensor's bytes with ``reference`` (another tree's save)."""
    from mlx_abliteration.export.save import save_ablated_model
    from mlx_abliteration.runtime.utils import sha256_file

    shutil.rmtree(dst, ignore_errors=True)
    summary = save_ablated_model(model, dst, plan)
    from concurrent.futures import ThreadPoolExecutor

    shards = sorted(p.name for p in reference.glob("*.safetensors"))
    with ThreadPoolExecutor(2 * len(shards)) as pool:
        digests = list(pool.map(_range_digests, [d / s for s in shards for d in (dst, reference)]))
    mismatched, compared = [], 0
    for i, shard in enumerate(shards):
        ours, theirs = digests[2 * i], digests[2 * i + 1]
        compared += len(theirs) - 1
        mismatched += [f"{shard}:{k}" for k in theirs.keys() | ours.keys() if ours.get(k) != theirs.get(k)]
    hashes = {name: sha256_file(dst / name) == digest for name, digest in summary["output_sha256"].items()}
    index_same = (dst / "model.safetensors.index.json").read_text() == (
        reference / "model.safetensors.index.json"
    ).read_text()
    return {
        "tensors_compared": compared,
        "mismatched": mismatched[:20],
        "recorded_sha256_is_the_files": hashes,
        "index_identical": index_same,
    }


def save_phases(model: Path, dst: Path, plan) -> dict:
    """save_ablated_model with each phase evaluated and timed on its own."""
    from mlx_abliteration.export import source_layout
    from mlx_abliteration.io import model_io

    times: dict[str, float] = {}
    per_shard: list[dict] = []

    def add(key: str, seconds: float) -> None:
        times[key] = round(times.get(key, 0.0) + seconds, 3)

    real_load, real_edit, real_save = model_io.load_shard, model_io._edit_in_blocks, mx.save_safetensors
    real_results, real_layout = model_io._Hasher.results, source_layout.open_layout

    def load_shard(path):
        t = time.perf_counter()
        tensors, metadata = real_load(path)
        mx.eval(list(tensors.values()))
        add("load_read", time.perf_counter() - t)
        per_shard.append({"shard": path.name, "load": round(time.perf_counter() - t, 3), "edit": 0.0})
        return tensors, metadata

    def edit(*args, **kwargs):
        t = time.perf_counter()
        result = real_edit(*args, **kwargs)
        if result is not None:
            mx.eval(list(result.tensors.values()))
        add("edit", time.perf_counter() - t)
        if per_shard:
            per_shard[-1]["edit"] = round(per_shard[-1]["edit"] + time.perf_counter() - t, 3)
        return result

    def save_st(path, arrays, **kwargs):
        t = time.perf_counter()
        mx.eval(list(arrays.values()))
        t1 = time.perf_counter()
        real_save(path, arrays, **kwargs)
        add("save_eval", t1 - t)
        add("save_write", time.perf_counter() - t1)
        if per_shard:
            per_shard[-1]["write"] = round(time.perf_counter() - t1, 3)
            per_shard[-1]["bytes"] = sum(a.nbytes for a in arrays.values())
        return None

    def results(self):
        t = time.perf_counter()
        r = real_results(self)
        add("hash_wait", time.perf_counter() - t)
        return r

    def layout(*args, **kwargs):
        t = time.perf_counter()
        r = real_layout(*args, **kwargs)
        add("open_layout", time.perf_counter() - t)
        return r

    model_io.load_shard, model_io._edit_in_blocks, mx.save_safetensors = load_shard, edit, save_st
    model_io._Hasher.results, source_layout.open_layout = results, layout
    try:
        started = time.perf_counter()
        extra = save(model, dst, plan)
        total = time.perf_counter() - started
    finally:
        model_io.load_shard, model_io._edit_in_blocks, mx.save_safetensors = real_load, real_edit, real_save
        model_io._Hasher.results, source_layout.open_layout = real_results, real_layout
    times["other"] = round(total - sum(times.values()), 3)
    return {**extra, "phases": times, "per_shard": per_shard}


def gpuwrite(work: Path) -> dict:
    """Write 1 GiB computed on the GPU vs on the CPU stream: f.write(memoryview), mx.save_safetensors, sha256."""
    out: dict[str, float] = {}
    shape = GPUWRITE_SHAPE
    gpu = (mx.random.normal(shape, key=mx.random.key(0)) * 2).astype(mx.bfloat16)
    mx.eval(gpu)
    with mx.stream(mx.cpu):
        cpu = mx.zeros(shape, dtype=mx.bfloat16) + 1
    mx.eval(cpu)
    path = work / "gpuwrite.bin"
    for name, arr in (("cpu", cpu), ("gpu", gpu), ("gpu_again", gpu)):
        t = time.perf_counter()
        hashlib.sha256(memoryview(arr)).hexdigest()
        out[f"sha256_{name}"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        with open(path, "wb", buffering=0) as f:
            f.write(memoryview(arr))
        out[f"write_{name}"] = round(time.perf_counter() - t, 3)
    gpu2 = (mx.random.normal(shape, key=mx.random.key(1)) * 2).astype(mx.bfloat16)
    mx.eval(gpu2)
    t = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        f.write(memoryview(gpu2))
    out["write_fresh_gpu_first_touch"] = round(time.perf_counter() - t, 3)
    gpu3 = (mx.random.normal(shape, key=mx.random.key(2)) * 2).astype(mx.bfloat16)
    mx.eval(gpu3)
    t = time.perf_counter()
    mx.save_safetensors(str(path), {"x": gpu3})
    out["mx_save_fresh_gpu"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    mx.save_safetensors(str(path), {"x": cpu})
    out["mx_save_cpu"] = round(time.perf_counter() - t, 3)
    gpu4 = (mx.random.normal(shape, key=mx.random.key(3)) * 2).astype(mx.bfloat16)
    mx.eval(gpu4)
    t = time.perf_counter()
    with mx.stream(mx.cpu):
        host = mx.array(gpu4)  # a copy on the CPU stream
        mx.eval(host)
    out["copy_to_cpu_stream"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    sha = hashlib.sha256()
    view = memoryview(gpu4).cast("B")
    for start in range(0, view.nbytes, CHUNK):
        sha.update(view[start : start + CHUNK])
    out["sha256_chunks_gpu4_after_copy"] = round(time.perf_counter() - t, 3)
    buf = bytearray(1 << 30)
    t = time.perf_counter()
    hashlib.sha256(buf).digest()
    out["sha256_1GiB_host_buffer"] = round(time.perf_counter() - t, 3)
    path.unlink()
    del gpu, cpu, gpu2, gpu3, gpu4, host
    mx.clear_cache()
    return out


def vm_settings(work: Path) -> dict:
    vm = {}
    for name in (
        "dirty_ratio",
        "dirty_background_ratio",
        "dirty_bytes",
        "dirty_background_bytes",
        "dirty_expire_centisecs",
    ):
        try:
            vm[name] = Path(f"/proc/sys/vm/{name}").read_text().strip()
        except OSError:
            pass
    m = _meminfo()
    df = shutil.disk_usage(work)
    mounts = [line for line in Path("/proc/mounts").read_text().splitlines() if " / " in line or "/tmp" in line]
    return {
        "vm": vm,
        "mem_total_gb": round(m["MemTotal"] / 1e9, 1),
        "mem_available_gb": round(m["MemAvailable"] / 1e9, 1),
        "disk_free_gb": round(df.free / 1e9, 1),
        "mounts": mounts,
        "dev": _disk_line(work),
        "cpus": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpubench"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpubench-out")))
    parser.add_argument("--steps", default="cp,save,pycopy1,pycopy1_wb,pycopyN,pycopyN_hash_wb,phases,gpuwrite,cp,save")
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args()
    import gpu_probe_ablate

    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    model = gpu_probe_ablate.build(args.work, args.small)
    os.sync()
    subprocess.run(f"cat {model}/*.safetensors > /dev/null", shell=True, check=True)
    results: dict = {"machine": vm_settings(args.work), "mlx": mx.__version__, "device": str(mx.default_device())}
    results["weights_bytes"] = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    results["shards"] = {p.name: p.stat().st_size for p in sorted(model.glob("*.safetensors"))}
    log(json.dumps(results))
    plan, results["discover_writers_seconds"] = make_plan(model)
    dst = args.work / "diag-out"
    for step in args.steps.split(","):
        if step == "cp":
            timed(
                step,
                args.work,
                lambda: subprocess.run(["cp", "-r", str(model), str(dst)], check=True) and None,
                results,
                args.out,
            )
        elif step.startswith("pycopy"):
            threads = 1 if step.startswith("pycopy1") else 8
            timed(
                step,
                args.work,
                lambda t=threads, s=step: pycopy(model, dst, t, "hash" in s, s.endswith("_wb")),
                results,
                args.out,
            )
        elif step == "save":
            timed(step, args.work, lambda: save(model, dst, plan), results, args.out)
        elif step == "keep":  # a reference output for another tree's "verify"
            timed(step, args.work, lambda: save(model, args.work / "ref-out", plan), results, args.out)
        elif step == "verify":
            ref = args.work / "ref-out"
            timed(step, args.work, lambda r=ref: verify(model, dst, r, plan), results, args.out)
            shutil.rmtree(ref, ignore_errors=True)
        elif step == "phases":
            timed(step, args.work, lambda: save_phases(model, dst, plan), results, args.out)
        elif step == "gpuwrite":
            results["gpuwrite"] = gpuwrite(args.work)
            log(f"gpuwrite {results['gpuwrite']}")
        shutil.rmtree(dst, ignore_errors=True)
        os.sync()
    (args.out / "save_diag.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
