"""Exactly once, resumable and incremental: one output file and one commit marker per input shard.

An output (a local directory or an s3:// prefix) holds:

    <input stem>-<key>.parquet    the results of one input shard (key: sha1 of the input path)
    _manifest/<key>.json          its commit marker: the input's path, size and version, the job's
                                  fingerprint (model files and settings) and the shard's counts
    _manifest/_index.arrow        a cache of the markers, each with its file's stamp: a run reads
                                  them in one GET and fetches only those whose file differs
                                  (`Output.markers`, `Output.write_index`)
    _staging/...                  pieces of shards in flight, and merged files before their commit
                                  (Parquet readers skip `_` paths)
    _lock.json                    the lease of the job writing this output
    _summary.json                 the report of the last successful run

Inference writes each block's results as a piece under _staging and tells the driver; once the
driver has heard of every row of a shard (row counts come from the Parquet footers), a Ray task
merges its pieces into a temporary file under _staging (`merge`; a single piece is that file
already), and the driver commits it (`Output.commit`): it deletes the shard's
old marker, if any, moves the file into place (atomic: a rename locally, a server-side copy on
S3; it replaces an older result of the same shard whole), then writes the new marker. A marker
therefore always describes the file beside it, and a result file without one is an attempt that
did not finish (the next run deletes it, `Output.clean`). So:

- a reader sees whole files only, each one a shard's: rows of an unfinished shard or of an
  abandoned attempt are never mixed into a file; a job killed mid-commit leaves a shard without a
  marker, and the next run redoes it (also when the old marker's shard had since changed: with the
  marker written before the move, a kill in between left the old file looking committed);
- rerunning the same command (after a killed driver, a lost node, a storage outage) skips shards
  whose marker matches and redoes the rest: finished shards are reused, in-flight ones recomputed;
- a scheduled rerun processes only new or changed shards (size or version differ), and a marker
  from another model or other settings makes the job refuse instead of mixing results.

Why not Ray Data's checkpointing (`ray.data.checkpoint.CheckpointConfig`, beta in Ray 2.60), which
we evaluated: it records the row ids written, not input shards, so a rewritten shard whose ids did
not change (always so for derived ids: file path + row number) would be skipped, and its old rows
could not be replaced because its output files mix shards; it writes data files in place, so a
reader can see a half-written local file; and the id column must keep one name from read to write,
which our derived id does not. Adding those guarantees on top of it would take more code than this.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.storage import Shard

MANIFEST, STAGING, LOCK = "_manifest", "_staging", "_lock.json"
# In MANIFEST, beside the markers. Arrow, not Parquet: a reader globbing OUTPUT/**/*.parquet must
# not take it for results.
INDEX = "_index.arrow"
REMOVE_THREADS = 32  # deletes in flight at once (`Output.remove_all`)
# A shard's counts, in its marker (a run's summary adds them up).
COUNTS = ("rows", "tokens", "truncated_rows", "empty_texts", "failed_rows", "null_ids", "duplicate_ids")
OWN_ENTRIES = {MANIFEST, STAGING, LOCK, storage.SUMMARY_FILE}
PATTERN_CHARACTERS = re.compile(r"[*?\[\]]")  # fsspec reads them as a pattern in glob, rm and mv


class OutputLocked(RuntimeError):
    """Another job holds (or took over) the lease on this output."""


def shard_key(path: str) -> str:
    return hashlib.sha1(path.encode()).hexdigest()[:16]


def output_name(path: str) -> str:
    """The result file of an input shard: named after the input file, never after row values, with
    fsspec's pattern characters (* ? [ ]) replaced, so that every call takes the name literally."""
    stem = PATTERN_CHARACTERS.sub("_", posixpath.basename(path).removesuffix(".parquet"))
    return f"{stem}-{shard_key(path)}.parquet"


def model_digest(model_dir: str) -> str:
    """sha256 over every file of the checkpoint directory (weights, config, tokenizer)."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            digest.update(name.encode())
            with open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
    return digest.hexdigest()


def duplicate_ids(ids: pa.ChunkedArray) -> int:
    """Ids that repeat one before them (nulls are counted apart, as null_ids)."""
    return len(ids) - ids.null_count - pc.count_distinct(ids).as_py()


def failed_rows(table: pa.Table) -> int:
    """Rows whose `error` is set (their task columns are null)."""
    return table.num_rows - table["error"].null_count


class Output:
    """The output location: commit markers, atomic writes and the clean-up of abandoned attempts."""

    def __init__(self, uri: str, storage_options: dict | None = None):
        self.uri = uri
        self.fs, self.path = storage.filesystem(uri, storage_options)
        if PATTERN_CHARACTERS.search(self.path):
            raise ValueError(f"output {uri}: a path with *, ?, [ or ] is not supported; choose another name")
        self.arrow_fs = storage.arrow_filesystem(self.fs)
        self.local = storage.is_local(self.fs)
        # shard key -> the stamp of the marker file this process read (as listed before the read)
        # or wrote (as the write left it): `write_index` pairs each marker with it
        self.stamps: dict[str, str] = {}

    def join(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts)

    def entries(self) -> list[str]:
        """The output's top-level names, listed afresh: s3fs would answer from a listing it cached
        earlier, and other processes write here. A rerun lists them once, under the lease (on S3 an
        output of N shards takes N / 1,000 requests)."""
        self.fs.invalidate_cache(self.path)
        if not self.fs.exists(self.path):  # first: s3fs's `ls` of a missing prefix lists its parent
            return []
        top = self.path.rstrip("/")
        # An S3 console's folder placeholder (an empty object `out/`) lists as the folder itself.
        return [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.path, detail=False) if p.rstrip("/") != top]

    def check_ours(self, overwrite: bool) -> None:
        """Refuse to write into a location holding anything but results of this pipeline. One with
        a _manifest is ours and not listed here (it may hold many results)."""
        if self.fs.isfile(self.path):
            raise FileExistsError(f"output {self.uri} is a file; --output names a directory (or an s3:// prefix)")
        manifest = self.join(MANIFEST)
        self.fs.invalidate_cache(manifest)  # s3fs would answer from a listing cached by an earlier run
        try:  # a folder (a prefix on S3: one small request, not a listing of the markers)
            if self.fs.info(manifest)["type"] == "directory":
                return
        except FileNotFoundError:
            pass
        entries = self.entries()
        foreign = [e for e in entries if e not in OWN_ENTRIES and not e.startswith(LOCK)]  # also a lease's aside copy
        if foreign and not overwrite:
            raise FileExistsError(f"output {self.uri} already holds results ({len(foreign)} entries, e.g. {foreign[0]!r}) "
                                  "that this pipeline did not write; choose a new --output or pass --overwrite to replace them")  # fmt: skip

    def clear(self, entries: list[str]) -> None:
        """--overwrite: delete everything but the lease this job holds. `entries`: the output's listing."""
        for entry in entries:
            if entry != LOCK:
                self.fs.rm(self.join(entry), recursive=True)

    def make_parent(self, path: str) -> None:
        """A local file needs its folder made first; an object store has no folders to make."""
        if self.local:
            os.makedirs(posixpath.dirname(path), exist_ok=True)

    def put(self, path: str, data: bytes) -> str | None:
        """Atomic small write: a reader sees the old content or the new, never a part. Returns the
        written file's `stamp` (None where the store gives none)."""
        if self.local:
            self.make_parent(path)
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.replace(tmp, path)
                written = os.fstat(f.fileno())  # this file, whatever the path names by now (the rename set its ctime)
            return stamp(local_info(written))
        response = self.fs.pipe_file(path, data)  # one PUT: the object appears whole
        return stamp({"size": len(data), "ETag": (response or {}).get("ETag")})

    def remove(self, path: str) -> None:
        """Delete a file if it is there, in one request (no existence check first). `rm_file`, not
        `rm`: s3fs's `rm` is a quiet bulk delete that reports no error, and the commit order relies
        on this delete having happened."""
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass

    def remove_all(self, paths: list[str]) -> None:
        """`remove` each path, 32 at a time: on S3 each is a request, and --prune may delete
        thousands. (Not s3fs's bulk `rm`, which reports no error.)"""
        with ThreadPoolExecutor(REMOVE_THREADS) as pool:
            list(pool.map(self.remove, paths))

    def move(self, source: str, target: str) -> None:
        """The commit point of a result file: it appears whole, replacing an older one whole. Locally
        a rename; on an object store a server-side copy (atomic per object), then the source goes."""
        if self.local:
            os.replace(source, target)
        else:
            self.fs.cp_file(source, target)
            self.fs.rm_file(source)

    def markers(self) -> tuple[dict[str, dict], int]:
        """(commit markers by shard key, how many were fetched one by one). The listing says which
        markers exist; each one whose file has the stamp the index recorded (`write_index`) comes
        from the index, read in one GET, and the others (new since, rewritten by a run that stopped
        before writing the index, edited by hand) are fetched, one concurrent GET each."""
        self.fs.invalidate_cache(self.join(MANIFEST))  # s3fs keeps listings: another process may have written since
        listed = self.fs.glob(self.join(MANIFEST, "*.json"), detail=True)  # {path: info}
        indexed = self.read_index()
        markers, fetch = {}, {}
        for path, info in listed.items():
            known = stamp(info)
            recorded, marker = indexed.get(posixpath.basename(path), (None, None))
            if known is not None and recorded == known:
                markers[marker["key"]] = marker
                self.stamps[marker["key"]] = known
            else:
                fetch[path] = known
        contents = self.fs.cat(list(fetch)) if fetch else {}  # one concurrent request per marker on S3
        for path, content in contents.items():
            try:
                marker = json.loads(content)
                markers[marker["key"]] = marker
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"commit marker {path} is damaged (not this pipeline's JSON); delete it and rerun: its "
                                 "shard is then redone, and its result file, which no marker names then, deleted") from None  # fmt: skip
            # Listed before the read: a file rewritten in between has a newer stamp, so is fetched again.
            if fetch.get(path) is not None:
                self.stamps[marker["key"]] = fetch[path]
        return markers, len(fetch)

    def read_index(self) -> dict[str, tuple[str, dict]]:
        """{marker file name: (stamp, marker)} from the index; {} if there is none or it does not
        parse (it is only a cache: every marker is fetched then). A storage error is raised."""
        try:
            data = self.fs.cat_file(self.join(MANIFEST, INDEX))
        except FileNotFoundError:
            return {}
        try:
            table = pa.ipc.open_file(pa.py_buffer(data)).read_all()
            index = {}
            for name, recorded, text in zip(*(table[c].to_pylist() for c in ("file", "stamp", "marker"))):
                marker = json.loads(text)
                if not isinstance(marker.get("key"), str):
                    raise ValueError(f"{name}: no key")
                index[name] = (recorded, marker)
            return index
        except (pa.ArrowException, KeyError, ValueError, TypeError, AttributeError):
            return {}

    def write_index(self, markers: dict[str, dict]) -> None:
        """Write the index: `markers` (by shard key, as their files hold them: read or written by
        this process) with the stamps of those files as this process read or wrote them (`stamps`),
        so that the next run reads them in one GET. A stamp comes with its content, not from a
        later listing: a marker rewritten since by another job (one that took over the lease)
        has another stamp and is fetched. Markers without a stamp are left out."""
        rows = [(f"{key}.json", self.stamps[key], json.dumps(m)) for key, m in markers.items() if self.stamps.get(key)]
        if not rows:
            return
        table = pa.table(dict(zip(("file", "stamp", "marker"), map(list, zip(*rows)))), schema=INDEX_SCHEMA)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, INDEX_SCHEMA, options=pa.ipc.IpcWriteOptions(compression="zstd")) as writer:
            writer.write_table(table)  # zstd: the markers' shared fields (model, settings) compress well
        self.put(self.join(MANIFEST, INDEX), sink.getvalue().to_pybytes())

    def clean(self, markers: dict[str, dict], entries: list[str]) -> list[str]:
        """Delete result files no marker names (left by another pipeline version or a run whose
        marker was replaced) and all staged pieces. `entries`: the output's listing."""
        committed = {m["output"] for m in markers.values()}
        abandoned = [e for e in entries if e.endswith(".parquet") and e not in committed]
        for name in abandoned:
            self.fs.rm(self.join(name))
        self.drop_staging(entries)
        return abandoned

    def drop_staging(self, entries: list[str] | None = None) -> None:
        """Delete the staged pieces; `entries`: the output's listing when the caller has it, else
        one small request finds out (not a listing of the whole output)."""
        staging = self.join(STAGING)
        if entries is None:
            self.fs.invalidate_cache(staging)  # workers wrote there: s3fs's cached listings do not know
            present = self.fs.exists(staging)
        else:
            present = STAGING in entries
        if present:
            self.fs.rm(staging, recursive=True)

    def commit(self, shard: Shard, pieces: list[str], staged: str | None, counts: dict, marker: dict) -> dict:
        """Put a shard's result file (`staged`, from `merge`; None for an empty shard) in place
        atomically, then write its marker (the order: module docstring). An empty shard has no
        result file: an older one of the same shard is deleted. Deletes the pieces that are left.
        Returns the marker with the shard's counts."""
        name = output_name(shard.path)
        marker = {**marker, "key": shard_key(shard.path), "input": shard.path, "size": shard.size,
                  "version": shard.version, "output": name if staged else None, "counts": counts,
                  "committed_at": time.time()}  # fmt: skip
        marker_path = self.join(MANIFEST, f"{marker['key']}.json")
        self.remove(marker_path)  # an older result of this shard counts as unfinished from here on
        if staged:
            self.move(staged, self.join(name))
        else:
            self.remove(self.join(name))
        written = self.put(marker_path, json.dumps(marker, indent=1).encode())  # the commit point
        if written is not None:
            self.stamps[marker["key"]] = written
        if leftover := [p for p in pieces if p != staged]:
            self.fs.rm(leftover)
        return marker


INDEX_SCHEMA = pa.schema([("file", pa.string()), ("stamp", pa.string()), ("marker", pa.string())])


def stamp(info: dict) -> str | None:
    """What tells a marker file's content from any other, from its listing (`fs.glob(detail=True)`)
    or its write: on S3 its size and ETag (a PUT of other content gets another); locally its size,
    inode, ctime and mtime (every write is a new file renamed into place, so a new inode, and no
    one can set a ctime back). None where neither is known: such a marker is always fetched."""
    if info.get("ETag"):
        return f"{info['size']}:{info['ETag']}"
    if info.get("ino") is not None and info.get("created") is not None:
        return f"{info['size']}:{info['ino']}:{info['created']}:{info.get('mtime')}"
    return None


def local_info(st: os.stat_result) -> dict:
    """The fields of fsspec's local listing that `stamp` reads (`created`: the birth time where the
    OS gives one, else the ctime, as fsspec takes it)."""
    return {"size": st.st_size, "ino": st.st_ino, "created": getattr(st, "st_birthtime", st.st_ctime), "mtime": st.st_mtime}


def counts_of(table: pa.Table, id_column: str, special_tokens: int) -> dict:
    """A results table's counts (the marker's `counts`; duplicate ids within the table)."""
    # A failed row was tokenized as an empty text: it counts as failed, not as empty.
    empty = pc.and_(pc.less_equal(table["input_tokens"], special_tokens), pc.is_null(table["error"]))
    return {"rows": table.num_rows, "tokens": pc.sum(table["input_tokens"]).as_py() or 0,
            "truncated_rows": pc.sum(table["truncated"]).as_py() or 0, "empty_texts": pc.sum(empty).as_py() or 0,
            "failed_rows": failed_rows(table), "null_ids": table[id_column].null_count,
            "duplicate_ids": duplicate_ids(table[id_column])}  # fmt: skip


def merge(output: str, storage_options: dict | None, shard_path: str, pieces: list[str], id_column: str) -> tuple[str, int]:
    """Several pieces of a shard streamed into one staged result file (one piece in memory at a
    time): (its path, the shard's duplicate ids, which repeat across pieces too; the other counts
    are the pieces' summed, from `write_pieces`). The runner runs it as a Ray task, so that results
    never pass through the driver; a shard of one piece needs none (the piece is its result file)."""
    out = Output(output, storage_options)
    target = out.join(STAGING, f"{output_name(shard_path)}.{uuid.uuid4().hex}.tmp")
    out.make_parent(target)
    ids, writer = [], None
    try:
        for piece in pieces:
            table = pq.read_table(piece, filesystem=out.arrow_fs)
            writer = writer or pq.ParquetWriter(target, table.schema, filesystem=out.arrow_fs)
            writer.write_table(table)
            ids.append(table[id_column])
    finally:  # also on an error: an open writer holds a file handle (on S3, an upload)
        if writer is not None:
            writer.close()
    return target, duplicate_ids(pa.chunked_array(ids))


def stage_result(pieces: list[str], counts: list[dict], merge) -> tuple[str | None, dict]:
    """A shard's staged result file and counts, from its pieces and their counts (`write_pieces`):
    several pieces are merged by `merge(pieces) -> (staged file, duplicate ids)` (`merge`, run as
    a Ray task by the runner), one piece is the result file as it is, an empty shard has none."""
    total = {k: sum(c[k] for c in counts) for k in COUNTS}
    staged = pieces[0] if pieces else None
    if len(pieces) > 1:
        staged, total["duplicate_ids"] = merge(pieces)  # they may repeat across pieces too
    return staged, total


def write_pieces(batch: pa.Table, output: str, storage_options: dict | None, run: str, path_column: str,
                 id_column: str, special_tokens: int) -> pa.Table:  # fmt: skip
    """Stage: writes a block's results as one piece per input shard under _staging; returns only
    what the driver needs to commit shards: (shard, piece, counts: `counts_of` the piece)."""
    out = Output(output, storage_options)
    rows = []
    paths = batch[path_column]
    for path in pc.unique(paths).to_pylist():
        part = batch.filter(pc.equal(paths, path)).drop_columns([path_column])
        piece = out.join(STAGING, run, shard_key(path), f"{uuid.uuid4().hex}.parquet")
        out.make_parent(piece)
        pq.write_table(part, piece, filesystem=out.arrow_fs)
        rows.append({"shard": shard_key(path), "piece": piece, "counts": counts_of(part, id_column, special_tokens)})
    return pa.Table.from_pylist(rows, schema=PIECES)


PIECES = pa.schema([("shard", pa.string()), ("piece", pa.string()), ("counts", pa.struct([(k, pa.int64()) for k in COUNTS]))])


class Lease:
    """OUTPUT/_lock.json: one job writes an output at a time.

    Created exclusively (a hard link locally, If-None-Match on S3) and renewed by a thread every TTL/4.
    A lease whose holder stopped renewing for TTL seconds, or whose process is gone (same host), is
    taken over. A holder that finds its lease taken stops before its next commit; since commits
    are atomic and per shard, two writers never interleave rows within a file."""

    TTL = 120.0
    held: set[str] = set()  # runs of this process holding a lease now

    def __init__(self, output: Output):
        self.output, self.path = output, output.join(LOCK)
        self.holder = {"run": uuid.uuid4().hex[:12], "host": socket.gethostname(), "pid": os.getpid()}
        self.lost, self.stopped = threading.Event(), threading.Event()

    @property
    def run(self) -> str:
        return self.holder["run"]

    def body(self) -> bytes:
        return json.dumps({**self.holder, "expires": time.time() + self.TTL}).encode()

    def create(self) -> bool:
        try:
            if self.output.local:
                self.output.fs.makedirs(self.output.path, exist_ok=True)
                self.create_local()
            else:
                self.output.fs.pipe_file(self.path, self.body(), mode="create")
            return True
        except FileExistsError:
            return False

    def create_local(self) -> None:
        """Written aside, then hard-linked into place: the lease appears whole, and only if absent.
        (Opened with O_EXCL and then written, a reader could find it empty and take it as stale.)
        Where the filesystem has no hard links (FAT, some network and FUSE mounts), O_EXCL it is.
        A process killed between the two steps leaves its few-byte aside copy, which nothing reads."""
        aside = f"{self.path}.{self.run}.tmp"
        with open(aside, "wb") as f:
            f.write(self.body())
        try:
            os.link(aside, self.path)
        except FileExistsError:
            raise
        except OSError:  # no hard links here
            with open(self.path, "xb") as f:
                f.write(self.body())
        finally:
            os.unlink(aside)

    def read(self) -> dict | None:
        try:
            return json.loads(self.output.fs.cat_file(self.path) or b"{}")
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:
            return {}  # damaged (its creator never leaves it half-written): treated as expired

    def stale(self, lease: dict) -> bool:
        if lease.get("expires", 0) < time.time():
            return True
        if lease.get("host") == self.holder["host"] and lease.get("pid") == os.getpid():
            return lease.get("run") not in Lease.held  # ours, from a run that ended without releasing it
        if lease.get("host") == self.holder["host"]:
            try:
                os.kill(lease["pid"], 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                pass
        return False

    def __enter__(self) -> "Lease":
        for _ in range(3):
            if self.create():
                Lease.held.add(self.run)
                threading.Thread(target=self.renew, daemon=True).start()
                return self
            current = self.read()
            if current is not None and not self.stale(current):
                until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(current["expires"]))
                raise OutputLocked(f"output {self.output.uri} is being written by run {current['run']} "
                                   f"(host {current['host']}, pid {current['pid']}); wait for it to finish. If that "
                                   f"job died, its lease expires at {until} and a rerun then takes over")  # fmt: skip
            if current is not None:
                self.output.fs.rm(self.path)
        raise OutputLocked(f"output {self.output.uri}: could not take the lease {self.path}; another job keeps taking it")

    def renew(self) -> None:
        while not self.stopped.wait(self.TTL / 4):
            try:
                if (self.read() or {}).get("run") != self.run:
                    self.lost.set()
                    return
                # A read retried through a storage outage can outlast the run: once it has released
                # the lease, writing it again would lock out the rerun that took it over since.
                if self.stopped.is_set():
                    return
                self.output.put(self.path, self.body())
            except Exception:  # noqa: BLE001 - storage unreachable for now (OSError, botocore's errors...): retry
                continue

    def check(self) -> None:
        if self.lost.is_set():
            raise OutputLocked(f"output {self.output.uri}: another job took over the lease of run {self.run}; stopped")

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        Lease.held.discard(self.run)
        try:
            if (self.read() or {}).get("run") == self.run:
                self.output.fs.rm(self.path)
        except Exception:  # noqa: BLE001 - storage unreachable: the lease expires (or its pid is seen gone)
            if not any(exc):
                raise
