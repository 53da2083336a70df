"""Every text architecture of the installed mlx-lm: a proven edit, or a loud one-line refusal (see tests/arch_proof.py)."""

from pathlib import Path

import pytest

from .arch_proof import REFUSED, cases, prove, support_table


@pytest.mark.parametrize("model_type, dtype, bits", cases(), ids=lambda v: str(v))
def test_abliterated_model_writes_nothing_along_r(model_type, dtype, bits, tmp_path):
    proof = prove(model_type, tmp_path, dtype, bits)
    if model_type in REFUSED and bits is None and dtype == "float32":
        assert not proof.supported, f"{model_type} is listed as refused but now passes: move it to supported"
        assert REFUSED[model_type][0] in proof.reason, proof.reason
    else:
        assert proof.supported, proof.reason
    assert not proof.problems, proof.problems


def test_support_table_is_generated_from_the_proof():
    root = Path(__file__).resolve().parent.parent
    table = support_table()
    docs = (root / "docs" / "architectures.md").read_text()
    assert table in docs, "docs/architectures.md's support table is stale: python scripts/support_table.py --write"
    summary = table.split("\n", 1)[0]
    readme = (root / "README.md").read_text()
    assert summary in readme, "README's support summary is stale: python scripts/support_table.py --write"
