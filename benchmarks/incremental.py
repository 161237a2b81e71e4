"""A JSON report rewritten after every change, so that a benchmark killed at any point keeps all it measured.

Each write goes to a temporary file beside the report and is renamed over it (atomic on POSIX): a reader, or
a process that kills the writer, sees the previous complete report or the new one, never half of one. With
``key``, several processes run one after another can share one file: each keeps its own entry under its
key and leaves the others' (the GPU check's two ``torch.compile`` rows, one process each, write one file).

Imported as ``incremental`` with ``benchmarks/`` on ``sys.path`` (as it is when a benchmark runs as a
script). Needs nothing but the standard library.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

__all__ = ["IncrementalJson", "read_json"]


def read_json(path: str | os.PathLike[str]) -> Any:
    """The JSON in ``path``, or None when there is none (or it is not JSON)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


class IncrementalJson:
    """A dict that is written to ``path`` (atomically) whenever it changes.

    ``write(throttle=True)`` skips a write made within ``min_interval_s`` of the previous one (for updates
    inside a timing loop); the next unthrottled write, or :meth:`close`, writes everything.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        data: dict[str, Any] | None = None,
        *,
        key: str | None = None,
        min_interval_s: float = 1.0,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.data: dict[str, Any] = dict(data or {})
        self.key = key
        self.min_interval_s = min_interval_s
        self._last_write = -float("inf")
        self._dirty = False
        self.write()

    def __getitem__(self, name: str) -> Any:
        return self.data[name]

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self.write()

    def fail(self, error: BaseException, limit: int = 2000) -> None:
        """Record a failed run: its status, the error (at most ``limit`` characters) and the traceback's
        end; the traceback also goes to stderr (a benchmark that fails soft still says why)."""
        self.update(status="failed", error=f"{type(error).__name__}: {error}"[:limit])
        self.update(traceback=traceback.format_exc()[-3000:])
        print(traceback.format_exc(), file=sys.stderr)

    def append(self, name: str, item: Any, *, throttle: bool = False) -> None:
        """Append ``item`` to the list ``name`` (created if missing)."""
        self.data.setdefault(name, []).append(item)
        self.write(throttle=throttle)

    def write(self, *, throttle: bool = False) -> None:
        self._dirty = True
        if self.path is None:
            return
        now = time.monotonic()
        if throttle and now - self._last_write < self.min_interval_s:
            return
        content: Any = self.data
        if self.key is not None:
            shared = read_json(self.path)
            content = shared if isinstance(shared, dict) else {}
            content[self.key] = self.data
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(content, indent=1, default=str))
        os.replace(temporary, self.path)
        self._last_write, self._dirty = now, False

    def close(self) -> None:
        """Write what a throttled write left out."""
        if self._dirty:
            self.write()
