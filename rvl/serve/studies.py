"""Studies the server has seen (uploads and archive studies), the LRU cache that keeps them, and request errors."""
from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import threading
from typing import Any
from urllib.parse import quote

import numpy as np


class ServiceError(Exception):
    """A request the service cannot answer; ``status`` is the HTTP status the API returns with the message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class LRUCache:
    """A thread-safe least-recently-used mapping with a fixed number of entries (0 = keep nothing)."""

    def __init__(self, capacity: int):
        self.capacity = max(0, int(capacity))
        self._items: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> Any:
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


@dataclasses.dataclass
class StudyEntry:
    """A study the server has seen: an upload or an archive study.

    ``displays`` (uint8 views, long side at most 1024: full-resolution float images are not kept, a cache of 12-bit
    radiographs would take gigabytes) and ``squares`` (model inputs) are filled on first use for archive studies;
    ``derived`` holds lazily computed arrays (patch tokens) and is shared by copies that only change patient / date.
    """

    key: str
    views: list[str]
    names: list[str]
    embedding: np.ndarray
    displays: list[np.ndarray] | None = None
    squares: list[np.ndarray] | None = None
    patient_id: str | None = None
    study_date: str | None = None
    study_id: str | None = None
    index_id: int | None = None
    used_views: list[int] = dataclasses.field(default_factory=list)
    derived: dict[str, Any] = dataclasses.field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """The study as the API shows it (image URLs instead of pixels)."""
        base = (f"/api/study/{quote(self.study_id, safe='')}" if self.study_id is not None
                else f"/api/upload/{self.key.split(':', 1)[1]}")
        return {"key": self.key, "upload_id": None if self.study_id is not None else self.key.split(":", 1)[1],
                "study_id": self.study_id, "patient_id": self.patient_id, "study_date": self.study_date,
                "views": [{"index": i, "view": v, "name": n, "image": f"{base}/image/{i}",
                           "in_study_embedding": i in self.used_views}
                          for i, (v, n) in enumerate(zip(self.views, self.names))]}


def parse_date(value: str | None, what: str) -> dt.date | None:
    if value is None or not str(value).strip():
        return None
    try:
        return dt.date.fromisoformat(str(value).strip()[:10])
    except ValueError:
        raise ServiceError(f"{what}: {value!r} is not a date (YYYY-MM-DD)") from None


def optional_text(value: Any) -> str | None:
    return None if value is None or value != value else str(value)
