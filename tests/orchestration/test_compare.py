"""Side-by-side table, agreement metrics, self-contained HTML report."""

import pandas as pd
import pytest
from PIL import Image

from modelyard.orchestration.outputs.compare import (
    agreement,
    side_by_side,
    token_set,
    word_similarity,
    write_comparison,
)
from modelyard.orchestration.outputs.report import thumbnail_data_uri
from modelyard.orchestration.outputs.store import ResultStore, error_row


def test_metrics():
    assert word_similarity("a red car", "a red car") == 1.0
    assert word_similarity("a red car", "a blue car") == pytest.approx(2 / 3)
    assert word_similarity("", "") == 1.0 and word_similarity("x", "") == 0.0
    assert token_set("red car parked", "car red") == 1.0  # order-free, subset
    assert 0 <= token_set("dog", "cat") < 0.5


@pytest.fixture
def results(tmp_path):
    img = tmp_path / "i0.png"
    Image.new("RGB", (300, 200), (10, 200, 30)).save(img)
    s = ResultStore(tmp_path / "out")
    rows = [
        ("i0", "a", "a <b>green</b> field & sky"),
        ("i0", "b", "a green field"),
        ("i1", "a", "two dogs"),
        ("i1", "b", None),
    ]
    for iid, m, cap in rows:
        src = str(img) if iid == "i0" else str(tmp_path / "missing.jpg")
        if cap is None:
            s.add(error_row(iid, m, "p", "cannot identify image file <x>", retryable=False, source=src))
        else:
            s.add(
                {
                    "image_id": iid,
                    "model": m,
                    "prompt_id": "p",
                    "caption": cap,
                    "finish_reason": "stop",
                    "source": src,
                    "num_generated_tokens": 4,
                    "latency_s": 0.5,
                }
            )
    s.close()
    return s.to_frame(), tmp_path / "out"


def test_side_by_side_and_agreement(results):
    df, _ = results
    t = side_by_side(df, ["a", "b"])
    assert list(t.columns) == ["image_id", "prompt_id", "source", "a", "a.error", "b", "b.error"]
    assert t.loc[1, "b"] == "" and "cannot identify" in t.loc[1, "b.error"] and t.loc[1, "a.error"] is None
    m = agreement(t, ["a", "b"])
    # only i0 counts (b failed on i1): words a,<,b,>,green,... vs a,green,field
    assert m.loc["a", "b"] == m.loc["b", "a"] == pytest.approx(word_similarity(t.loc[0, "a"], t.loc[0, "b"]))
    assert m.loc["a", "a"] == 1.0


def test_report_is_self_contained_and_escaped(results):
    df, out = results
    paths = write_comparison(out, df, ["a", "b"], summary={"a": {"images_per_s": 3.2, "load_s": 1.0}})
    page = open(paths["report"], encoding="utf-8").read()
    assert "a &lt;b&gt;green&lt;/b&gt; field &amp; sky" in page and "<b>green" not in page
    assert "error: cannot identify image file &lt;x&gt;" in page
    assert page.count("data:image/jpeg;base64,") == 1 and "no preview" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert pd.read_parquet(paths["comparison"]).shape[0] == 2
    assert "word_similarity" in open(paths["agreement"]).read()


def test_thumbnails_of_awkward_images(tmp_path):
    from modelyard.testing import awkward_images, broken_images

    for name, p in awkward_images(tmp_path / "ok").items():
        assert thumbnail_data_uri(str(p)), name
    for name, p in broken_images(tmp_path / "bad").items():
        if name != "truncated_jpeg":  # Pillow may render what the truncated file has
            assert thumbnail_data_uri(str(p)) is None, name
