"""Input listing on the local filesystem (S3 runs through the same fsspec
calls: tests/pipeline/test_s3.py)."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import storage


@pytest.fixture
def tree(tmp_path):
    for name in ["a/part-0.parquet", "a/part-1.parquet", "a/_summary.json", "a/.hidden.parquet", "a/_staging/r/p.parquet",
                 "a/.cache/x.parquet", "b/x.parquet", "b/notes.txt"]:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"text": ["t"]}), path) if name.endswith(".parquet") else path.write_text("x")
    return tmp_path


def test_directory_glob_file_and_list(tree):
    _, shards = storage.parquet_files(str(tree / "a"))
    assert [s.path.rsplit("/", 1)[1] for s in shards] == ["part-0.parquet", "part-1.parquet"]  # _ and . files, folders skipped
    assert shards[0].size == (tree / "a" / "part-0.parquet").stat().st_size and shards[0].version
    _, shards = storage.parquet_files(str(tree / "*" / "*.parquet"))
    assert len(shards) == 3
    _, shards = storage.parquet_files([str(tree / "a" / "part-1.parquet"), str(tree / "b"), str(tree / "a")])
    names = [s.path.rsplit("/", 1)[1] for s in shards]
    assert names == ["part-1.parquet", "x.parquet", "part-0.parquet"]  # a file named twice is one shard


def test_missing_and_empty_inputs(tree):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        storage.parquet_files(str(tree / "c"))
    (tree / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no .parquet files"):
        storage.parquet_files(str(tree / "empty"))
    with pytest.raises(FileNotFoundError, match="no input given"):
        storage.parquet_files([])


def test_the_output_is_never_input(tree):
    """An output folder inside the input folder is left out of it (its results are not input); an
    input inside the output is refused (--overwrite would delete it)."""
    (tree / "a" / "labels").mkdir()
    pq.write_table(pa.table({"text": ["t"]}), tree / "a" / "labels" / "part-0-abc.parquet")
    _, shards = storage.parquet_files(str(tree / "a"), output=str(tree / "a" / "labels"))
    assert [s.path.rsplit("/", 1)[1] for s in shards] == ["part-0.parquet", "part-1.parquet"]
    _, shards = storage.parquet_files(str(tree / "a"), output=str(tree / "a" / "label"))  # a name prefix is not a folder
    assert len(shards) == 3
    for inp, out in [("a", "a"), ("a/part-0.parquet", "a"), ("a/*.parquet", "a"), ("a/labels", ".")]:
        with pytest.raises(ValueError, match="lies inside the output"):
            storage.parquet_files(str(tree / inp), output=str(tree / out))
