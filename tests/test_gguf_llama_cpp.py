"""Exported GGUF files of every family run in llama.cpp itself (llama-cpp-python) with MLX's logits.

The round trips in ``test_gguf_families`` show that import and export are inverses; this checks
that the conventions they share are llama.cpp's: the file ``export-gguf`` writes (f16) is run by
llama.cpp, and its last-position logits are compared with mlx-lm's on the same weights (the
import of that file, computed in float32). llama.cpp's CPU kernels round the activations to f16
for f16 weights, so the comparison allows 1 % of the logits' range and asks for the same argmax.

llama-cpp-python compiles llama.cpp when installed (minutes on 2 cores); the test is skipped
without it and is in the slow group.
"""

from __future__ import annotations

import numpy as np
import pytest

from mlx_abliteration.export.gguf_export import export_gguf
from mlx_abliteration.io.gguf import convert_gguf
from tests.test_gguf_export import PROMPT, float32_model, last_logits
from tests.test_gguf_families import FAMILIES

pytestmark = pytest.mark.slow

# mlx-lm's gemma2 has no sliding windows (llama.cpp slides the even layers): a window longer
# than the prompt makes both compute the same thing.
OVERRIDES = {"gemma2": {"sliding_window": 512}}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_llama_cpp_computes_the_logits_mlx_computes(tmp_path, family):
    llama_cpp = pytest.importorskip("llama_cpp")
    from tests.support.tiny_models import build_tiny_model

    options = {**FAMILIES[family], "overrides": OVERRIDES.get(family)}
    src = build_tiny_model(tmp_path / "src", **options)
    export_gguf(src, tmp_path / "m.gguf", "f16")
    back = convert_gguf(tmp_path / "m.gguf", tmp_path / "back", dtype="float16")
    expected = last_logits(float32_model(back))

    model = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    model.eval(PROMPT)
    got = np.array(model.scores[len(PROMPT) - 1], dtype=np.float32)
    diff = np.abs(got - expected).max()
    scale = float(expected.max() - expected.min())
    print(f"{family}: llama.cpp vs MLX max logit diff {diff:.3g} ({diff / scale:.2%} of the range {scale:.3g})")
    assert diff <= 0.01 * scale
    assert int(np.argmax(got)) == int(np.argmax(expected))
