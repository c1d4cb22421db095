"""`pipeline.run` against a real S3 endpoint: moto's S3 server on loopback, reached over HTTP.

The input shards are written with s3fs, the job reads and writes them through Ray workers (the
endpoint and credentials travel in `storage_options`, pickled with the filesystem), and the output
is read back with pyarrow's own S3 client, so nothing here trusts the pipeline's storage code.
"""

import json

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

import pipeline
from pipeline import Options

BUCKET = "rayberta-test"
KEY, SECRET, REGION = "testing-key", "testing-secret", "eu-west-1"  # not us-east-1: s3fs sends it as a LocationConstraint, which S3 rejects
SHARDS, ROWS_PER_SHARD = 3, 40


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's real S3 server on 127.0.0.1 (a free port), stopped at teardown."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    assert host == "127.0.0.1"
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="module")
def storage_options(s3_endpoint) -> dict:
    # Credentials go in storage_options, not the environment: Ray workers were started before this
    # fixture ran and would not see variables set now in the driver.
    return {"endpoint_url": s3_endpoint, "key": KEY, "secret": SECRET, "client_kwargs": {"region_name": REGION}}


@pytest.fixture(scope="module")
def s3(storage_options):
    import s3fs

    fs = s3fs.S3FileSystem(**storage_options, skip_instance_cache=True)
    fs.mkdir(BUCKET)
    return fs


@pytest.fixture(scope="module")
def arrow_s3(s3_endpoint) -> pafs.S3FileSystem:
    """pyarrow's own S3 client (not fsspec) for reading the results back."""
    return pafs.S3FileSystem(access_key=KEY, secret_key=SECRET, region=REGION,
                             endpoint_override=s3_endpoint.removeprefix("http://"), scheme="http")  # fmt: skip


@pytest.fixture(scope="module")
def s3_input(s3, reviews) -> pa.Table:
    """3 Parquet shards of 40 rows (id int64, text string) under s3://BUCKET/in/; returns all rows."""
    n = SHARDS * ROWS_PER_SHARD
    table = pa.table({"id": pa.array([10_000 + 7 * i for i in range(n)], pa.int64()), "text": pa.array(reviews[:n], pa.string())})
    for shard in range(SHARDS):
        with s3.open(f"{BUCKET}/in/part-{shard}.parquet", "wb") as f:
            pq.write_table(table.slice(shard * ROWS_PER_SHARD, ROWS_PER_SHARD), f)
    assert len(s3.ls(f"{BUCKET}/in/")) == SHARDS
    return table


def read_output(arrow_s3: pafs.S3FileSystem, prefix: str) -> pa.Table:
    files = [i.path for i in arrow_s3.get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True))
             if i.path.endswith(".parquet")]  # fmt: skip
    assert files, f"no Parquet files under s3://{BUCKET}/{prefix}"
    return pa.concat_tables([pq.read_table(f, filesystem=arrow_s3) for f in files])


@torch.no_grad()
def reference_labels(model_dir, texts: list[str]) -> tuple[list[str], np.ndarray]:
    """Labels and probabilities from transformers' own model and tokenizer (128 tokens max)."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    model = transformers.RobertaForSequenceClassification.from_pretrained(str(model_dir)).eval()
    enc = tokenizer(texts, truncation=True, max_length=128, padding=True, return_tensors="pt")
    probs = torch.softmax(model(**enc).logits, -1).numpy()
    return [model.config.id2label[int(i)] for i in probs.argmax(-1)], probs


@pytest.fixture(scope="module")
def first_run(ray_session, checkpoints, s3_input, storage_options) -> pipeline.Summary:
    """One job s3://BUCKET/in/ -> s3://BUCKET/out/, shared by the tests below (each run costs ~15 s)."""
    options = Options(task="classify", model=str(checkpoints["classifier"]))
    return pipeline.run(f"s3://{BUCKET}/in/", f"s3://{BUCKET}/out/", options, storage_options=storage_options)


def test_classify_s3_to_s3(first_run, checkpoints, arrow_s3, s3_input):
    summary = first_run
    out = read_output(arrow_s3, "out")
    assert out.num_rows == s3_input.num_rows == summary.rows
    assert sorted(out["id"].to_pylist()) == sorted(s3_input["id"].to_pylist())
    schema = out.schema
    assert schema.field("id").type == pa.int64()
    assert schema.field("label").type == pa.string()
    assert schema.field("label_id").type == pa.int32()
    assert schema.field("score").type == pa.float32()
    probs_type = schema.field("probs").type
    assert pa.types.is_fixed_size_list(probs_type) and probs_type.list_size == 3, probs_type
    assert probs_type.value_type == pa.float32()
    assert schema.field("input_tokens").type == pa.int32()
    assert schema.field("truncated").type == pa.bool_()
    assert "text" not in schema.names

    # Same labels as transformers on the same texts, row by row through the id.
    out = out.sort_by("id")
    texts = dict(zip(s3_input["id"].to_pylist(), s3_input["text"].to_pylist()))
    labels, probs = reference_labels(checkpoints["classifier"], [texts[i] for i in out["id"].to_pylist()])
    assert out["label"].to_pylist() == labels
    # The tiny random head may give most rows one label; the probabilities still differ per row.
    assert np.ptp(probs, axis=0).max() > 0.01  # 100x the tolerance below
    np.testing.assert_allclose(np.array(out["probs"].to_pylist()), probs, atol=1e-4)
    assert out["truncated"].to_pylist() == [n == 128 for n in out["input_tokens"].to_pylist()]
    assert any(out["truncated"].to_pylist())  # long IMDB reviews were cut to 128 tokens

    info = arrow_s3.get_file_info(f"{BUCKET}/out/_summary.json")
    assert info.type == pafs.FileType.File
    with arrow_s3.open_input_stream(f"{BUCKET}/out/_summary.json") as f:
        written = json.loads(f.read())
    assert written["rows"] == s3_input.num_rows
    assert written["output"] == f"s3://{BUCKET}/out/"
    assert written["tokens"] == sum(out["input_tokens"].to_pylist()) == summary.tokens


def test_s3_output_needs_overwrite(first_run, checkpoints, arrow_s3, s3_input, storage_options):
    options = Options(task="classify", model=str(checkpoints["classifier"]))
    before = {i.path for i in arrow_s3.get_file_info(pafs.FileSelector(f"{BUCKET}/out", recursive=True))}

    with pytest.raises(FileExistsError, match="--overwrite"):
        pipeline.run(f"s3://{BUCKET}/in/", f"s3://{BUCKET}/out/", options, storage_options=storage_options)
    after = {i.path for i in arrow_s3.get_file_info(pafs.FileSelector(f"{BUCKET}/out", recursive=True))}
    assert after == before  # the earlier results are untouched

    summary = pipeline.run(f"s3://{BUCKET}/in/", f"s3://{BUCKET}/out/", options, overwrite=True, storage_options=storage_options)
    out = read_output(arrow_s3, "out")
    assert summary.rows == out.num_rows == s3_input.num_rows  # replaced, not appended to
    assert sorted(out["id"].to_pylist()) == sorted(s3_input["id"].to_pylist())
    files = {i.path for i in arrow_s3.get_file_info(pafs.FileSelector(f"{BUCKET}/out", recursive=True))}
    assert f"{BUCKET}/out/_summary.json" in files
    assert not (files & before) - {f"{BUCKET}/out/_summary.json"}  # the old Parquet files are gone
