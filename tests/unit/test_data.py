"""Calibration/eval text loading and the window protocols."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import worker.data as data
from tests.fixtures_models import SAMPLE_DOCS
from worker.data import (
    DataError,
    contiguous_windows,
    load_texts,
    make_windows,
    select_split_files,
    token_stream,
    windows_hash,
)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_parquet(path: Path, columns: dict[str, list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def test_txt_paragraphs_and_lines(tmp_path):
    paragraphs = tmp_path / "paragraphs.txt"
    paragraphs.write_text("First line\nstill first.\n\n  \nSecond.\n\n\nThird\n")
    assert load_texts(str(paragraphs)) == ["First line\nstill first.", "Second.", "Third"]
    lines = tmp_path / "lines.txt"
    lines.write_text("one\ntwo\n  three\n")
    assert load_texts(str(lines)) == ["one", "two", "three"]


def test_jsonl_field_and_errors(tmp_path):
    good = write_jsonl(tmp_path / "a.jsonl", [{"content": "alpha"}, {"content": "  "}, {"content": "beta"}])
    assert load_texts(str(good), text_field="content") == ["alpha", "beta"]
    with pytest.raises(DataError, match=r"a\.jsonl line 1: no field 'text'"):
        load_texts(str(good))
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(DataError, match="line 2: invalid JSON"):
        load_texts(str(bad))
    numbers = write_jsonl(tmp_path / "c.jsonl", [{"text": 3}])
    with pytest.raises(DataError, match="not a string"):
        load_texts(str(numbers))


def test_parquet_column_and_missing_column(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", {"text": ["x y", None, "z"], "id": [1, 2, 3]})
    assert load_texts(str(path)) == ["x y", "z"]
    with pytest.raises(DataError, match=r"no column 'body'; columns are \['text', 'id'\]"):
        load_texts(str(path), text_field="body")


def test_unknown_extension_empty_file_and_missing_file(tmp_path):
    csv = tmp_path / "e.csv"
    csv.write_text("text\nhello\n")
    with pytest.raises(DataError, match="unknown file type '.csv'"):
        load_texts(str(csv))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(DataError, match="no non-empty documents"):
        load_texts(str(empty))
    with pytest.raises(DataError, match="does not exist"):
        load_texts(str(tmp_path / "missing.jsonl"))


def test_local_roots_and_allow_local(tmp_path):
    inside = tmp_path / "allowed" / "calib.txt"
    inside.parent.mkdir()
    inside.write_text("hello world")
    outside = tmp_path / "secret.txt"
    outside.write_text("do not read")
    roots = [tmp_path / "allowed"]
    assert load_texts(str(inside), local_roots=roots) == ["hello world"]
    with pytest.raises(DataError, match="outside the allowed data folders"):
        load_texts(str(outside), local_roots=roots)
    with pytest.raises(DataError, match="outside the allowed data folders"):
        load_texts(str(tmp_path / "allowed" / ".." / "secret.txt"), local_roots=roots)
    with pytest.raises(DataError, match="local data sources are not allowed"):
        load_texts(str(inside), allow_local=False)


def make_snapshot(root: Path) -> Path:
    write_parquet(root / "data" / "train-00000-of-00002.parquet", {"text": ["t1", "t2"]})
    write_parquet(root / "data" / "train-00001-of-00002.parquet", {"text": ["t3"]})
    write_parquet(root / "data" / "validation-00000-of-00001.parquet", {"text": ["v1"]})
    (root / "README.md").write_text("# card")
    return root


def test_local_snapshot_folder_split_selection(tmp_path):
    root = make_snapshot(tmp_path / "snap")
    assert load_texts(str(root)) == ["t1", "t2", "t3"]
    assert load_texts(str(root), split="validation") == ["v1"]
    with pytest.raises(DataError, match="no .* files for split 'test'"):
        load_texts(str(root), split="test")


def test_select_split_files_layouts():
    files = ["train.jsonl", "test.jsonl", "pretrain_notes.jsonl", "valid/x.jsonl"]
    assert select_split_files(files, "train") == ["train.jsonl"]
    assert select_split_files(["cfg/train/0.parquet", "cfg/test/0.parquet"], "train") == ["cfg/train/0.parquet"]
    with pytest.raises(DataError, match="several configurations"):
        select_split_files(["wt2/train-0.parquet", "wt103/train-0.parquet"], "train")
    with pytest.raises(DataError, match="mixes file types"):
        select_split_files(["train.jsonl", "data/train-0.parquet"], "train")


def test_hub_dataset_download(monkeypatch, tmp_path):
    snapshot = make_snapshot(tmp_path / "hub")
    write_parquet(snapshot / "other" / "train-0.parquet", {"text": ["o1"]})
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(snapshot)

    monkeypatch.setattr(data, "snapshot_download", fake_snapshot_download)
    assert load_texts("owner/corpus/other") == ["o1"]
    repo_id, kwargs = calls[-1]
    assert repo_id == "owner/corpus"
    assert kwargs["repo_type"] == "dataset"
    assert kwargs["allow_patterns"] == ["other/*train*.txt", "other/*train*.jsonl", "other/*train*.parquet"]
    # The whole snapshot holds train files in two configurations: ambiguous without a subfolder.
    with pytest.raises(DataError, match="several configurations"):
        load_texts("owner/corpus")


def test_hub_download_failure_is_a_data_error(monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id, **kwargs):
        raise LocalEntryNotFoundError("no connection")

    monkeypatch.setattr(data, "snapshot_download", offline)
    with pytest.raises(DataError, match="could not download dataset 'owner/corpus'"):
        load_texts("owner/corpus")
    with pytest.raises(DataError, match="neither an existing file nor"):
        load_texts("bad id with spaces")


def test_token_stream_puts_eos_between_documents(tiny_tokenizer):
    stream = token_stream(tiny_tokenizer, ["ab", "cd"])
    first = tiny_tokenizer("ab", add_special_tokens=False)["input_ids"]
    second = tiny_tokenizer("cd", add_special_tokens=False)["input_ids"]
    assert stream.tolist() == first + [tiny_tokenizer.eos_token_id] + second


def test_make_windows_deterministic_and_from_the_stream(tiny_tokenizer):
    windows = make_windows(tiny_tokenizer, SAMPLE_DOCS, num_samples=6, seq_len=16, seed=0)
    assert windows.shape == (6, 16) and windows.dtype == torch.long
    assert torch.equal(windows, make_windows(tiny_tokenizer, SAMPLE_DOCS, 6, 16, seed=0))
    assert not torch.equal(windows, make_windows(tiny_tokenizer, SAMPLE_DOCS, 6, 16, seed=1))
    stream = token_stream(tiny_tokenizer, SAMPLE_DOCS).tolist()
    starts = [s for s in range(len(stream) - 15)]
    for window in windows.tolist():
        assert any(stream[s : s + 16] == window for s in starts)


def test_make_windows_needs_enough_tokens(tiny_tokenizer):
    n = len(token_stream(tiny_tokenizer, ["short text"]))
    assert make_windows(tiny_tokenizer, ["short text"], 2, n - 1, seed=0).shape == (2, n - 1)
    with pytest.raises(DataError, match=f"has {n} tokens; at least {n + 1}"):
        make_windows(tiny_tokenizer, ["short text"], 2, n, seed=0)


def test_contiguous_windows(tiny_tokenizer):
    stream = token_stream(tiny_tokenizer, SAMPLE_DOCS)
    windows = contiguous_windows(tiny_tokenizer, SAMPLE_DOCS, num_windows=3, seq_len=20)
    assert torch.equal(windows, stream[:60].reshape(3, 20))
    available = len(stream) // 20
    with pytest.raises(DataError, match=f"{available} windows of 20, {available + 1} requested"):
        contiguous_windows(tiny_tokenizer, SAMPLE_DOCS, available + 1, 20)


def test_windows_hash_is_stable():
    windows = torch.arange(12).reshape(3, 4)
    digest = windows_hash(windows)
    # Pinned: a change here means every recorded calibration set changes identity.
    assert digest == windows_hash(windows.clone().to(torch.int32))
    assert digest == EXPECTED_ARANGE_HASH
    changed = windows.clone()
    changed[2, 3] = 99
    assert windows_hash(changed) != digest
    assert windows_hash(windows.reshape(4, 3)) != digest


# sha256(b"(3, 4)" + the 12 little-endian int64 values 0..11), computed independently with hashlib.
EXPECTED_ARANGE_HASH = "4d342c941a8823b03e499d028923f2d6792bf9b1664f3a0f4de493ea7d815438"


# The held-back evaluation slice (worker.job_data.load_windows, no evaluation.dataset).

def held_out_spec(calibration: Path, num_samples: int = 4, seq_len: int = 32, num_windows: int = 8):
    from app.jobs.spec import JobSpec

    return JobSpec.model_validate({
        "model": {"id": "tiny"}, "quantization": {"method": "rtn", "bits": 4, "group_size": 32},
        "calibration": {"dataset": str(calibration), "num_samples": num_samples, "seq_len": seq_len},
        "evaluation": {"num_windows": num_windows}})


def held_out(tmp_path, tokenizer, text: str, **spec):
    from app.settings import Settings
    from worker.job_data import load_windows

    path = tmp_path / "calibration.txt"
    path.write_text(text)
    return load_windows(held_out_spec(path, **spec), Settings(data_dir=tmp_path / "data"), tokenizer)


def test_one_line_calibration_file_holds_back_its_last_tenth_of_tokens(tiny_tokenizer, tmp_path):
    text = " ".join(doc.strip() for doc in SAMPLE_DOCS)  # one line, no blank lines: one document
    stream = token_stream(tiny_tokenizer, [text])
    held = int(len(stream) * 0.1)
    calibration, evaluation, info = held_out(tmp_path, tiny_tokenizer, text, num_windows=64)
    count = min(64, held // 32)
    assert count >= 1 and evaluation.shape == (count, 32)
    assert torch.equal(evaluation.flatten(), stream[len(stream) - held:][: count * 32])
    assert torch.equal(calibration, data.stream_windows(stream[: len(stream) - held], 4, 32, 0))
    assert info["evaluation_source"].startswith(f"last {held} of {len(stream)} tokens")
    assert count < 64  # the slice holds fewer windows than asked, and the job says so
    assert info["notes"] == [f"evaluation runs on {count} windows of 32 tokens, not the 64 asked: that is all the "
                             "held-back slice of the calibration text holds (give evaluation.dataset for more)"]


def test_a_tiny_file_evaluates_on_one_shorter_window_and_says_so(tiny_tokenizer, tmp_path):
    text = SAMPLE_DOCS[0].strip()  # ~ 1.3 KB, ~ 760 tokens: a tenth is less than one 128-token window
    stream = token_stream(tiny_tokenizer, [text])
    held = int(len(stream) * 0.1)
    assert held < 128
    _, evaluation, info = held_out(tmp_path, tiny_tokenizer, text, seq_len=128, num_windows=4)
    assert evaluation.shape == (1, held) and torch.equal(evaluation[0], stream[len(stream) - held:])
    assert info["notes"] == [f"evaluation runs on 1 window of {held} tokens, not 4 of 128: the held-back slice of the "
                             "calibration text holds less than one window (give evaluation.dataset for a full "
                             "evaluation)"]


def test_ten_or_more_documents_hold_back_their_last_tenth(tiny_tokenizer, tmp_path):
    docs = [f"{doc.strip()} {i}" for i in range(3) for doc in SAMPLE_DOCS][:10]  # ten paragraphs
    calibration, evaluation, info = held_out(tmp_path, tiny_tokenizer, "\n\n".join(docs), num_windows=2)
    assert info["evaluation_source"] == "last 1 of 10 documents of the calibration dataset"
    assert torch.equal(calibration, make_windows(tiny_tokenizer, docs[:9], 4, 32, 0))
    assert torch.equal(evaluation, token_stream(tiny_tokenizer, docs[9:])[:64].reshape(2, 32))
    assert info["notes"] == []


def test_too_little_text_to_hold_anything_back_fails_readably(tiny_tokenizer, tmp_path):
    from worker.errors import JobFailure

    with pytest.raises(JobFailure, match="too few to hold back an evaluation slice: give evaluation.dataset"):
        held_out(tmp_path, tiny_tokenizer, "fox", seq_len=16)


def test_user_data_problems_are_data_errors_that_name_no_server_path(tmp_path, tiny_tokenizer):
    bad_utf8 = tmp_path / "latin1.txt"
    bad_utf8.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    fake = tmp_path / "fake.parquet"
    fake.write_bytes(b"this is not parquet at all")
    snapshot = make_snapshot(tmp_path / "snap")
    cases = [
        (lambda: load_texts(str(bad_utf8)), "latin1.txt: not UTF-8 text (byte 3 cannot be decoded)"),
        (lambda: load_texts(str(fake)), "fake.parquet: not a readable parquet file (ArrowInvalid)"),
        (lambda: load_texts(str(snapshot), split="test"),
         "the dataset folder has no .txt/.jsonl/.parquet files for split 'test' (3 data files of other splits)"),
        (lambda: make_windows(tiny_tokenizer, SAMPLE_DOCS, 2, 8, 10**30), "calibration.seed must fit in 64 bits"),
    ]
    for call, message in cases:
        with pytest.raises(DataError) as raised:
            call()
        assert str(raised.value) == message
        assert str(tmp_path) not in str(raised.value)


def test_without_local_access_the_filesystem_is_never_asked(tmp_path, monkeypatch):
    """'/etc' and '/etc/passwd' (one a folder, one a file, both exist) and a missing path: one answer."""
    answers = set()
    for source in ("/etc", "/etc/passwd", str(tmp_path / "missing.txt"), "./x", "~/y"):
        with pytest.raises(DataError) as raised:
            load_texts(source, allow_local=False)
        answers.add(str(raised.value).replace(repr(source), "<source>"))
    assert answers == {"local data sources are not allowed here: <source>"}
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "corpus.txt").write_text("a local file spelled like a Hub id")
    asked = []
    monkeypatch.setattr(data, "_download_hub_split", lambda source, *a: asked.append(source) or [])
    with pytest.raises(DataError, match="holds no non-empty documents"):
        load_texts("owner/corpus.txt", allow_local=False)
    assert asked == ["owner/corpus.txt"]  # went to the Hub, not to the file in the worker's folder
