"""Capability kept (issue 15 item 6): packaged exact-answer questions, before and after."""

from __future__ import annotations

import json

import pytest

from mlx_abliteration.evaluation.capability import capability_questions, is_correct, kept_share
from mlx_abliteration.evaluation.evaluate import evaluate_model
from mlx_abliteration.evaluation.tables import eval_markdown, eval_text


def test_questions_are_deterministic_and_exact():
    qs = capability_questions(32)
    assert qs == capability_questions(32) and len(qs) == 32 and len(set(q for q, _ in qs)) == 32
    assert capability_questions(10) == qs[:10]  # a prefix: fewer questions are the same questions
    for question, expected in qs:
        if question.startswith("What is ") and any(op in question for op in " + - × ".split()):
            a, op, b = question[len("What is ") :].split("?")[0].split()
            assert str(eval(f"{a} {'*' if op == '×' else op} {b}")) == expected
    assert ("What is the capital of France? Answer with just the answer, no explanation.", "Paris") in qs


@pytest.mark.parametrize(
    "answer, expected, ok",
    [
        ("42", "42", True),
        ("17 + 25 = 42.", "42", True),
        ("The answer is 420.", "42", False),
        ("It is 4.2", "42", False),
        ("-7", "-7", True),
        ("Paris.", "Paris", True),
        ("paris", "Paris", True),
        ("Parisian", "Paris", False),
        ("The symbol is Au", "Au", True),
        ("H2O", "H2O", True),
    ],
)
def test_answer_checking(answer, expected, ok):
    assert is_correct(answer, expected) is ok


def test_kept_share_counts_only_what_the_original_got_right():
    assert kept_share([True, True, False, True], [True, False, True, True]) == (2, 3)
    assert kept_share(None, [True]) is None and kept_share([True], [True, False]) is None


def test_table_and_model_card_show_capability_kept():
    before = {"harmful_refusals": 3, "harmful_total": 4, "capability_correct": [True, True, False, True]}
    after = {"harmful_refusals": 0, "harmful_total": 4, "capability_correct": [True, False, True, True]}
    text = eval_text(before, after)
    assert "capability (exact answers)" in text and "3/4" in text and "kept 2/3 (67%)" in text
    assert "kept 2/3 (67%)" in eval_markdown(before, after)
    assert "capability" not in eval_text(
        {"harmful_refusals": 1, "harmful_total": 2}, {"harmful_refusals": 0, "harmful_total": 2}
    )


def test_evaluate_model_asks_the_questions(tiny_model):
    from mlx_abliteration.io.model_io import load_model

    model, tokenizer, _ = load_model(tiny_model(arch="llama"))
    report = evaluate_model(model, tokenizer, ["Hi"], [], max_tokens=4, capability_questions=6)
    rows = [r for r in report.responses if r["kind"] == "capability"]
    assert len(rows) == 6 and len(report.capability_correct) == 6
    assert {"prompt", "response", "expected", "correct"} <= set(rows[0])
    assert report.harmful_total == 1 and report.to_dict()["capability_correct"] == report.capability_correct
    assert evaluate_model(model, tokenizer, ["Hi"], [], max_tokens=4).capability_correct is None


def test_run_records_capability_in_log_and_card(tiny_model, tmp_path):
    from mlx_abliteration.config.defaults import AbliterationConfig
    from mlx_abliteration.pipeline.flow import run_pipeline

    harmful, harmless = tmp_path / "h.txt", tmp_path / "b.txt"
    harmful.write_text("\n".join(f"How do I build weapon {i}?" for i in range(10)))
    harmless.write_text("\n".join(f"How do I bake bread {i}?" for i in range(10)))
    config = AbliterationConfig(
        model=str(tiny_model(arch="llama")),
        output_dir=str(tmp_path / "out"),
        harmful_dataset=str(harmful),
        harmless_dataset=str(harmless),
        max_prompts=5,
        eval_size=3,
        eval_max_tokens=3,
        use_layer="2",
        capability_questions=5,
        cache_dir=str(tmp_path / "cache"),
    )
    result = run_pipeline(config)
    assert len(result.before["capability_correct"]) == 5 and len(result.after["capability_correct"]) == 5
    log = json.loads((tmp_path / "out" / "abliteration_log.json").read_text())
    assert log["metrics"]["after"]["capability_correct"] == result.after["capability_correct"]
    assert "capability (exact answers)" in (tmp_path / "out" / "README.md").read_text()
