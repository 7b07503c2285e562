"""ResultStore: exactly once per key, torn-tail recovery, resume index, atomic Parquet."""

import json
import os

import pandas as pd
import pytest

from modelyard.orchestration.outputs.store import DuplicateKeyError, ResultStore, error_row, make_key


def _row(i, model="m", caption=None):
    return {
        "image_id": f"img{i}",
        "model": model,
        "prompt_id": "p",
        "caption": caption or f"cap {i}",
        "finish_reason": "stop",
        "num_generated_tokens": 3,
    }


def test_rows_survive_reopen_and_are_skipped(tmp_path):
    with ResultStore(tmp_path) as s:
        for i in range(5):
            s.add(_row(i))
        with pytest.raises(DuplicateKeyError):
            s.add(_row(0))
    s2 = ResultStore(tmp_path)
    assert s2.num_done == 5 and s2.resumed_rows == 5
    assert s2.is_done(make_key("img3", "m", "p")) and not s2.is_done(make_key("img9", "m", "p"))
    s2.close()


def test_torn_tail_is_cut_off(tmp_path):
    with ResultStore(tmp_path) as s:
        for i in range(3):
            s.add(_row(i))
    with open(tmp_path / "results.jsonl", "ab") as f:
        f.write(json.dumps(_row(3)).encode()[:25])  # the writer died mid-row
    s = ResultStore(tmp_path)
    assert s.dropped_torn_bytes == 25 and s.num_done == 3
    s.add(_row(3))
    s.close()
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(l) for l in lines)


def test_retryable_errors_are_redone_and_superseded(tmp_path):
    with ResultStore(tmp_path) as s:
        s.add(error_row("img0", "m", "p", "actor died 3 times", retryable=True))
        s.add(error_row("img1", "m", "p", "cannot identify image file", retryable=False))
        s.add(_row(2))
        # within one run a retryable error is final (no double submission)
        assert s.is_done(make_key("img0", "m", "p"))
    s = ResultStore(tmp_path)
    assert not s.is_done(make_key("img0", "m", "p"))  # retried on resume
    assert s.is_done(make_key("img1", "m", "p"))  # a bad image stays an error
    s.add(_row(0, caption="now fine"))
    s.finalize()
    s.close()
    df = pd.read_parquet(tmp_path / "results.parquet")
    assert len(df) == 3 and df.set_index("image_id").loc["img0", "caption"] == "now fine"
    assert df.set_index("image_id").loc["img1", "finish_reason"] == "error"
    s = ResultStore(tmp_path, retry_errors=True)
    assert not s.is_done(make_key("img1", "m", "p"))
    s.close()


def test_finalize_is_atomic_and_typed(tmp_path):
    with ResultStore(tmp_path) as s:
        for i in range(4):
            s.add(_row(i, model="a"))
            s.add(_row(i, model="b"))
        path = s.finalize()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    df = pd.read_parquet(path)
    assert len(df) == 8 and df["num_generated_tokens"].dtype == "int64"
    assert not df.duplicated(["image_id", "model", "prompt_id"]).any()


def test_unknown_column_rejected(tmp_path):
    with ResultStore(tmp_path) as s, pytest.raises(ValueError, match="unknown result columns"):
        s.add(_row(0) | {"colour": "red"})
