"""Commit markers, atomic merges, clean-up of abandoned attempts and the output lease, on the local
filesystem without Ray (the same code runs against S3 in test_s3.py and under Ray in test_resume.py)."""

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import shards
from pipeline.storage import Shard
from tests.conftest import marker_files


def piece_table(ids, error=None):
    n = len(ids)
    return pa.table({"id": pa.array(ids, pa.int64()), "label": pa.array(["x"] * n),
                     "input_tokens": pa.array([2 if i % 5 == 0 else 7 for i in ids], pa.int32()),
                     "truncated": pa.array([i % 3 == 0 for i in ids]),
                     "error": pa.array(error or [None] * n, pa.string())})  # fmt: skip


def test_write_pieces_splits_a_block_by_shard_and_names_files_by_shard_only(tmp_path):
    out = tmp_path / "out"
    batch = piece_table([1, 2, 3, 4], error=[None, "bad", None, None]).append_column(
        "path", pa.array(["/in/a.parquet", "/in/b.parquet", "/in/a.parquet", "/in/a.parquet"]))  # fmt: skip
    written = shards.write_pieces(batch, str(out), None, run="r1", path_column="path", id_column="id", special_tokens=2)
    by_shard = dict(zip(written["shard"].to_pylist(), written["counts"].to_pylist()))
    # ids 1-4: input_tokens 7, 7, 7, 7; truncated: id 3; id 2 failed
    assert by_shard == {shards.shard_key("/in/a.parquet"): {"rows": 3, "tokens": 21, "truncated_rows": 1, "empty_texts": 0,
                                                            "failed_rows": 0, "null_ids": 0, "duplicate_ids": 0},
                        shards.shard_key("/in/b.parquet"): {"rows": 1, "tokens": 7, "truncated_rows": 0, "empty_texts": 0,
                                                            "failed_rows": 1, "null_ids": 0, "duplicate_ids": 0}}  # fmt: skip
    for piece in written["piece"].to_pylist():
        assert piece.startswith(str(out / "_staging" / "r1")) and "path" not in pq.read_table(piece).column_names


def commit(out: shards.Output, shard: Shard, pieces: list[str]) -> dict:
    """What the runner does, with the merge in this process (a Ray task there): each piece's
    counts as `write_pieces` gives them, then `stage_result` and the commit."""
    counts = [shards.counts_of(pq.read_table(p), "id", special_tokens=2) for p in pieces]
    staged, total = shards.stage_result(pieces, counts, lambda several: shards.merge(out.uri, None, shard.path, several, "id"))
    return out.commit(shard, pieces, staged, total, {"model": "m", "settings": {}})


def test_commit_merges_pieces_atomically_and_writes_the_marker(tmp_path):
    out = shards.Output(str(tmp_path / "out"))
    shard = Shard("/in/part-0.parquet", 123, "v1")
    pieces = []
    for i, ids in enumerate([[1, 2, 3], [4, 5, 5]]):
        pieces.append(str(tmp_path / "out" / "_staging" / "r" / f"{i}.parquet"))
        os.makedirs(os.path.dirname(pieces[-1]), exist_ok=True)
        pq.write_table(piece_table(ids, error=[None, None, "bad"] if i else None), pieces[-1])
    marker = commit(out, shard, pieces)

    written = pq.read_table(tmp_path / "out" / marker["output"])
    assert marker["output"] == shards.output_name(shard.path) and marker["output"].startswith("part-0-")
    assert written["id"].to_pylist() == [1, 2, 3, 4, 5, 5]
    # Both rows of id 5 have only the 2 special tokens; the second failed, so it is not also empty.
    assert marker["counts"] == {"rows": 6, "tokens": 2 + 7 * 4 + 2, "truncated_rows": 1, "empty_texts": 1,
                                "failed_rows": 1, "null_ids": 0, "duplicate_ids": 1}  # fmt: skip
    assert (marker["input"], marker["size"], marker["version"]) == (shard.path, 123, "v1")
    assert json.loads((tmp_path / "out" / "_manifest" / f"{marker['key']}.json").read_text()) == marker
    assert not any(os.path.exists(p) for p in pieces)
    assert [p.name for p in (tmp_path / "out").glob("*.parquet")] == [marker["output"]]  # no temporary left
    assert out.markers() == ({marker["key"]: marker}, 1)

    empty = commit(out, Shard("/in/empty.parquet", 10, "v"), [])
    assert empty["output"] is None and empty["counts"]["rows"] == 0

    # A single piece becomes the result file as it is: moved, not rewritten.
    single = stage(tmp_path / "out", [7, 7, 8], name="single.parquet")
    expected = pq.read_table(single[0])
    one = commit(out, Shard("/in/part-1.parquet", 9, "v1"), single)
    assert pq.read_table(tmp_path / "out" / one["output"]).equals(expected) and not os.path.exists(single[0])
    assert (one["counts"]["rows"], one["counts"]["tokens"], one["counts"]["duplicate_ids"]) == (3, 21, 1)


def test_result_names_are_never_patterns():
    """fsspec takes * ? [ ] as a pattern in mv, rm and glob: a result name never has them."""
    name = shards.output_name("/in/run[1]/part*?.parquet")
    assert name.startswith("part__-") and not set("*?[]") & set(name)


def stage(out_dir, ids, name="0.parquet"):
    piece = out_dir / "_staging" / "r" / name
    piece.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(piece_table(ids), piece)
    return [str(piece)]


@pytest.mark.parametrize("killed_at", ["move", "put"])
def test_a_commit_killed_over_an_older_result_leaves_the_shard_unfinished(tmp_path, monkeypatch, killed_at):
    """A changed shard's commit killed before or after its file moves into place: either way no
    marker claims the file there, so the next run deletes it (`clean`) and redoes the shard. (Were
    the new marker written before the move, a kill in between would leave the old file looking
    committed for the new input.)"""
    out_dir = tmp_path / "out"
    out = shards.Output(str(out_dir))
    old = commit(out, Shard("/in/p.parquet", 10, "v1"), stage(out_dir, [1, 2]))
    assert out.markers() == ({old["key"]: old}, 1)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(out, killed_at, killed)
    with pytest.raises(KeyboardInterrupt):
        commit(out, Shard("/in/p.parquet", 20, "v2"), stage(out_dir, [7, 8, 9]))
    monkeypatch.undo()
    assert out.markers() == ({}, 0)  # the old marker went first
    ids = pq.read_table(out_dir / old["output"])["id"].to_pylist()
    assert ids == ([1, 2] if killed_at == "move" else [7, 8, 9])
    assert out.clean({}, out.entries()) == [old["output"]] and not list(out_dir.glob("*.parquet"))


def test_an_empty_shard_replaces_an_older_result(tmp_path):
    out_dir = tmp_path / "out"
    out = shards.Output(str(out_dir))
    commit(out, Shard("/in/p.parquet", 10, "v1"), stage(out_dir, [1, 2]))
    emptied = commit(out, Shard("/in/p.parquet", 5, "v2"), [])
    assert emptied["output"] is None and not list(out_dir.glob("*.parquet"))
    assert out.markers() == ({emptied["key"]: emptied}, 1)


def test_markers_come_from_the_index_unless_their_file_changed(tmp_path):
    """`write_index` records the markers with the stamps of their files as this process read or
    wrote them; a later run (another Output: no shared state) takes each marker whose file still
    has that stamp from the index and fetches the rest. The listing says which exist."""
    out_dir = tmp_path / "out"
    out = shards.Output(str(out_dir))
    for i in range(3):
        commit(out, Shard(f"/in/p{i}.parquet", 10, "v1"), stage(out_dir, [i, i + 10]))
    later_run = lambda: shards.Output(str(out_dir)).markers()  # noqa: E731
    markers, fetched = later_run()
    assert markers == marker_files(out_dir) and fetched == 3  # no index yet
    out.write_index(markers)  # the stamps of its own writes
    assert later_run() == (marker_files(out_dir), 0)

    # A later run rewrites p0's marker and stops before writing the index; p3 is new; p1's marker is deleted.
    commit(shards.Output(str(out_dir)), Shard("/in/p0.parquet", 20, "v2"), stage(out_dir, [7, 8, 9]))
    commit(shards.Output(str(out_dir)), Shard("/in/p3.parquet", 10, "v1"), [])
    (out_dir / "_manifest" / f"{shards.shard_key('/in/p1.parquet')}.json").unlink()
    reader = shards.Output(str(out_dir))
    markers, fetched = reader.markers()
    assert markers == marker_files(out_dir) and fetched == 2 and len(markers) == 3
    assert markers[shards.shard_key("/in/p0.parquet")]["size"] == 20
    reader.write_index(markers)  # the stamps it read: two listed and fetched, one from the index
    assert later_run() == (marker_files(out_dir), 0)

    # Replaced by hand with the same size and the old mtime kept (`cp -p`): another file, so fetched.
    p2 = out_dir / "_manifest" / f"{shards.shard_key('/in/p2.parquet')}.json"
    copy = p2.with_suffix(".copy")
    copy.write_text(p2.read_text().replace('"v1"', '"v9"'))
    os.utime(copy, ns=(p2.stat().st_atime_ns, p2.stat().st_mtime_ns))
    copy.replace(p2)
    markers, fetched = later_run()
    assert markers == marker_files(out_dir) and fetched == 1 and markers[shards.shard_key("/in/p2.parquet")]["version"] == "v9"


def test_an_index_never_pairs_a_marker_with_a_later_rewrite_of_its_file(tmp_path):
    """Job A lost its lease (stalled past its expiry) and job B took over and rewrote a marker
    after A's commit: A's index still holds A's marker with A's stamp, which B's file does not
    have, so the next run fetches B's. (A stamp from a listing taken when A writes the index
    would pair A's marker with B's file.)"""
    out_dir = tmp_path / "out"
    job_a, job_b = shards.Output(str(out_dir)), shards.Output(str(out_dir))
    a = commit(job_a, Shard("/in/p.parquet", 10, "v1"), stage(out_dir, [1, 2]))
    b = commit(job_b, Shard("/in/p.parquet", 10, "v2"), stage(out_dir, [1, 2]))
    job_a.write_index({a["key"]: a})
    assert shards.Output(str(out_dir)).markers() == ({b["key"]: b}, 1)


def test_a_damaged_index_is_only_a_cache_miss(tmp_path):
    out_dir = tmp_path / "out"
    out = shards.Output(str(out_dir))
    for i in range(2):
        commit(out, Shard(f"/in/p{i}.parquet", 10, "v1"), [])
    markers, _ = out.markers()
    out.write_index(markers)
    index = out_dir / "_manifest" / shards.INDEX
    table = pa.ipc.open_file(index.read_bytes()).read_all()
    for damaged in (b"not arrow", pa.table({"file": table["file"], "stamp": table["stamp"], "marker": ["{", "[]"]})):
        if isinstance(damaged, pa.Table):  # parses as Arrow, but its markers do not as markers
            sink = pa.BufferOutputStream()
            with pa.ipc.new_file(sink, damaged.schema) as writer:
                writer.write_table(damaged)
            damaged = sink.getvalue().to_pybytes()
        index.write_bytes(damaged)
        assert shards.Output(str(out_dir)).markers() == (marker_files(out_dir), 2)


def test_remove_all_deletes_what_is_there_and_reports_other_errors(tmp_path):
    files = [tmp_path / f"{i}.json" for i in range(40)]
    for f in files[:30]:
        f.write_text("{}")
    out = shards.Output(str(tmp_path))
    out.remove_all([str(f) for f in files])  # 10 of them were never there
    assert not list(tmp_path.glob("*.json"))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "x").write_text("")
    with pytest.raises(OSError):
        out.remove_all([str(tmp_path / "folder")])  # not a file: a real error, not swallowed


def test_clean_deletes_abandoned_results_and_staging_only(tmp_path):
    out = shards.Output(str(tmp_path / "out"))
    kept = commit(out, Shard("/in/a.parquet", 1, "v"), [])
    (tmp_path / "out" / "done.parquet").write_bytes(b"committed")
    kept["output"] = "done.parquet"
    (tmp_path / "out" / "b-0123.parquet").write_bytes(b"written by a killed attempt, no marker")
    (tmp_path / "out" / "_staging" / "run" / "k").mkdir(parents=True)
    (tmp_path / "out" / "_staging" / "run" / "k" / "p.parquet").write_bytes(b"piece")
    assert out.clean({kept["key"]: kept}, out.entries()) == ["b-0123.parquet"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["_manifest", "done.parquet"]


def test_foreign_output_is_refused_and_kept(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "theirs.csv").write_text("a,b")
    with pytest.raises(FileExistsError, match=r"already holds results \(1 entries, e.g. 'theirs.csv'\).*--overwrite"):
        shards.Output(str(tmp_path / "out")).check_ours(overwrite=False)
    assert (tmp_path / "out" / "theirs.csv").read_text() == "a,b"
    shards.Output(str(tmp_path / "out")).check_ours(overwrite=True)
    shards.Output(str(tmp_path / "new")).check_ours(overwrite=False)  # nothing there yet
    (tmp_path / "out" / "_manifest").write_text("theirs too")  # a file so named does not make the folder ours
    with pytest.raises(FileExistsError, match="already holds results"):
        shards.Output(str(tmp_path / "out")).check_ours(overwrite=False)
    (tmp_path / "out" / "_manifest").unlink()
    (tmp_path / "out" / "_manifest").mkdir()  # ours: not listed (an output may hold many results)
    shards.Output(str(tmp_path / "out")).check_ours(overwrite=False)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lease_refuses_a_second_job_and_is_released(tmp_path):
    out = shards.Output(str(tmp_path / "out"))
    with shards.Lease(out) as first:
        held = json.loads((tmp_path / "out" / "_lock.json").read_text())
        assert held["run"] == first.run and held["pid"] == os.getpid()
        with pytest.raises(shards.OutputLocked, match=rf"is being written by run {first.run} .*pid {os.getpid()}.*wait for it"):
            shards.Lease(out).__enter__()
        assert [p.name for p in (tmp_path / "out").iterdir()] == ["_lock.json"]  # written aside, linked whole, aside removed
        first.check()  # still ours
    assert not (tmp_path / "out" / "_lock.json").exists()


def test_lease_without_hard_links_is_created_exclusively(tmp_path, monkeypatch):
    """FAT, some network and FUSE mounts have no hard links: the lease is then opened with O_EXCL."""

    def no_links(source, target):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(shards.os, "link", no_links)
    out = shards.Output(str(tmp_path / "out"))
    with shards.Lease(out) as first:
        assert json.loads((tmp_path / "out" / "_lock.json").read_text())["run"] == first.run
        assert [p.name for p in (tmp_path / "out").iterdir()] == ["_lock.json"]
        with pytest.raises(shards.OutputLocked, match=f"is being written by run {first.run}"):
            shards.Lease(out).__enter__()
    assert not (tmp_path / "out" / "_lock.json").exists()


@pytest.mark.parametrize("lease", [{"pid": "dead", "expires": 4e9}, {"pid": 1, "host": "elsewhere", "expires": 1.0}])
def test_lease_of_a_dead_holder_is_taken_over(tmp_path, lease):
    """A holder on this host whose process is gone, or any holder whose lease expired."""
    (tmp_path / "out").mkdir()
    stale = {"run": "old", "host": lease.get("host", shards.socket.gethostname()),
             "pid": dead_pid() if lease["pid"] == "dead" else lease["pid"], "expires": lease["expires"]}  # fmt: skip
    (tmp_path / "out" / "_lock.json").write_text(json.dumps(stale))
    with shards.Lease(shards.Output(str(tmp_path / "out"))) as taken:
        assert json.loads((tmp_path / "out" / "_lock.json").read_text())["run"] == taken.run


def test_a_holder_that_lost_its_lease_stops(tmp_path, monkeypatch):
    monkeypatch.setattr(shards.Lease, "TTL", 0.2)  # renew every 50 ms
    out = shards.Output(str(tmp_path / "out"))
    with shards.Lease(out) as lease:
        # Written until seen: a renewal that read the lease just before this write puts ours back.
        for _ in range(50):
            out.put(out.join(shards.LOCK), json.dumps({"run": "other", "host": "h", "pid": 1, "expires": 4e9}).encode())
            if lease.lost.wait(0.2):
                break
        with pytest.raises(shards.OutputLocked, match="another job took over the lease"):
            lease.check()
    assert json.loads((tmp_path / "out" / "_lock.json").read_text())["run"] == "other"  # not ours to delete


def test_model_digest_sees_any_changed_file(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 100)
    before = shards.model_digest(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 99 + b"\1")
    assert shards.model_digest(str(tmp_path)) != before
