"""Input listing and output preparation on the local filesystem (S3 runs through the same fsspec
calls: tests/pipeline/test_s3.py)."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import storage


@pytest.fixture
def tree(tmp_path):
    for name in ["a/part-0.parquet", "a/part-1.parquet", "a/_summary.json", "a/.hidden.parquet", "b/x.parquet", "b/notes.txt"]:
        path = tmp_path / name
        path.parent.mkdir(exist_ok=True)
        pq.write_table(pa.table({"text": ["t"]}), path) if name.endswith(".parquet") else path.write_text("x")
    return tmp_path


def test_directory_glob_file_and_list(tree):
    _, files = storage.parquet_files(str(tree / "a"))
    assert [f.rsplit("/", 1)[1] for f in files] == ["part-0.parquet", "part-1.parquet"]  # _ and . files skipped
    _, files = storage.parquet_files(str(tree / "*" / "*.parquet"))
    assert len(files) == 3
    _, files = storage.parquet_files([str(tree / "a" / "part-1.parquet"), str(tree / "b")])
    assert [f.rsplit("/", 1)[1] for f in files] == ["part-1.parquet", "x.parquet"]


def test_missing_and_empty_inputs(tree):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        storage.parquet_files(str(tree / "c"))
    (tree / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no .parquet files"):
        storage.parquet_files(str(tree / "empty"))
    with pytest.raises(FileNotFoundError, match="no input given"):
        storage.parquet_files([])


def test_prepare_output_refuses_then_replaces(tree):
    with pytest.raises(FileExistsError, match="--overwrite"):
        storage.prepare_output(str(tree / "a"), overwrite=False)
    assert (tree / "a" / "part-0.parquet").exists()
    storage.prepare_output(str(tree / "a"), overwrite=True)
    assert list((tree / "a").iterdir()) == []
    storage.prepare_output(str(tree / "new" / "out"), overwrite=False)  # created, empty dir is fine to reuse
    storage.prepare_output(str(tree / "new" / "out"), overwrite=False)
