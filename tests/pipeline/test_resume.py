"""Reruns on a real local Ray: incremental runs that process only new or changed shards, refusal to
mix models or settings, the output lease, and messy input (bad files, mixed schemas, bad rows,
duplicate ids, huge texts), each with a clear outcome and no row lost."""

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline import InputError, Options, TaskOptions, run, runner, shards, storage
from pipeline.tasks import make_task
from tests.conftest import marker_files
from tests.pipeline import reference

ATOL = 1e-4


def write(directory, name, ids, texts, **columns):
    directory.mkdir(exist_ok=True)
    table = pa.table({"id": pa.array(ids, pa.int64()), "text": pa.array(texts, pa.string()), **columns})
    pq.write_table(table, directory / name)


def read(directory):
    table = pq.read_table(directory)
    return table.take(np.argsort(table["id"].to_numpy()))


@pytest.fixture
def classify(checkpoints):
    return Options(task="classify", model=str(checkpoints["classifier"]), batch_tokens=1024)


def test_reruns_process_only_new_and_changed_shards(ray_session, classify, checkpoints, reviews, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    for i in range(3):
        write(inp, f"part-{i}.parquet", range(10 * i, 10 * i + 10), reviews[10 * i : 10 * i + 10])
    first = run(str(inp), str(out), classify)
    assert (first.shards, first.shards_run, first.shards_reused, first.rows) == (3, 3, 0, 30)
    files = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    assert len(files) == 3  # one result file per input shard
    index = out / "_manifest" / shards.INDEX
    indexed_at = index.stat().st_mtime_ns

    again = run(str(inp), str(out), classify)  # nothing new: a no-op that rewrites nothing
    assert (again.shards_run, again.shards_reused, again.rows, again.rows_run) == (0, 3, 30, 0)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")} == files and index.stat().st_mtime_ns == indexed_at

    write(inp, "part-0.parquet", range(10), reviews[100:110])  # rewritten shard, same ids
    write(inp, "part-3.parquet", range(30, 40), reviews[30:40])  # new shard
    third = run(str(inp), str(out), classify)
    assert (third.shards, third.shards_run, third.shards_reused, third.rows, third.rows_run) == (4, 2, 2, 40, 20)
    table = read(out)
    assert table["id"].to_pylist() == list(range(40))  # every row exactly once
    texts = reviews[100:110] + reviews[10:40]
    logits = reference.classify(checkpoints["classifier"], texts)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(np.stack(table["probs"].to_numpy(zero_copy_only=False)), probs, atol=ATOL)
    assert json.loads((out / "_summary.json").read_text()) == third.to_dict()
    assert shards.Output(str(out)).markers() == (marker_files(out), 0)  # the third run indexed the markers it wrote
    (out / "_manifest" / shards.INDEX).unlink()  # as an output written before the index existed
    assert run(str(inp), str(out), classify).shards_run == 0  # fetches every marker, commits nothing, indexes them
    assert shards.Output(str(out)).markers() == (marker_files(out), 0)
    stat = (inp / "part-1.parquet").stat()  # rewritten in place with the same size: the version (mtime) tells
    os.utime(inp / "part-1.parquet", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert (run(str(inp), str(out), classify).shards_run, (inp / "part-1.parquet").stat().st_size) == (1, stat.st_size)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("_")) == ["_manifest", "_summary.json"]


def test_a_run_that_cannot_write_the_index_still_succeeds(ray_session, classify, reviews, tmp_path, monkeypatch):
    """The index is only a cache: failing to write it (after every commit) warns, and the job's
    results and summary stand; the next run reads the markers one by one and indexes them."""
    inp, out = tmp_path / "in", tmp_path / "out"
    write(inp, "part-0.parquet", range(4), reviews[:4])

    def storage_down(self, markers):
        raise ConnectionError("storage unreachable")  # an OSError, as s3fs raises them

    monkeypatch.setattr(shards.Output, "write_index", storage_down)
    with pytest.warns(RuntimeWarning, match=r"could not write the commit markers' index in .*out \(storage unreachable\)"):
        first = run(str(inp), str(out), classify)
    monkeypatch.undo()
    assert first.rows == 4 and json.loads((out / "_summary.json").read_text()) == first.to_dict()
    assert not (out / "_manifest" / shards.INDEX).exists()
    assert run(str(inp), str(out), classify).shards_reused == 1
    assert shards.Output(str(out)).markers() == (marker_files(out), 0)


def test_other_model_or_settings_are_refused_never_mixed(ray_session, classify, reviews, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    write(inp, "part-0.parquet", range(8), reviews[:8])
    run(str(inp), str(out), classify)
    before = read(out)

    with pytest.raises(FileExistsError, match="other settings .*never mixed. Differences: max_length: None there, 16 now.*--overwrite"):
        run(str(inp), str(out), Options(**{**classify.__dict__, "max_length": 16}))
    with pytest.raises(FileExistsError, match=r"Differences: task_options: \{.*'logits': False.*\} there, \{.*'logits': True"):
        run(str(inp), str(out), Options(**{**classify.__dict__, "task_options": TaskOptions(logits=True)}))
    model = shutil.copytree(classify.model, tmp_path / "model")
    weights = bytearray((model / "model.safetensors").read_bytes())
    weights[-1] ^= 0xFF  # a different last weight: same shapes, other model
    (model / "model.safetensors").write_bytes(bytes(weights))
    retrained = Options(**{**classify.__dict__, "model": str(model)})
    with pytest.raises(FileExistsError, match="another model .*Differences: model files: sha256"):
        run(str(inp), str(out), retrained)
    assert read(out).equals(before)  # nothing touched

    replaced = run(str(inp), str(out), retrained, overwrite=True)
    assert (replaced.shards_run, replaced.rows) == (1, 8)


def test_a_second_job_on_the_same_output_is_refused(ray_session, classify, reviews, tmp_path):
    write(tmp_path / "in", "part-0.parquet", range(4), reviews[:4])
    with shards.Lease(shards.Output(str(tmp_path / "out"))) as other:
        with pytest.raises(shards.OutputLocked, match=f"being written by run {other.run}"):
            run(str(tmp_path / "in"), str(tmp_path / "out"), classify)
    assert run(str(tmp_path / "in"), str(tmp_path / "out"), classify).rows == 4


def test_unreadable_parquet_is_named_or_skipped_then_picked_up(ray_session, classify, reviews, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    write(inp, "good.parquet", range(6), reviews[:6])
    write(inp, "truncated.parquet", range(6, 12), reviews[6:12])
    whole = (inp / "truncated.parquet").read_bytes()
    (inp / "truncated.parquet").write_bytes(whole[: len(whole) // 2])
    (inp / "garbage.parquet").write_bytes(b"this is not parquet at all")

    with pytest.raises(InputError, match=r"in/garbage.parquet: not a readable Parquet file .*2 such file\(s\).*--skip-bad-files"):
        run(str(inp), str(out), classify)
    summary = run(str(inp), str(out), classify, skip_bad_files=True)
    assert summary.rows == 6 and sorted(s["file"].rsplit("/", 1)[1] for s in summary.skipped_files) == ["garbage.parquet", "truncated.parquet"]
    assert all(s["error"] for s in summary.skipped_files)

    (inp / "truncated.parquet").write_bytes(whole)  # repaired: the next run takes it, and only it
    (inp / "garbage.parquet").unlink()
    summary = run(str(inp), str(out), classify)
    assert (summary.shards_run, summary.shards_reused, summary.rows) == (1, 1, 12)
    assert read(out)["id"].to_pylist() == list(range(12))

    (inp / "good.parquet").write_bytes(b"damaged since")  # its earlier results stay, but are not "reused"
    summary = run(str(inp), str(out), classify, skip_bad_files=True)
    assert (summary.shards_run, summary.shards_reused, summary.rows) == (0, 1, 12)
    assert [s["file"].rsplit("/", 1)[1] for s in summary.skipped_files] == ["good.parquet"]


def test_a_file_whose_data_is_damaged_is_named_not_called_a_passing_fault(ray_session, classify, reviews, tmp_path):
    """Its footer reads, so the checks before the run (and --skip-bad-files) pass it, but Ray Data's
    read fails: the driver parses the file again and names it. A file that parses is a fault to rerun."""
    import fsspec

    from pipeline.runner import damaged_file

    inp, out = tmp_path / "in", tmp_path / "out"
    write(inp, "good.parquet", range(6), reviews[:6])
    write(inp, "damaged.parquet", range(6, 12), reviews[6:12])
    data = bytearray((inp / "damaged.parquet").read_bytes())
    data[4:200] = b"\xff" * 196  # the first page headers, after the magic bytes
    (inp / "damaged.parquet").write_bytes(bytes(data))
    assert pq.ParquetFile(inp / "damaged.parquet").metadata.num_rows == 6
    with pytest.raises(InputError, match=r"in/damaged.parquet: its footer reads but its data does not \(OSError: "):
        run(str(inp), str(out), classify, skip_bad_files=True)
    healthy = OSError(f"timeout\nFailed to read fragment {inp / 'good.parquet'} after 10/10 attempts (total backoff 9.0s).")
    assert damaged_file(fsspec.filesystem("file"), healthy, ["id", "text"]) is None
    gone = OSError(f"Failed to read fragment {inp / 'gone.parquet'} after 1/10 attempts (total backoff 0.0s).")
    assert damaged_file(fsspec.filesystem("file"), gone, ["id", "text"]) is None  # vanished since: a fault, not damage


def test_mixed_schemas_name_both_files(classify, reviews, tmp_path):
    write(tmp_path / "in", "a.parquet", range(3), reviews[:3])
    pq.write_table(pa.table({"id": ["x", "y"], "text": reviews[3:5]}), tmp_path / "in" / "b.parquet")
    with pytest.raises(InputError, match=r"mixed schemas: .*in/b.parquet gives columns \{'id': DataType\(string\).*in/a.parquet gives"):
        run(str(tmp_path / "in"), str(tmp_path / "out"), classify)


def test_footers_keep_row_counts_and_one_schema_per_distinct_schema(tmp_path):
    """The driver holds every shard's footer until the run ends: its row count and a schema that
    equal ones share (metadata, which pandas writes per file, dropped), not a whole FileMetaData."""
    for i, rows in enumerate([2, 3]):
        write(tmp_path / "in", f"p{i}.parquet", range(rows), ["x"] * rows)
        table = pq.read_table(tmp_path / "in" / f"p{i}.parquet")
        pq.write_table(table.replace_schema_metadata({"written": str(i)}), tmp_path / "in" / f"p{i}.parquet")
    fs, listed = storage.parquet_files(str(tmp_path / "in"))
    footers, skipped = runner.read_footers(fs, listed, skip_bad_files=False)
    first, second = (footers[s] for s in listed)
    assert (first.num_rows, second.num_rows, skipped) == (2, 3, [])
    assert first.schema is second.schema and first.schema.equals(pq.read_schema(tmp_path / "in" / "p0.parquet"), check_metadata=False)


def test_a_new_shard_must_give_the_outputs_columns_their_types(ray_session, classify, reviews, tmp_path):
    """An output is read as one dataset: a kept column (or the id) of another type than the
    results already there hold would make it unreadable, and every later run fail."""
    inp, out = tmp_path / "in", tmp_path / "out"
    keep = Options(**{**classify.__dict__, "keep_columns": ("source:origin",)})  # renamed: the output's name is checked
    write(inp, "a.parquet", range(3), reviews[:3], source=pa.array([1.0, 2.0, 3.0]))
    run(str(inp), str(out), keep)
    write(inp, "b.parquet", range(3, 5), reviews[3:5], source=pa.array(["imdb", "rt"]))
    with pytest.raises(InputError, match=r"in/b.parquet: column 'source' has type string, but the results already in .* hold it \(as 'origin'\) as double"):
        run(str(inp), str(out), keep)
    pq.write_table(pa.table({"text": reviews[3:5], "source": [4.0, 5.0]}), inp / "b.parquet")  # no id: a derived one, uint64
    with pytest.raises(InputError, match=r"b.parquet has no id column, so its ids would be derived, but the results already .* hold the input's own ids"):
        run(str(inp), str(out), keep)
    for marker in (out / "_manifest").glob("*.json"):  # as markers written before they recorded derived_id: the types tell
        marker.write_text(json.dumps({k: v for k, v in json.loads(marker.read_text()).items() if k != "derived_id"}))
    with pytest.raises(InputError, match=r"column 'id' has type uint64 \(derived: the input has no id column\), but .* int64"):
        run(str(inp), str(out), keep)
    write(inp, "b.parquet", range(3, 5), reviews[3:5], source=pa.array([4.0, 5.0]))
    assert run(str(inp), str(out), keep).rows == 5
    assert pq.read_table(out)["origin"].type == pa.float64()

    # An empty shard's marker (no result file) records the flag of a run with nothing to derive: ignored.
    todo = {shards.Shard(str(inp / "b.parquet"), 0, "v"): runner.Footer(2, pq.read_schema(inp / "b.parquet"))}
    runner.check_results_schema(shards.Output(str(out)), [{"output": None, "derived_id": False}], todo, True, keep)
    with pytest.raises(InputError, match="has no id column, so its ids would be derived"):
        runner.check_results_schema(shards.Output(str(out)), [{"output": "a.parquet", "derived_id": False}], todo, True, keep)

    # Own ids of row_hash's type: the types agree, but the ids would mean two things.
    inp, out = tmp_path / "own", tmp_path / "own-out"
    inp.mkdir()
    pq.write_table(pa.table({"id": pa.array([1, 2], pa.uint64()), "text": reviews[:2]}), inp / "a.parquet")
    run(str(inp), str(out), classify)
    pq.write_table(pa.table({"text": reviews[2:4]}), inp / "b.parquet")
    with pytest.raises(InputError, match=r"b.parquet has no id column, so its ids would be derived, but the results already .* hold the input's own ids"):
        run(str(inp), str(out), classify)


def bad_utf8_table(ids, texts_bytes):
    return pa.table({"id": pa.array(ids, pa.int64()), "text": pa.array(texts_bytes, pa.binary()).view(pa.string())})


def test_duplicate_ids_of_a_large_output_are_counted_by_ray_data(ray_session, tmp_path, monkeypatch):
    """Past DRIVER_IDS ids, Ray Data's groupby counts them on the cluster: the count pyarrow gives
    over the whole output (nulls apart), across files and within them."""
    monkeypatch.setattr(runner, "DRIVER_IDS", 0)
    parts = [[1, 2, 2, None], [2, 3, None, 5], [5, 5]]
    markers = [{"output": None, "counts": {"rows": 0}}]  # an empty shard
    for i, ids in enumerate(parts):
        pq.write_table(pa.table({"id": pa.array(ids, pa.int64())}), tmp_path / f"r{i}.parquet")
        markers.append({"output": f"r{i}.parquet", "counts": {"rows": len(ids)}})
    every = pa.chunked_array([pa.array(ids, pa.int64()) for ids in parts])
    expected = len(every) - every.null_count - pc.count_distinct(every).as_py()
    assert runner.duplicate_ids(shards.Output(str(tmp_path)), markers, "id", "digest", new=markers) == expected == 4


def test_messy_rows_are_processed_counted_or_failed_alone(ray_session, classify, checkpoints, reviews, tmp_path):
    inp = tmp_path / "in"
    huge = "word " * 1_000_000  # 5 MB
    rows = [b"fine text", b"bad \xed\xa0\x80 surrogate bytes", "ctrl \x00\x07\x1b chars".encode(), b"   ", huge.encode(),
            "emoji \U0001f600 and \u4e2d\u6587".encode()]  # fmt: skip
    inp.mkdir()
    pq.write_table(bad_utf8_table(range(len(rows)), rows), inp / "messy.parquet")
    write(inp, "dupes.parquet", [0, 100], ["a short text", "another"])  # id 0 is also in messy.parquet
    write(inp, "empty.parquet", [], [])

    with pytest.raises(InputError, match=r"1 of 8 rows failed \(12.5% > --max-failed-fraction 0.01\)"):
        run(str(inp), str(tmp_path / "strict"), classify)

    summary = run(str(inp), str(tmp_path / "out"), classify, max_failed_fraction=0.2)
    # The failed row (tokenized as an empty text) is not also an empty text; whitespace is a token.
    assert (summary.rows, summary.failed_rows, summary.duplicate_ids, summary.truncated_rows) == (8, 1, 1, 1)
    assert summary.empty_texts == 0
    assert summary.shards == summary.shards_run == 3
    rerun = run(str(inp), str(tmp_path / "out"), classify, max_failed_fraction=0.2)  # nothing new: the same counts
    assert rerun.shards_run == 0 and (rerun.rows, rerun.duplicate_ids, rerun.empty_texts) == (8, 1, 0)
    # With nothing new, the whole-output duplicate count comes from the last summary if that covered
    # the same commit markers, else from the result files.
    last = tmp_path / "out" / "_summary.json"
    marked = {**json.loads(last.read_text()), "duplicate_ids": 99}
    for written, expected in [(marked, 99), ({**marked, "output_digest": "of other markers"}, 1), ("damaged", 1), (None, 1)]:
        last.unlink(missing_ok=True)
        if written is not None:
            last.write_text(json.dumps(written) if isinstance(written, dict) else written)
        assert run(str(inp), str(tmp_path / "out"), classify, max_failed_fraction=0.2).duplicate_ids == expected
    (messy,) = (tmp_path / "out").glob("messy-*.parquet")  # the result file of messy.parquet
    table = read(messy)
    errors = table["error"].to_pylist()
    assert errors[1].startswith("column 'text': invalid UTF-8 at byte 4") and errors.count(None) == 5
    assert table["label"][1].as_py() is None and table["probs"][1].as_py() is None  # no made-up result
    assert None not in table["label"].to_pylist()[2:]
    assert table["truncated"].to_pylist() == [False, False, False, False, True, False]
    assert table["input_tokens"][4].as_py() == 128  # the checkpoints' positions allow 128 tokens
    texts = ["fine text", "ctrl \x00\x07\x1b chars", "   ", huge[:200_000], "emoji \U0001f600 and \u4e2d\u6587"]
    logits = reference.classify(checkpoints["classifier"], texts)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    got = np.stack([p for p in table["probs"].to_numpy(zero_copy_only=False) if p is not None])
    np.testing.assert_allclose(got, probs, atol=ATOL)
    assert sorted(m["counts"]["rows"] for m in marker_files(tmp_path / "out").values()) == [0, 2, 6]  # the empty shard is committed too


def test_ids_and_values_never_choose_paths(ray_session, classify, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    pq.write_table(pa.table({"id": ["../../escape", "/etc/passwd", "a/../../b"], "text": ["x", "y", "z"],
                             "source": ["../../../tmp/x", "s3://other/bucket", "~"]}), inp / "part.parquet")  # fmt: skip
    before = {p for p in tmp_path.rglob("*")}
    run(str(inp), str(tmp_path / "out"), Options(**{**classify.__dict__, "keep_columns": ("source",)}))
    created = {p for p in tmp_path.rglob("*")} - before
    assert created and all(p.is_relative_to(tmp_path / "out") for p in created)
    assert sorted(pq.read_table(tmp_path / "out")["id"].to_pylist()) == ["../../escape", "/etc/passwd", "a/../../b"]


def test_a_marker_whose_file_is_gone_is_redone(ray_session, classify, reviews, tmp_path):
    """A result file deleted by hand (or by a version of this pipeline that wrote markers first)."""
    inp, out = tmp_path / "in", tmp_path / "out"
    for i in range(2):
        write(inp, f"part-{i}.parquet", range(5 * i, 5 * i + 5), reviews[5 * i : 5 * i + 5])
    run(str(inp), str(out), classify)
    next(out.glob("part-1-*.parquet")).unlink()
    again = run(str(inp), str(out), classify)
    assert (again.shards_run, again.shards_reused, again.rows) == (1, 1, 10)
    assert read(out)["id"].to_pylist() == list(range(10))


def test_inputs_gone_since_stay_listed_as_stale_or_are_pruned(ray_session, classify, reviews, tmp_path):
    """A renamed input is a new shard, a deleted one has no input: the results of both earlier
    names stay (listed and counted, so the renamed shard's ids show as duplicates) until --prune.
    The output lies inside the input folder here: its results are never read back as input."""
    inp = tmp_path / "in"
    out = inp / "labels"
    for i in range(3):
        write(inp, f"part-{i}.parquet", range(10 * i, 10 * i + 10), reviews[10 * i : 10 * i + 10])
    pq.write_table(bad_utf8_table(range(10, 20), [b"\xff bad"] + [r.encode() for r in reviews[11:20]]), inp / "part-1.parquet")
    assert run(str(inp), str(out), classify, max_failed_fraction=0.2).failed_rows == 1
    (inp / "part-2.parquet").rename(inp / "renamed.parquet")
    (inp / "part-1.parquet").unlink()
    gone = [str(inp / "part-1.parquet"), str(inp / "part-2.parquet")]

    kept = run(str(inp), str(out), classify)  # the deleted shard's failed row counts, but fails no later run
    assert (kept.shards, kept.shards_run, kept.shards_reused, kept.rows, kept.duplicate_ids, kept.failed_rows) == (2, 1, 1, 40, 10, 1)
    assert (kept.stale_shards, kept.pruned_shards) == (gone, [])
    before = sorted(p.name for p in out.rglob("*") if p.name != "_summary.json")
    pq.write_table(pa.table({"id": [99]}), inp / "broken.parquet")  # no text column: the input fails its checks
    with pytest.raises(InputError, match="broken.parquet"):
        run(str(inp), str(out), classify, prune=True)
    assert sorted(p.name for p in out.rglob("*") if p.name != "_summary.json") == before  # nothing pruned, as --overwrite
    (inp / "broken.parquet").unlink()
    pruned = run(str(inp), str(out), classify, prune=True)
    assert (pruned.shards_run, pruned.rows, pruned.duplicate_ids, pruned.stale_shards, pruned.pruned_shards) == (0, 20, 0, [], gone)
    assert pruned.abandoned_files == []  # deleted as pruned, not found abandoned
    assert read(out)["id"].to_pylist() == list(range(10)) + list(range(20, 30))
    assert run(str(inp), str(out), classify).stale_shards == []


def test_odd_file_and_folder_names(ray_session, classify, checkpoints, reviews, tmp_path):
    """A folder named like a Hive partition (`text=foo/`) is not a column; an input path with `[`
    that exists is a name, not a glob; a null id is counted, not taken for a duplicate; the text
    can be kept. A file whose rows Ray Data's read does not return (a `?` in its name starts a URL
    query there) is an error naming it, never a silent loss."""
    inp = tmp_path / "run[1]"
    (inp / "text=foo").mkdir(parents=True)
    write(inp / "text=foo", "p.parquet", [1, None, 3], reviews[:3])
    summary = run(str(inp), str(tmp_path / "out"), Options(**{**classify.__dict__, "keep_columns": ("text",)}))
    assert (summary.rows, summary.null_ids, summary.duplicate_ids) == (3, 1, 0)
    table = pq.read_table(tmp_path / "out")
    table = table.take(np.argsort(table["text"].to_numpy(zero_copy_only=False)))
    assert table["text"].to_pylist() == sorted(reviews[:3])
    logits = reference.classify(checkpoints["classifier"], table["text"].to_pylist())  # its own texts, not "foo"
    np.testing.assert_allclose(np.stack(table["probs"].to_numpy(zero_copy_only=False)),
                               np.exp(logits) / np.exp(logits).sum(1, keepdims=True), atol=ATOL)  # fmt: skip

    odd = tmp_path / "odd"
    write(odd, "good.parquet", [1, 2], reviews[:2])
    write(odd, "q?.parquet", [3, 4], reviews[2:4])
    with pytest.raises(InputError, match=r"other row counts than the Parquet footers give for .*/odd/q\?.parquet \(0 of 2 rows\); a file with fewer rows was not committed"):
        run(str(odd), str(tmp_path / "odd-out"), classify)
    assert pq.read_table(tmp_path / "odd-out")["id"].to_pylist() == [1, 2]  # the other file is committed


def test_what_must_be_fixed_first_fails_before_ray_starts(classify, reviews, tmp_path, monkeypatch):
    """Flags out of range, one column in two roles, an id no result can be joined on, a damaged
    checkpoint or commit marker, an output that is a file: a clear error before any data moves."""
    import ray

    from model import CheckpointError

    monkeypatch.setattr(runner, "init_ray", lambda *a, **k: pytest.fail("Ray started"))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # the shared test cluster must not count
    inp, out = tmp_path / "in", str(tmp_path / "out")
    write(inp, "part-0.parquet", range(3), reviews[:3])
    for change, message in [({"dtype": "int8"}, "--dtype 'int8'"), ({"concurrency": 0}, "--concurrency 0: must be at least 1"),
                            ({"batch_tokens": -5}, "--batch-tokens -5"), ({"id_column": "text"}, "must name different columns"),
                            ({"keep_columns": ("text:gold", "source:gold")}, "give each a different output name"),
                            ({"keep_columns": ("text:",)}, "as `name` or `name:new_name`"),
                            ({"keep_columns": ("id:row_id",)}, "the id column 'id' is written under its own name")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            run(str(inp), out, Options(**{**classify.__dict__, **change}))
    for fraction in (-1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="--max-failed-fraction .*between 0 and 1"):
            run(str(inp), out, classify, max_failed_fraction=fraction)

    clash = tmp_path / "clash"
    write(clash, "p.parquet", range(2), reviews[:2], label=pa.array(["gold", "gold"]))
    with pytest.raises(InputError, match=r"\['label'\] would be written twice: this job adds columns of those names.*"
                                         r"keep them under another name \(--keep-columns label:gold_label\)"):
        run(str(clash), out, Options(**{**classify.__dict__, "keep_columns": ("label",)}))
    with pytest.raises(InputError, match=r"\['label:id \(the name of the id column\)'\] would be written twice"):
        run(str(clash), out, Options(**{**classify.__dict__, "keep_columns": ("label:id",)}))
    schema = pa.schema([("id", pa.int64()), ("text", pa.string()), ("logits", pa.float32())])
    runner.check_schema(schema, Options(**{**classify.__dict__, "keep_columns": ("logits",)}), make_task("classify", classify.model), "x")
    with pytest.raises(InputError, match=r"\['logits'\] would be written twice"):  # only when this job writes logits
        runner.check_schema(schema, Options(**{**classify.__dict__, "keep_columns": ("logits",)}),
                            make_task("classify", classify.model, TaskOptions(logits=True)), "x")  # fmt: skip

    nested = tmp_path / "nested"
    nested.mkdir()
    pq.write_table(pa.table({"id": [[1], [2]], "text": reviews[:2]}), nested / "p.parquet")
    with pytest.raises(InputError, match=r"id column 'id' \(--id-column\) has type list<element: int64>; an id must be"):
        run(str(nested), out, classify)

    model = shutil.copytree(classify.model, tmp_path / "model")
    weights = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        run(str(inp), out, Options(**{**classify.__dict__, "model": str(model)}))

    (tmp_path / "out" / "_manifest").mkdir(parents=True)
    (tmp_path / "out" / "_manifest" / "abc.json").write_text('{"key": "abc", "inp')
    with pytest.raises(ValueError, match=r"commit marker .*_manifest/abc.json is damaged .*delete it and rerun"):
        run(str(inp), out, classify)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="output .*file is a file"):
        run(str(inp), str(tmp_path / "file"), classify)
    with pytest.raises(ValueError, match=r"output .*res\[1\]: a path with \*, \?, \[ or \] is not supported"):
        run(str(inp), str(tmp_path / "res[1]"), classify)
    # --overwrite deletes the old output only once the input has passed its checks.
    with pytest.raises(InputError, match="no column 'body'"):
        run(str(inp), out, Options(**{**classify.__dict__, "text_column": "body"}), overwrite=True)
    assert (tmp_path / "out" / "_manifest" / "abc.json").exists()
