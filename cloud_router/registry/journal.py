"""The registry's write-ahead file: one JSON record per line under ``--data-dir``.

Every change is appended (and flushed) before the HTTP answer goes out, so a registry killed
at any moment restarts with what it acknowledged. On open the file is replayed and then
compacted: rewritten as a snapshot of the live state beside the old file and renamed over
it in one step, so the file never grows without bound and is never half written. A torn
last line (a crash mid-write) is skipped with a warning.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import IO

from cloud_router.errors import RegistryError

logger = logging.getLogger(__name__)
FILE_NAME = "registry.jsonl"


class Journal:
    def __init__(self, data_dir: str | os.PathLike):
        self.path = Path(data_dir) / FILE_NAME
        self._file: IO[str] | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RegistryError(f"cannot create data dir {self.path.parent}: {exc}") from exc

    def read(self) -> list[dict]:
        """Every intact record, oldest first."""
        if not self.path.exists():
            return []
        records = []
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise RegistryError(f"cannot read {self.path}: {exc}") from exc
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("skipping a damaged journal line",
                               extra={"path": str(self.path), "line": n})
                continue
            if isinstance(rec, dict):
                records.append(rec)
        return records

    def rewrite(self, records: list[dict]) -> None:
        """Replace the file with ``records`` atomically, then keep it open for appends."""
        tmp = self.path.with_suffix(".jsonl.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                for rec in records:
                    f.write(json.dumps(rec, separators=(",", ":")) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self.close()
            os.replace(tmp, self.path)
            self._file = open(self.path, "a", encoding="utf-8")
        except OSError as exc:
            raise RegistryError(f"cannot write {self.path}: {exc}") from exc

    def append(self, record: dict) -> None:
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        try:
            self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
            self._file.flush()
        except OSError as exc:
            raise RegistryError(f"cannot append to {self.path}: {exc}") from exc

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
