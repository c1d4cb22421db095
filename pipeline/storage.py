"""Where data lives: local paths and `s3://` (any S3-compatible store) through fsspec/s3fs.

Credentials come only from the standard places: the environment / AWS config files (read by
botocore) or `storage_options` passed by the caller. They are never logged or written anywhere.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass

import fsspec
import pyarrow.fs as pafs

SUMMARY_FILE = "_summary.json"  # leading underscore: Parquet readers skip it
GLOB_CHARACTERS = re.compile(r"[*?\[]")  # what makes fsspec's glob treat a path as a pattern


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


def under(path: str, directory: str) -> bool:
    directory = directory.rstrip("/")
    return path == directory or path.startswith(directory + "/")


def parquet_files(uri: str | list[str], storage_options: dict | None = None,
                  output: str | None = None) -> tuple[fsspec.AbstractFileSystem, list[Shard]]:  # fmt: skip
    """Every Parquet file named by a path, directory, glob or list of them; a clear error when none.

    Like pyarrow's dataset discovery, files and folders whose names start with _ or . (markers,
    summaries, staging) are not data. `output`: the job's output, whose results are never input (an
    output folder inside the input folder is left out of it; an input inside the output is an error)."""
    uris = [uri] if isinstance(uri, str) else list(uri)
    if not uris:
        raise FileNotFoundError("no input given: pass --input with a Parquet file, directory, glob or s3:// prefix")
    fs, _ = filesystem(uris[0], storage_options)
    out_fs, out_path = filesystem(output, storage_options) if output else (None, None)
    results = out_path if out_fs is not None and protocols(out_fs) == protocols(fs) else None
    shards = {}
    for u in uris:
        _, path = filesystem(u, storage_options)
        glob = bool(GLOB_CHARACTERS.search(path)) and not fs.exists(path)  # `run[1]/` that exists is a name
        root = posixpath.dirname(GLOB_CHARACTERS.split(path, maxsplit=1)[0]) if glob else path  # what it names lies below
        if results is not None and under(root, results):
            raise ValueError(f"input {u} lies inside the output {output}: results would be read back as input "
                             "(and --overwrite would delete the input); choose an output outside the input")  # fmt: skip
        if glob or fs.isdir(path):
            found = fs.glob(path, detail=True) if glob else fs.find(path, detail=True)
            matches = {p: info for p, info in found.items()
                       if p.endswith(".parquet") and info["type"] == "file" and not hidden(posixpath.relpath(p, root))
                       and not (results is not None and under(p, results))}  # fmt: skip
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


def hidden(relative_path: str) -> bool:
    """A name starting with _ or . anywhere in the path below the input root (pyarrow's rule)."""
    return any(part.startswith(("_", ".")) for part in relative_path.split("/"))
