"""Lazy enumeration of a job's images as (image_id, source) items.

The driver never reads pixels: a source is a path (the actor opens it) or, for in-memory inputs,
the encoded bytes. Enumeration is a generator over the file system / list / dataset, so the
driver's memory does not grow with the data set.

image_id is stable across runs (resume depends on it): the path relative to the input root for
a directory or glob, the path as written for a path list or a Python list, "sha1:<digest>" for
bytes without an id, or the id the caller gives. A file name that is not valid UTF-8 (surrogate-
escaped by the OS layer) gets an id with its odd bytes written as `\\xNN`, so it can be stored,
compared and shown like any other; its source keeps the real path the actor opens.
"""

from __future__ import annotations

import glob as _glob
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .job import InputSpec, SpecError


def safe_text(s: str) -> str:
    """`s` with surrogate-escaped bytes (a non-UTF-8 file name) written as `\\xNN`: valid Unicode
    that JSON, Parquet and HTML take, and the same for the same bytes on every run."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass(frozen=True, slots=True)
class InputItem:
    image_id: str
    source: str | bytes  # filesystem path, or encoded image bytes

    def __post_init__(self):
        object.__setattr__(self, "image_id", safe_text(self.image_id))

    @property
    def path(self) -> str | None:
        return self.source if isinstance(self.source, str) else None


def _bytes_id(data: bytes) -> str:
    return "sha1:" + hashlib.sha1(data).hexdigest()[:20]


def _walk(root: str, recursive: bool, exts: tuple[str, ...]) -> Iterator[str]:
    """Files under root in a stable (sorted, depth-first) order, one directory listed at a time."""
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        subdirs = []
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=True):
                    if recursive and not e.name.startswith("."):
                        subdirs.append(e.path)
                elif e.is_file(follow_symlinks=True) and os.path.splitext(e.name)[1].lower() in exts:
                    yield e.path
            except OSError:
                continue
        stack.extend(reversed(subdirs))


def _glob_root(pattern: str) -> str:
    parts = Path(pattern).parts
    fixed = []
    for p in parts:
        if _glob.has_magic(p):
            break
        fixed.append(p)
    return str(Path(*fixed)) if fixed else "."


def _from_item(x: Any, i: int) -> InputItem:
    if isinstance(x, InputItem):
        return x
    if isinstance(x, (str, os.PathLike)):
        return InputItem(os.fspath(x), os.fspath(x))
    if isinstance(x, (bytes, bytearray, memoryview)):
        b = bytes(x)
        return InputItem(_bytes_id(b), b)
    if isinstance(x, tuple) and len(x) == 2:
        iid, src = x
        src = os.fspath(src) if isinstance(src, os.PathLike) else src
        if not isinstance(src, (str, bytes)):
            raise SpecError(f"inputs.items[{i}]: source must be a path or bytes, got {type(src).__name__}")
        return InputItem(str(iid), src)
    if isinstance(x, dict):
        return _from_row(x, f"inputs.items[{i}]")
    raise SpecError(f"inputs.items[{i}]: expected a path, bytes, (id, source) or a dict, got {type(x).__name__}")


def _from_row(row: dict, where: str) -> InputItem:
    iid = row.get("id", row.get("image_id"))
    if row.get("bytes") is not None:
        b = bytes(row["bytes"])
        path = row.get("path")
        return InputItem(str(iid) if iid is not None else (str(path) if path else _bytes_id(b)), b)
    if row.get("path") is not None:
        p = os.fspath(row["path"])
        return InputItem(str(iid) if iid is not None else p, p)
    raise SpecError(f"{where}: a row needs a 'path' or 'bytes' column (optionally 'id'); got {sorted(row)}")


def iter_items(spec: InputSpec) -> Iterator[InputItem]:
    """Yield the job's items lazily. Missing roots raise SpecError before anything runs."""
    if spec.directory is not None:
        root = spec.directory
        if not os.path.isdir(root):
            raise SpecError(f"inputs.directory {root!r} is not a directory")
        for p in _walk(root, spec.recursive, spec.extensions):
            yield InputItem(Path(os.path.relpath(p, root)).as_posix(), p)
    elif spec.glob is not None:
        root = _glob_root(spec.glob)
        for p in _glob.iglob(spec.glob, recursive=True):
            if os.path.isfile(p):
                yield InputItem(Path(os.path.relpath(p, root)).as_posix(), p)
    elif spec.file_list is not None:
        if not os.path.isfile(spec.file_list):
            raise SpecError(f"inputs.file_list {spec.file_list!r} not found")
        base = os.path.dirname(os.path.abspath(spec.file_list))
        with open(spec.file_list, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                iid, _, p = line.partition("\t") if "\t" in line else (line, "", line)
                yield InputItem(iid, p if os.path.isabs(p) else os.path.join(base, p))
    elif spec.items is not None:
        for i, x in enumerate(spec.items):
            yield _from_item(x, i)
    else:
        for row in spec.dataset.iter_rows():
            yield _from_row(dict(row), "inputs.dataset")


def count_items(spec: InputSpec) -> int:
    """Number of items (for progress totals); a full lazy pass, or the dataset's count()."""
    if spec.items is not None:
        return len(spec.items)
    if spec.dataset is not None:
        return int(spec.dataset.count())
    return sum(1 for _ in iter_items(spec))


def require_items(spec: InputSpec) -> None:
    """SpecError unless the input yields at least one item: an empty directory, a glob matching
    nothing or an empty path list is a mistake to say plainly, not a job that 'succeeds' on nothing.
    Reads one directory listing / glob step, never the whole input."""
    if spec.items is not None or spec.dataset is not None:
        if spec.items is not None and not spec.items:
            raise SpecError("inputs: the list of items is empty")
        return
    if next(iter_items(spec), None) is not None:
        return
    if spec.directory is not None:
        where = "under it (subdirectories included)" if spec.recursive else "in it (recursive = false)"
        raise SpecError(
            f"no images in {spec.directory!r}: no file with an image extension ({', '.join(spec.extensions)}) {where}"
        )
    if spec.glob is not None:
        raise SpecError(f"no files match {spec.glob!r} (a recursive glob needs '**', e.g. 'imgs/**/*.jpg')")
    raise SpecError(f"inputs.file_list {spec.file_list!r} lists no paths")
