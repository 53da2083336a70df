"""Prompt loading from every supported source, and the train/eval split."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlx_abliteration.data import datasets
from mlx_abliteration.data.datasets import load_prompts, split_prompts
from mlx_abliteration.errors import UserError


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# --- formats -------------------------------------------------------------------


def test_jsonl_reads_prompt_text_instruction_and_messages(tmp_path):
    path = _jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": " first "},
            {"text": "second"},
            {"instruction": "third", "output": "ignored"},
            {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "fourth"}]},
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "fifth"}]}]},
            "sixth",
        ],
    )
    assert load_prompts(path, "harmful") == ["first", "second", "third", "fourth", "fifth", "sixth"]


def test_jsonl_skips_blank_lines_and_drops_duplicates(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n{"prompt": "a"}\n{"prompt": "  "}\n')
    assert load_prompts(path, "harmful") == ["a", "b"]


def test_column_selects_a_field(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "no", "goal": "yes"}])
    assert load_prompts(path, "harmful", column="goal") == ["yes"]


def test_json_list_of_strings_and_objects(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(["a", {"text": "b"}]))
    assert load_prompts(path, "harmless") == ["a", "b"]


def test_csv_default_and_named_column(tmp_path):
    path = _csv(tmp_path / "d.csv", ["id", "instruction", "goal"], [["1", "do x", "g1"], ["2", "do, y", "g2"]])
    assert load_prompts(path, "harmful") == ["do x", "do, y"]
    assert load_prompts(path, "harmful", column="goal") == ["g1", "g2"]


def test_txt_one_prompt_per_line(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("one\n\n two \nthree\n")
    assert load_prompts(path, "harmless") == ["one", "two", "three"]


def test_parquet_with_prompt_and_messages_columns(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["p1", "p2"], "other": [1, 2]}), path)
    assert load_prompts(path, "harmful") == ["p1", "p2"]
    chat = tmp_path / "chat.parquet"
    pq.write_table(pa.table({"messages": [[{"role": "user", "content": "hi"}]]}), chat)
    assert load_prompts(chat, "harmful") == ["hi"]


def test_directory_reads_primary_data_files_only(tmp_path):
    _jsonl(tmp_path / "a.jsonl", [{"prompt": "a"}])
    (tmp_path / "sub").mkdir()
    _csv(tmp_path / "sub" / "b.csv", ["text"], [["b"]])
    (tmp_path / "dataset_infos.json").write_text("{}")
    (tmp_path / ".cache").mkdir()
    _jsonl(tmp_path / ".cache" / "hidden.jsonl", [{"prompt": "hidden"}])
    assert load_prompts(tmp_path, "harmful") == ["a", "b"]


def test_default_sets_load_for_both_kinds():
    harmful, harmless = load_prompts(None, "harmful"), load_prompts(None, "harmless")
    assert len(harmful) >= 300 and len(harmless) >= 300
    with pytest.raises(UserError, match="use 'harmful' or 'harmless'"):
        load_prompts(None, "neutral")


# --- errors --------------------------------------------------------------------


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"\n')
    with pytest.raises(UserError, match=r"d.jsonl line 2: malformed JSON .*fix or remove that line"):
        load_prompts(path, "harmful")


def test_no_usable_field_names_the_fields_found(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(UserError, match=r"line 1: no usable field \(found: question, answer\)"):
        load_prompts(path, "harmful")


def test_missing_csv_column_names_the_header(tmp_path):
    path = _csv(tmp_path / "d.csv", ["id", "goal"], [["1", "g"]])
    with pytest.raises(UserError, match=r"line 2: no usable field \(found: id, goal\)"):
        load_prompts(path, "harmful")
    with pytest.raises(UserError, match=r"no field 'prompt_text' \(found: id, goal\)"):
        load_prompts(path, "harmful", column="prompt_text")


def test_empty_dataset(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n\n")
    with pytest.raises(UserError, match="has no prompts; add prompts or pass another dataset"):
        load_prompts(path, "harmless")


def test_unsupported_extension(tmp_path):
    path = tmp_path / "d.xlsx"
    path.write_text("x")
    with pytest.raises(UserError, match=r"unsupported file type \.xlsx; use one of \.jsonl"):
        load_prompts(path, "harmful")


def test_unreadable_and_non_utf8_files(tmp_path):
    binary = tmp_path / "d.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(UserError, match="is not UTF-8 text"):
        load_prompts(binary, "harmful")
    broken = tmp_path / "d.parquet"
    broken.write_bytes(b"PAR1 truncated")
    with pytest.raises(UserError, match="unreadable Parquet file"):
        load_prompts(broken, "harmful")


def test_json_that_is_not_a_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"prompt": "a"}')
    with pytest.raises(UserError, match="expected a JSON list"):
        load_prompts(path, "harmful")


def test_missing_local_file_does_not_touch_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("network used"))
    with pytest.raises(UserError, match="harmful dataset .*missing.jsonl not found"):
        load_prompts(tmp_path / "missing.jsonl", "harmful")
    with pytest.raises(UserError, match="not found"):
        load_prompts("./not-a-hub-id", "harmful")


# --- Hugging Face datasets (snapshot_download patched; no network) ---------------


def test_hub_dataset_is_downloaded_into_cache_dir_and_read(tmp_path, monkeypatch):
    import huggingface_hub

    snapshot = tmp_path / "snapshot"
    (snapshot / "data").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["hub a", "hub b"]}), snapshot / "data" / "train-0.parquet")
    (snapshot / "README.md").write_text("# card")
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert load_prompts("someone/harmful-set", "harmful", cache_dir=tmp_path / "cache") == ["hub a", "hub b"]
    assert calls[0][0] == "someone/harmful-set"
    assert calls[0][1]["repo_type"] == "dataset" and calls[0][1]["cache_dir"] == tmp_path / "cache"


def test_unreachable_hub_dataset_is_a_user_error(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("Cannot find the requested files in the local cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(UserError) as info:
        load_prompts("someone/harmful-set", "harmful")
    message = str(info.value)
    assert "no such local path" in message and "offline and not in the cache" in message
    assert "pass a local file" in message and "\n" not in message


# --- split ---------------------------------------------------------------------


def test_split_is_deterministic_and_disjoint():
    prompts = [f"p{i}" for i in range(100)]
    train, evaluation = split_prompts(prompts, 64, 16, seed=3)
    assert (train, evaluation) == split_prompts(prompts, 64, 16, seed=3)
    assert len(train) == 64 and len(evaluation) == 16
    assert not set(train) & set(evaluation)
    assert split_prompts(prompts, 64, 16, seed=4) != (train, evaluation)


def test_split_eval_set_does_not_depend_on_train_size():
    prompts = [f"p{i}" for i in range(100)]
    assert split_prompts(prompts, 10, 16, seed=0)[1] == split_prompts(prompts, 80, 16, seed=0)[1]
    train, evaluation = split_prompts(prompts, None, 16, seed=0)
    assert len(train) == 84 and not set(train) & set(evaluation)


def test_split_counts_duplicates_once():
    train, evaluation = split_prompts(["a", "a", "b", "c"], 2, 1, seed=0)
    assert sorted(train + evaluation) == ["a", "b", "c"]


def test_split_too_few_prompts_message():
    with pytest.raises(UserError) as info:
        split_prompts([f"p{i}" for i in range(40)], 64, 16, seed=0, name="harmful.jsonl")
    assert str(info.value) == (
        "dataset harmful.jsonl has 40 prompts but 64+16 were requested; lower --max-prompts/--eval-size or add prompts"
    )


def test_split_rejects_negative_counts():
    with pytest.raises(UserError, match="must not be negative"):
        split_prompts(["a"], -1, 0, seed=0)


def test_default_path_helper_points_into_the_package():
    assert datasets.default_dataset_path("harmful").name == "harmful_dataset.jsonl"


# --- large files are streamed -----------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".txt", ".csv", ".parquet"])
def test_large_file_is_streamed_not_loaded_whole(tmp_path, suffix):
    """A 20 MB file with a few short prompts and big other fields: peak memory far below the file size."""
    import tracemalloc

    filler = "x" * 20_000
    rows = [{"prompt": f"prompt {i % 3}", "response": filler} for i in range(1000)]
    path = tmp_path / f"big{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".txt":
        path.write_text("".join(f"prompt {i % 3} {filler}\n" for i in range(1000)))
    elif suffix == ".csv":
        path.write_text("prompt,response\n" + "".join(f"{r['prompt']},{filler}\n" for r in rows))
    else:
        import os

        rows = [{"prompt": r["prompt"], "response": os.urandom(10_000).hex()} for r in rows]  # incompressible
        pq.write_table(pa.Table.from_pylist(rows), path, compression="none", use_dictionary=False)
    size = path.stat().st_size
    assert size > 19_000_000
    tracemalloc.start()
    try:
        prompts = load_prompts(path, "harmful")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(prompts) == 3
    assert peak < size / 8, f"peak {peak / 1e6:.1f} MB for a {size / 1e6:.1f} MB file"


def test_streamed_jsonl_still_validates_every_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(5000)) + "{broken\n")
    with pytest.raises(UserError, match="line 5001: malformed JSON"):
        load_prompts(path, "harmful")


def test_parquet_without_pyarrow_says_which_extra_to_install(tmp_path, monkeypatch):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"]}), path)
    monkeypatch.setitem(__import__("sys").modules, "pyarrow", None)  # as if not installed
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)
    with pytest.raises(UserError, match=r"needs pyarrow; install it with: pip install 'mlx-abliteration\[parquet\]'"):
        load_prompts(path, "harmful")


# --- the prompts a run takes: streamed, the same as split_prompts(load_prompts(...)) ------


def _mixed_sources(tmp_path: Path) -> list[Path]:
    rows = [f"prompt {i % 37} é ünï {'long ' * (i % 2)}" for i in range(120)] + ["", "  ", "prompt 3 é ünï "]
    jsonl = _jsonl(tmp_path / "d.jsonl", [{"prompt": p} for p in rows])
    txt = tmp_path / "d.txt"
    txt.write_text("\n".join(rows))
    folder = tmp_path / "dir"
    folder.mkdir()
    _csv(folder / "a.csv", ["text"], [[p] for p in rows[:60]])
    _csv(folder / "b.csv", ["text"], [[p] for p in rows[40:]])
    return [jsonl, txt, folder]


def test_streamed_selection_takes_the_same_prompts_as_the_split(tmp_path):
    """Issue 26: select_prompts reads only the prompts it takes, and takes exactly those the split took."""
    import hashlib

    from mlx_abliteration.data.prompt_selection import scan_prompts, select_prompts

    for source in _mixed_sources(tmp_path):
        everything = load_prompts(source, "harmful")
        scan = scan_prompts(source, "harmful")
        assert scan.count == len(everything) and list(scan.unique()) == everything
        for seed in (0, 7, 42):
            for n_train, n_eval in ((3, 2), (0, 5), (10, 0), (None, 4), (len(everything) - 1, 1)):
                expected = split_prompts(everything, n_train, n_eval, seed)
                assert select_prompts(source, "harmful", n_train, n_eval, seed) == expected
            rest, held_out = split_prompts(everything, None, 4, seed)
            assert scan.split(None, 4, seed, take=6) == (rest[:6], held_out)
        for ascii_only in (True, False):
            whole = hashlib.sha256(json.dumps(everything, ensure_ascii=ascii_only).encode()).hexdigest()
            assert scan.digest(ensure_ascii=ascii_only) == whole
        with pytest.raises(UserError, match=f"has {len(everything)} prompts but {len(everything)}\\+1 were requested"):
            scan.split(len(everything), 1, 0, name="x")


def test_large_dataset_for_a_few_prompts_keeps_memory_bounded(tmp_path):
    """Issue 26: a 200 MB JSONL file used for 3 prompts peaked at 832 MB RSS (every prompt held, several
    times over). The prompts a run takes and the log's digests of a ~50 MB file: peak RSS of a subprocess
    grows by a small part of the file size over its own baseline (after imports, a small dataset read)."""
    import os
    import subprocess
    import sys

    big = tmp_path / "big.jsonl"
    with big.open("w") as out:
        for i in range(20_000):  # 20k unique prompts of 2.5 kB, and some duplicates
            out.write(json.dumps({"prompt": f"prompt {i % 19_000} " + "x" * 2500, "response": "y" * 100}) + "\n")
    small = _jsonl(tmp_path / "small.jsonl", [{"prompt": f"p{i}"} for i in range(50)])
    size = big.stat().st_size
    code = """
import resource, sys
from types import SimpleNamespace
from mlx_abliteration.config.defaults import AbliterationConfig
from mlx_abliteration.data.prompt_selection import prompt_digests
from mlx_abliteration.pipeline import steps
quiet = SimpleNamespace(emit=lambda *a, **k: None)
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
small = AbliterationConfig(harmful_dataset=sys.argv[2], harmless_dataset=sys.argv[2], max_prompts=3, eval_size=2)
steps.prompts(small, quiet), prompt_digests(small)
baseline = peak()
config = AbliterationConfig(harmful_dataset=sys.argv[1], harmless_dataset=sys.argv[1], max_prompts=3, eval_size=2)
data = steps.prompts(config, quiet)
prompt_digests(config)
assert len(data.harmful_train) == 3 and len(data.harmful_eval) == 2
print(peak() - baseline)
"""
    proc = subprocess.run(
        [sys.executable, "-c", code, str(big), str(small)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MLX_ABLITERATION_LOG_FILE": os.devnull},
    )
    assert proc.returncode == 0, proc.stderr
    growth = int(proc.stdout.split()[-1])
    assert growth < size / 5, f"peak RSS grew {growth / 1e6:.0f} MB for a {size / 1e6:.0f} MB file"
