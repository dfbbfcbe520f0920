"""File hashes remembered by (path, inode, size, modification time), as DVC's state database does: an input the
login node verifies for every stage (a 70B model is ~140 GB) is read once, not once per stage and rerun.

The table lives outside the project (`ALIGN_HASH_CACHE`, default `$XDG_CACHE_HOME/self-align/hashes.sqlite`), keyed
by absolute path, so every checkout and experiment of a user shares it. Any SQLite trouble (a locked or
unwritable file) falls back to hashing. `python -m align.lineage` never reads it: it re-hashes everything.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Callable

TIMEOUT_S = 10.0


def cache_file() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "self-align" / "hashes.sqlite"
    return Path(os.environ.get("ALIGN_HASH_CACHE") or default)


def _connect() -> sqlite3.Connection:
    path = cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=TIMEOUT_S)
    db.execute("create table if not exists hashes (path text primary key, inode integer, size integer, "
               "mtime_ns integer, digest text)")
    return db


def remembered(path: Path, compute: Callable[[Path], str]) -> str:
    """`compute(path)`, or what it gave last time for this file where its inode, size and mtime are unchanged."""
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    try:
        db = _connect()
    except sqlite3.Error:
        return compute(path)
    try:
        try:
            row = db.execute("select digest from hashes where path = ? and inode = ? and size = ? and mtime_ns = ?",
                             key).fetchone()
        except sqlite3.Error:
            return compute(path)
        if row:
            return row[0]
        value = compute(path)
        try:
            with db:
                db.execute("insert or replace into hashes values (?, ?, ?, ?, ?)", (*key, value))
        except sqlite3.Error:
            pass  # a busy or read-only table: the next run hashes again
        return value
    finally:
        db.close()
