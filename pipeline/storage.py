"""Where data lives: local paths and `s3://` (any S3-compatible store) through fsspec/s3fs.

Credentials come only from the standard places: the environment / AWS config files (read by
botocore) or `storage_options` passed by the caller. They are never logged or written anywhere.
"""

from __future__ import annotations

import json
import posixpath

import fsspec
import pyarrow.fs as pafs

SUMMARY_FILE = "_summary.json"  # leading underscore: Parquet readers skip it


def filesystem(uri: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path without scheme) for a local path or URL such as s3://bucket/prefix.

    storage_options go to the fsspec implementation, e.g. for S3
    `{"endpoint_url": "http://127.0.0.1:9000", "key": ..., "secret": ...}`."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    return fs, path


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pafs.FileSystem:
    """The same filesystem as pyarrow (and so Ray Data) takes it."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols:
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def parquet_files(uri: str | list[str], storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """Every Parquet file named by a path, directory, glob or list of them; a clear error when none."""
    uris = [uri] if isinstance(uri, str) else list(uri)
    if not uris:
        raise FileNotFoundError("no input given: pass --input with a Parquet file, directory, glob or s3:// prefix")
    fs, _ = filesystem(uris[0], storage_options)
    files = []
    for u in uris:
        _, path = filesystem(u, storage_options)
        if any(ch in path for ch in "*?[") or fs.isdir(path):
            # Like pyarrow's dataset discovery: files starting with _ or . (markers, summaries) are not data.
            found = fs.glob(path) if any(ch in path for ch in "*?[") else fs.find(path)
            matches = [p for p in found if p.endswith(".parquet") and not posixpath.basename(p).startswith(("_", "."))]
        elif fs.exists(path):
            matches = [path]
        else:
            raise FileNotFoundError(f"input {u} does not exist")
        if not matches:
            raise FileNotFoundError(f"input {u} holds no .parquet files")
        files += sorted(matches)
    return fs, files


def prepare_output(uri: str, overwrite: bool, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Refuse to mix results with an earlier run's: an output holding files needs --overwrite."""
    fs, path = filesystem(uri, storage_options)
    if fs.exists(path) and (not fs.isdir(path) or fs.ls(path)):
        if not overwrite:
            raise FileExistsError(f"output {uri} already holds results; choose a new --output or pass --overwrite to replace them")
        fs.rm(path, recursive=True)
    fs.makedirs(path, exist_ok=True)
    return fs, path


def write_summary(fs: fsspec.AbstractFileSystem, path: str, summary: dict) -> None:
    with fs.open(posixpath.join(path, SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=2)
