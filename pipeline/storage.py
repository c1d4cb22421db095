"""Where data lives: local paths and `s3://` (any S3-compatible store) through fsspec/s3fs.

Credentials come only from the standard places: the environment / AWS config files (read by
botocore) or `storage_options` passed by the caller. They are never logged or written anywhere.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

import fsspec
import pyarrow.fs as pafs

SUMMARY_FILE = "_summary.json"  # leading underscore: Parquet readers skip it


def filesystem(uri: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path without scheme) for a local path or URL such as s3://bucket/prefix.

    storage_options go to the fsspec implementation, e.g. for S3
    `{"endpoint_url": "http://127.0.0.1:9000", "key": ..., "secret": ...}`."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    return fs, path


def protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    """The filesystem's protocols, its own name first (fsspec gives a str or a tuple)."""
    return fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in protocols(fs)


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pafs.FileSystem:
    """The same filesystem as pyarrow (and so Ray Data) takes it."""
    if is_local(fs):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


@dataclass(frozen=True)
class Shard:
    """One input Parquet file. `version` (the ETag on object stores, the mtime locally) changes
    whenever the file is rewritten; with the size it tells a changed shard from a finished one."""

    path: str  # as the filesystem names it, without the scheme
    size: int
    version: str


def parquet_files(uri: str | list[str], storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, list[Shard]]:
    """Every Parquet file named by a path, directory, glob or list of them; a clear error when none."""
    uris = [uri] if isinstance(uri, str) else list(uri)
    if not uris:
        raise FileNotFoundError("no input given: pass --input with a Parquet file, directory, glob or s3:// prefix")
    fs, _ = filesystem(uris[0], storage_options)
    shards = {}
    for u in uris:
        _, path = filesystem(u, storage_options)
        if any(ch in path for ch in "*?[") or fs.isdir(path):
            # Like pyarrow's dataset discovery: files starting with _ or . (markers, summaries) are not data.
            found = fs.glob(path, detail=True) if any(ch in path for ch in "*?[") else fs.find(path, detail=True)
            matches = {p: info for p, info in found.items()
                       if p.endswith(".parquet") and not posixpath.basename(p).startswith(("_", ".")) and info["type"] == "file"}  # fmt: skip
        elif fs.exists(path):
            matches = {path: fs.info(path)}
        else:
            raise FileNotFoundError(f"input {u} does not exist")
        if not matches:
            raise FileNotFoundError(f"input {u} holds no .parquet files")
        for p in sorted(matches):
            info = matches[p]
            shards[p] = Shard(p, int(info["size"]), str(info.get("ETag") or info.get("mtime") or info.get("LastModified")))
    return fs, list(shards.values())
