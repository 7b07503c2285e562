"""Durable, resumable results keyed (image_id, model, prompt_id).

While a job runs, rows are appended to `results.jsonl` (one `write` per row, flushed at once,
fsynced at most every `fsync_interval` seconds and on close): a crashed driver leaves at most
one torn last line, which the next open detects and cuts off. One writer at a time: opening takes
an exclusive lock on the directory (`.lock`, released when the process ends however it ends), so
a second driver on the same directory is refused before it reads or cuts anything. Opening builds the set of done
keys, so a rerun skips them. `finalize()` writes `results.parquet` through a temp file and
`os.replace`, keeping exactly one row per key (a later row for a key supersedes an earlier
error row that was retried).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from ...engine.images import without_reprs
from ..spec.inputs import safe_text
from ..spec.validation import SpecError

KEY_FIELDS = ("image_id", "model", "prompt_id")
# column -> default; a row is always written with every column, in this order
COLUMNS = {
    "image_id": "",
    "model": "",
    "prompt_id": "",
    "caption": "",
    "finish_reason": "",
    "error": None,
    "num_prompt_tokens": 0,
    "num_image_tokens": 0,
    "num_generated_tokens": 0,
    "latency_s": 0.0,
    "source": None,
    "prompt": "",
    "attempts": 1,
    "retryable": False,
    "worker": "",
    "time": 0.0,
}
_SEP = "\x1f"


class DuplicateKeyError(RuntimeError):
    """A second final row for a key: the runner submitted a key twice (a bug, never data)."""


class OutputDirBusy(SpecError):
    """Another process holds the output directory's lock: two writers would compute and append
    every key twice, and the second could cut the first's newest row as a torn tail."""


def _lock(out_dir: Path) -> int:
    """Take the directory's exclusive lock (non-blocking) and record who holds it; returns the fd."""
    path = out_dir / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.read(fd, 512).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise OutputDirBusy(
            f"{out_dir} is in use by {holder}: one job writes to an output directory at a time; "
            "wait for it to finish (or stop it), or give another output directory"
        ) from None
    os.ftruncate(fd, 0)
    os.write(
        fd,
        f"modelyard pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(),
    )
    return fd


def key_of(row: dict) -> str:
    return _SEP.join(str(row[k]) for k in KEY_FIELDS)


def make_key(image_id: str, model: str, prompt_id: str) -> str:
    return _SEP.join((image_id, model, prompt_id))


def error_row(
    image_id: str,
    model: str,
    prompt_id: str,
    error: str,
    *,
    retryable: bool,
    source=None,
    prompt: str = "",
    attempts: int = 1,
    worker: str = "",
) -> dict:
    return {
        "image_id": image_id,
        "model": model,
        "prompt_id": prompt_id,
        "finish_reason": "error",
        "error": without_reprs(error),
        "retryable": retryable,
        "source": source,
        "prompt": prompt,
        "attempts": attempts,
        "worker": worker,
    }


class ResultStore:
    """Append-only JSONL with a per-key index. One writer (the driver) at a time."""

    def __init__(self, out_dir: str | os.PathLike, *, retry_errors: bool = False, fsync_interval: float = 0.5):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.dir / "results.jsonl"
        self.parquet = self.dir / "results.parquet"
        self.retry_errors = retry_errors
        self.fsync_interval = fsync_interval
        self._done: set[str] = set()  # keys whose row is final
        self._redo: set[str] = set()  # keys with an error row to recompute on this run
        self.dropped_torn_bytes = 0
        self.resumed_rows = 0
        self._lock_fd = _lock(self.dir)
        self._scan()
        self._fd = os.open(self.jsonl, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._last_sync = time.monotonic()
        self._dirty = False

    # -- opening --------------------------------------------------------------------------------
    def _scan(self) -> None:
        if not self.jsonl.exists():
            return
        good_end = 0
        with open(self.jsonl, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break  # torn tail: the writer died mid-row
                try:
                    row = json.loads(line)
                    key = key_of(row)
                except (ValueError, KeyError):
                    break  # a garbled line can only be the torn tail
                good_end += len(line)
                self.resumed_rows += 1
                self._index(key, row)
        size = self.jsonl.stat().st_size
        if good_end < size:
            self.dropped_torn_bytes = size - good_end
            with open(self.jsonl, "r+b") as f:
                f.truncate(good_end)
                f.flush()
                os.fsync(f.fileno())

    def _index(self, key: str, row: dict) -> None:
        if row.get("finish_reason") == "error" and (self.retry_errors or row.get("retryable")):
            self._done.discard(key)
            self._redo.add(key)
        else:
            self._redo.discard(key)
            self._done.add(key)

    # -- writing --------------------------------------------------------------------------------
    def is_done(self, key: str) -> bool:
        return key in self._done

    @property
    def num_done(self) -> int:
        return len(self._done)

    def add(self, row: dict) -> None:
        unknown = set(row) - set(COLUMNS)
        if unknown:
            raise ValueError(f"unknown result columns: {sorted(unknown)}")
        full = {c: (safe_text(v) if isinstance(v := row.get(c, d), str) else v) for c, d in COLUMNS.items()}
        if not full["time"]:
            full["time"] = time.time()
        key = key_of(full)
        if key in self._done:
            raise DuplicateKeyError(f"key {tuple(key.split(_SEP))} already has a final row")
        data = (json.dumps(full, ensure_ascii=False) + "\n").encode("utf-8")
        # retryable errors from this run stay redo-able for the next run, not for this one
        self._done.add(key)
        self._redo.discard(key)
        n = os.write(self._fd, data)
        while n < len(data):  # a short write (rare: full disk, signals)
            n += os.write(self._fd, data[n:])
        self._dirty = True
        now = time.monotonic()
        if now - self._last_sync >= self.fsync_interval:
            self.sync()

    def add_many(self, rows: Iterable[dict]) -> None:
        for r in rows:
            self.add(r)

    def sync(self) -> None:
        if self._dirty:
            os.fsync(self._fd)
            self._dirty = False
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if self._fd is not None:
            self.sync()
            os.close(self._fd)
            self._fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- reading --------------------------------------------------------------------------------
    def iter_rows(self) -> Iterator[dict]:
        """Every complete row in the JSONL, in write order (superseded rows included)."""
        if not self.jsonl.exists():
            return
        with open(self.jsonl, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    return
                yield json.loads(line)

    def _latest_lines(self) -> dict[str, int]:
        """key -> index of its last row in the JSONL (the row that counts)."""
        return {key_of(row): i for i, row in enumerate(self.iter_rows())}

    def iter_final_rows(self) -> Iterator[dict]:
        """One row per key: the last one written for it, in write order."""
        latest = self._latest_lines()
        for i, row in enumerate(self.iter_rows()):
            if latest[key_of(row)] == i:
                yield row

    def to_frame(self):
        """One row per key (the last written wins), as a pandas DataFrame."""
        return _to_table(list(self.iter_final_rows())).to_pandas()

    def finalize(self, chunk_rows: int = 1024) -> Path:
        """Write results.parquet atomically (temp file + os.replace) and return its path.

        Streams the JSONL in chunks, so memory is the key index plus one chunk, whatever the job's size.
        """
        import pyarrow.parquet as pq

        self.sync()
        tmp = self.parquet.with_name(f".{self.parquet.name}.{os.getpid()}.tmp")
        with pq.ParquetWriter(tmp, _schema()) as writer:
            buf: list[dict] = []
            for row in self.iter_final_rows():
                buf.append(row)
                if len(buf) >= chunk_rows:
                    writer.write_table(_to_table(buf))
                    buf.clear()
            if buf:
                writer.write_table(_to_table(buf))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.parquet)
        return self.parquet


_ARROW_TYPES = {
    "num_prompt_tokens": "int64",
    "num_image_tokens": "int64",
    "num_generated_tokens": "int64",
    "attempts": "int64",
    "latency_s": "float64",
    "time": "float64",
    "retryable": "bool_",
}


def _schema():
    import pyarrow as pa

    return pa.schema([(c, getattr(pa, _ARROW_TYPES.get(c, "string"))()) for c in COLUMNS])


def _to_table(rows: list[dict]):
    import pyarrow as pa

    return pa.Table.from_pylist([{c: r.get(c, d) for c, d in COLUMNS.items()} for r in rows], schema=_schema())


def write_json_atomic(path: str | os.PathLike, data) -> None:
    """Small metadata files (job.json, summary.json): temp file + fsync + os.replace."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
