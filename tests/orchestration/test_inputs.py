"""Lazy input enumeration and stable image ids."""

import types

import pytest

from modelyard.orchestration.spec.inputs import count_items, iter_items
from modelyard.orchestration.spec.job import InputSpec, SpecError


@pytest.fixture
def tree(tmp_path):
    for rel in ["b.jpg", "a.PNG", "notes.txt", "sub/c.jpeg", "sub/deeper/d.webp", ".hidden/e.jpg"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    return tmp_path


def test_directory_recursive_sorted_relative_ids(tree):
    items = list(iter_items(InputSpec(directory=str(tree))))
    assert [i.image_id for i in items] == ["a.PNG", "b.jpg", "sub/c.jpeg", "sub/deeper/d.webp"]
    assert all(i.path.startswith(str(tree)) for i in items)
    flat = [i.image_id for i in iter_items(InputSpec(directory=str(tree), recursive=False))]
    assert flat == ["a.PNG", "b.jpg"]
    assert count_items(InputSpec(directory=str(tree))) == 4


def test_enumeration_is_lazy(tree):
    gen = iter_items(InputSpec(directory=str(tree)))
    assert isinstance(gen, types.GeneratorType)
    assert next(gen).image_id == "a.PNG"


def test_glob_ids_relative_to_fixed_prefix(tree):
    ids = sorted(i.image_id for i in iter_items(InputSpec(glob=str(tree / "sub" / "**" / "*.*"))))
    assert ids == ["c.jpeg", "deeper/d.webp"]


def test_file_list_with_ids_and_relative_paths(tree):
    lst = tree / "list.txt"
    lst.write_text("# comment\nb.jpg\n\nmyid\tsub/c.jpeg\n" + str(tree / "a.PNG") + "\n")
    items = list(iter_items(InputSpec(file_list=str(lst))))
    assert [i.image_id for i in items] == ["b.jpg", "myid", str(tree / "a.PNG")]
    assert items[1].source == str(tree / "sub/c.jpeg")


def test_python_items_bytes_pairs_dicts():
    items = list(iter_items(InputSpec(items=["x/a.jpg", b"abc", ("id1", b"zz"), {"id": "id2", "path": "p.png"}])))
    assert items[0].image_id == "x/a.jpg" and items[0].source == "x/a.jpg"
    assert items[1].image_id.startswith("sha1:") and items[1].source == b"abc"
    assert items[1].image_id == list(iter_items(InputSpec(items=[b"abc"])))[0].image_id  # stable
    assert (items[2].image_id, items[2].source) == ("id1", b"zz")
    assert (items[3].image_id, items[3].source) == ("id2", "p.png")
    with pytest.raises(SpecError, match="items\\[0\\]"):
        list(iter_items(InputSpec(items=[3.5])))


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(SpecError, match="not a directory"):
        list(iter_items(InputSpec(directory=str(tmp_path / "nope"))))


def test_dataset_like_rows():
    class FakeDataset:  # the two methods of ray.data.Dataset that inputs.py uses
        def iter_rows(self):
            yield {"path": "/d/a.jpg"}
            yield {"bytes": b"123", "path": "/d/b.jpg"}
            yield {"id": "c", "bytes": b"456"}

        def count(self):
            return 3

    spec = InputSpec.from_any(FakeDataset())
    items = list(iter_items(spec))
    assert [(i.image_id, i.source) for i in items] == [("/d/a.jpg", "/d/a.jpg"), ("/d/b.jpg", b"123"), ("c", b"456")]
    assert count_items(spec) == 3
