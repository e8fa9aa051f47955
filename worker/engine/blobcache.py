"""A persistent record of where blobs live, so a later copy mounts instead of uploading again.

Like containers/image's blob info cache: every blob Ferry reads from or
writes to a registry repository is recorded; a copy into the same registry
later tries a cross-repository mount from those repositories first. A stale
entry costs one refused mount (the registry checks), never a wrong result.
The Celery workers use a Redis-backed map instead (shared across machines).
"""

from __future__ import annotations

import atexit
import os
import sqlite3
import threading
import time
from pathlib import Path

#: repositories remembered per (registry, digest); the newest win
MAX_PER_DIGEST = 8


def default_cache_path() -> Path:
    base = os.environ.get("FERRY_CACHE_DIR")
    if base:
        return Path(base) / "blob-locations.sqlite"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "ferry" / "blob-locations.sqlite"


#: writes are kept in memory and written in one transaction per this many (and at exit)
FLUSH_EVERY = 512


class SqliteBlobLocations:
    """The cache in SQLite. Writes are batched: a sync of 1000 images records some 4000 locations, and a
    transaction each (with an fsync each) cost more than the copies. Pending entries are answered from
    memory; they are written every ``FLUSH_EVERY`` entries, on ``close`` and at exit. A crash loses at most
    those: a cache entry less costs one upload a mount would have saved, never a wrong result."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or default_cache_path()
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._pending: dict[tuple[str, str, str], float] = {}
        self._pending_memo: dict[tuple[str, str, str], str] = {}
        atexit.register(self.close)

    def _conn(self) -> sqlite3.Connection | None:
        if self._db is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(str(self.path), timeout=5.0, check_same_thread=False, isolation_level=None)
                db.execute("PRAGMA journal_mode=WAL")
                # a cache: no fsync per transaction (WAL keeps it consistent; a power cut may lose the last ones)
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute(
                    "CREATE TABLE IF NOT EXISTS locations (store TEXT, digest TEXT, repository TEXT, seen REAL,"
                    " PRIMARY KEY (store, digest, repository))"
                )
                db.execute(
                    "CREATE TABLE IF NOT EXISTS memo (source TEXT, digest TEXT, options TEXT, dest_digest TEXT,"
                    " PRIMARY KEY (source, digest, options))"
                )
                self._db = db
            except (OSError, sqlite3.Error):
                # a cache we cannot open only costs uploads a mount would have saved
                return None
        return self._db

    def where(self, store: str, digest: str) -> list[str]:
        with self._lock:
            pending = sorted(
                ((seen, repo) for (st, dg, repo), seen in self._pending.items() if st == store and dg == digest),
                reverse=True,
            )
            out = [repo for _seen, repo in pending]
            db = self._conn()
            if db is None:
                return out
            try:
                rows = db.execute(
                    "SELECT repository FROM locations WHERE store=? AND digest=? ORDER BY seen DESC LIMIT ?",
                    (store, digest, MAX_PER_DIGEST),
                ).fetchall()
            except sqlite3.Error:
                return out
            out += [r[0] for r in rows if r[0] not in out]
            return out[:MAX_PER_DIGEST]

    def add(self, store: str, digest: str, repository: str) -> None:
        with self._lock:
            self._pending[(store, digest, repository)] = time.time()
            if len(self._pending) + len(self._pending_memo) >= FLUSH_EVERY:
                self._flush()

    def _flush(self) -> None:
        """Write pending entries in one transaction (the lock is held)."""
        if not self._pending and not self._pending_memo:
            return
        locations, memo = self._pending, self._pending_memo
        self._pending, self._pending_memo = {}, {}
        db = self._conn()
        if db is None:
            return
        try:
            with db:  # one transaction
                db.execute("BEGIN")
                db.executemany(
                    "INSERT OR REPLACE INTO locations (store, digest, repository, seen) VALUES (?, ?, ?, ?)",
                    [(st, dg, repo, seen) for (st, dg, repo), seen in locations.items()],
                )
                db.executemany(
                    "INSERT OR REPLACE INTO memo (source, digest, options, dest_digest) VALUES (?, ?, ?, ?)",
                    [(src, dg, opts, dest) for (src, dg, opts), dest in memo.items()],
                )
        except sqlite3.Error:
            pass

    # -- sync memo: what a source digest became at the destination (conversions, platform picks) --------

    def memo_get(self, source: str, digest: str, options_key: str) -> str | None:
        with self._lock:
            pending = self._pending_memo.get((source, digest, options_key))
            if pending is not None:
                return pending
            db = self._conn()
            if db is None:
                return None
            try:
                row = db.execute(
                    "SELECT dest_digest FROM memo WHERE source=? AND digest=? AND options=?",
                    (source, digest, options_key),
                ).fetchone()
            except sqlite3.Error:
                return None
            return str(row[0]) if row else None

    def memo_put(self, source: str, digest: str, options_key: str, dest_digest: str) -> None:
        with self._lock:
            self._pending_memo[(source, digest, options_key)] = dest_digest
            if len(self._pending) + len(self._pending_memo) >= FLUSH_EVERY:
                self._flush()

    def close(self) -> None:
        with self._lock:
            self._flush()
            if self._db is not None:
                self._db.close()
                self._db = None
