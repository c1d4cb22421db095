"""`pipeline.run` against a real S3 endpoint: moto's S3 server on loopback, reached over HTTP.

The input shards are written with s3fs, the job reads and writes them through Ray workers (the
endpoint and credentials travel in `storage_options`, pickled with the filesystem), and the output
is read back with pyarrow's own S3 client, so nothing here trusts the pipeline's storage code.
"""

import json
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

import pipeline
from pipeline import InputError, JobInterrupted, Options, shards
from tests.conftest import assert_exactly_once

BUCKET = "rayberta-test"
KEY, SECRET, REGION = "testing-key", "testing-secret", "eu-west-1"  # not us-east-1: s3fs sends it as a LocationConstraint, which S3 rejects
SHARDS, ROWS_PER_SHARD = 3, 40


class S3Server:
    """moto's real S3 server on 127.0.0.1; `stop()` and `start()` again on the same port make an
    outage (the stored objects live in this process and survive it)."""

    def __init__(self):
        from moto.moto_server.werkzeug_app import MotoRequestHandler
        from moto.server import ThreadedMotoServer

        # One request per connection: `stop()` closes only the listening socket, and the handler
        # threads of kept-alive connections (werkzeug's HTTP/1.1) would go on serving through the outage.
        MotoRequestHandler.protocol_version = "HTTP/1.0"

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, self.port = self.server.get_host_and_port()
        assert host == "127.0.0.1"
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.stop()

    def start(self):
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        # moto waits for its server thread without a timeout, and that thread dies if the port was
        # taken meanwhile: a clear failure rather than a hung test run.
        starting = threading.Thread(target=self.server.start, daemon=True)
        starting.start()
        starting.join(timeout=30)
        assert not starting.is_alive(), f"moto could not listen on 127.0.0.1:{self.port} again"


@pytest.fixture(scope="module")
def s3_server():
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def s3_endpoint(s3_server) -> str:
    return s3_server.url


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
    # pyarrow's dataset discovery skips _ and . names (markers, the summary, and _staging/, where a
    # cancelled task's upload can still land after the job), as any Parquet reader would.
    dataset = pads.dataset(f"{BUCKET}/{prefix}", filesystem=arrow_s3, format="parquet")
    assert dataset.files, f"no Parquet files under s3://{BUCKET}/{prefix}"
    return dataset.to_table()


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


def test_python_api_reads_s3_with_storage_options(first_run, checkpoints, arrow_s3, storage_options):
    """The API lists s3:// paths as jobs do, with the endpoint given only in storage_options."""
    api = pipeline.classify(f"s3://{BUCKET}/in/", model=checkpoints["classifier"], storage_options=storage_options)
    got = api.to_pandas().sort_values("id")
    job = read_output(arrow_s3, "out").sort_by("id")
    assert got["id"].tolist() == job["id"].to_pylist() and got["label"].tolist() == job["label"].to_pylist()


def test_s3_rerun_resumes_and_overwrite_replaces(first_run, checkpoints, arrow_s3, s3_input, storage_options, s3, monkeypatch):
    options = Options(task="classify", model=str(checkpoints["classifier"]))
    listing = lambda: {i.path: i.mtime for i in arrow_s3.get_file_info(pafs.FileSelector(f"{BUCKET}/out", recursive=True))}  # noqa: E731
    before = listing()
    assert sum(p.endswith(".parquet") for p in before) == SHARDS  # one result object per input shard
    assert sum(p.startswith(f"{BUCKET}/out/_manifest/") and p.endswith(".json") for p in before) == SHARDS
    # The first run indexed its markers with the ETags of its PUTs: a rerun reads them in one GET.
    out = shards.Output(f"s3://{BUCKET}/out/", storage_options)
    assert out.markers() == ({m["key"]: m for m in markers(s3, "out")}, 0)

    listings = []  # of the output's top level: one per run (it grows with the shards, 1,000 per request)
    entries = shards.Output.entries
    monkeypatch.setattr(shards.Output, "entries", lambda self: listings.append(self.uri) or entries(self))
    again = pipeline.run(f"s3://{BUCKET}/in/", f"s3://{BUCKET}/out/", options, storage_options=storage_options)
    monkeypatch.undo()
    assert (again.shards_run, again.shards_reused, again.rows) == (0, SHARDS, s3_input.num_rows) and len(listings) == 1
    after = listing()
    assert {p: t for p, t in after.items() if not p.endswith("_summary.json")} == {p: t for p, t in before.items() if not p.endswith("_summary.json")}

    # A marker rewritten by another process (a run killed before writing the index): its ETag
    # changed, so it is fetched, also by this process, whose s3fs had listed the markers before.
    path = s3.glob(f"{BUCKET}/out/_manifest/*.json")[0]
    s3.pipe_file(path, json.dumps({**json.loads(s3.cat_file(path)), "committed_at": 0.0}).encode())
    rewritten, fetched = out.markers()
    assert rewritten == {m["key"]: m for m in markers(s3, "out")} and fetched == 1
    assert [m["committed_at"] for m in rewritten.values()].count(0.0) == 1

    summary = pipeline.run(f"s3://{BUCKET}/in/", f"s3://{BUCKET}/out/", options, overwrite=True, storage_options=storage_options)
    out = read_output(arrow_s3, "out")
    assert (summary.shards_run, summary.rows) == (SHARDS, out.num_rows) and out.num_rows == s3_input.num_rows  # replaced, not appended
    assert sorted(out["id"].to_pylist()) == sorted(s3_input["id"].to_pylist())


def test_output_checks_on_s3_prefixes(s3, storage_options):
    """What S3 calls folders are prefixes: a missing one is an empty output, a console's folder
    placeholder (an empty object `out/`) is no entry, and an object named `_manifest` does not
    make a prefix ours (only markers under `_manifest/` do)."""
    output = lambda name: shards.Output(f"s3://{BUCKET}/checks/{name}/", storage_options)  # noqa: E731
    assert output("missing").entries() == []
    output("missing").check_ours(overwrite=False)
    s3.pipe_file(f"{BUCKET}/checks/placeholder/", b"")
    assert output("placeholder").entries() == []
    output("placeholder").check_ours(overwrite=False)
    s3.pipe({f"{BUCKET}/checks/theirs/_manifest": b"x", f"{BUCKET}/checks/theirs/data.parquet": b"x"})
    with pytest.raises(FileExistsError, match="already holds results"):
        output("theirs").check_ours(overwrite=False)
    s3.pipe({f"{BUCKET}/checks/ours/_manifest/k.json": b"{}", f"{BUCKET}/checks/ours/r.parquet": b"x"})
    output("ours").check_ours(overwrite=False)
    assert sorted(output("ours").entries()) == ["_manifest", "r.parquet"]


def markers(s3, prefix: str) -> list[dict]:
    s3.invalidate_cache()
    return [json.loads(s3.cat_file(p)) for p in s3.glob(f"{BUCKET}/{prefix}/_manifest/*.json")]


def committed(s3, prefix: str) -> list[dict]:
    """Markers whose result file is in place (a marker is written just before its file moves in)."""
    return [m for m in markers(s3, prefix) if m["output"] is None or s3.exists(f"{BUCKET}/{prefix}/{m['output']}")]


@pytest.mark.slow
def test_s3_outage_mid_job_fails_clearly_and_the_rerun_completes(ray_session, s3_server, s3, storage_options, arrow_s3,
                                                                slow_classifier, fault_corpus):  # fmt: skip
    for i, table in enumerate(fault_corpus):
        with s3.open(f"{BUCKET}/outage/in/part-{i}.parquet", "wb") as f:
            pq.write_table(table, f)
    options = Options(task="classify", model=str(slow_classifier), max_length=64)
    job = lambda: pipeline.run(f"s3://{BUCKET}/outage/in/", f"s3://{BUCKET}/outage/out/", options, storage_options=storage_options)  # noqa: E731
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(result=_call(job)))
    thread.start()
    deadline = time.monotonic() + 240
    while not (done := committed(s3, "outage/out")):
        assert thread.is_alive() and time.monotonic() < deadline, outcome
        time.sleep(0.2)
    assert len(done) < len(fault_corpus), "the job finished before the outage"
    s3_server.stop()
    try:
        thread.join(timeout=300)
        assert not thread.is_alive(), "the job hung during the outage"
    finally:
        s3_server.start()
    error = outcome["result"]
    assert isinstance(error, JobInterrupted), error  # retried by s3fs/Ray, then a clear failure
    assert "rerun the same command" in str(error)

    summary = job()
    assert summary.shards_reused >= len(done) and summary.shards_run == len(fault_corpus) - summary.shards_reused
    out = read_output(arrow_s3, "outage/out")
    files = [p.rsplit("/", 1)[1] for p in s3.glob(f"{BUCKET}/outage/out/*.parquet")]
    assert_exactly_once(out, markers(s3, "outage/out"), files, [i for t in fault_corpus for i in t["id"].to_pylist()])


def _call(fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - handed to the test thread to inspect
        return e


def test_credentials_never_reach_logs_reports_or_errors(ray_session, s3, s3_endpoint, s3_input, checkpoints, capfd, arrow_s3):
    secret = f"rb-fake-secret-{uuid.uuid4().hex}"  # moto accepts any key pair
    options = {"endpoint_url": s3_endpoint, "key": "AKIAFAKEFAKEFAKE", "secret": secret, "client_kwargs": {"region_name": REGION}}
    classify = Options(task="classify", model=str(checkpoints["classifier"]))
    summary = pipeline.run(f"s3://{BUCKET}/in/", f"s3://{BUCKET}/secret-out/", classify, storage_options=options)
    errors = []
    for bad in (Options(task="classify", model=str(checkpoints["classifier"]), text_column="nope"),):
        try:
            pipeline.run(f"s3://{BUCKET}/in/", f"s3://{BUCKET}/secret-out-2/", bad, storage_options=options)
        except InputError as e:
            errors.append(e)
    try:
        pipeline.run(f"s3://{BUCKET}/missing/", f"s3://{BUCKET}/secret-out-3/", classify, storage_options=options)
    except FileNotFoundError as e:
        errors.append(e)
    assert len(errors) == 2

    written = {p: s3.cat_file(p) for p in s3.find(f"{BUCKET}/secret-out/") if not p.endswith(".parquet")}
    index = written.pop(f"{BUCKET}/secret-out/_manifest/{shards.INDEX}")  # zstd-compressed: read, not grepped
    assert len(written) == 1 + SHARDS  # the summary and the markers
    written = [*written.values(), *(m.encode() for m in pa.ipc.open_file(index).read_all()["marker"].to_pylist())]
    captured = capfd.readouterr()
    logs = [p.read_bytes() for p in Path(ray_session._private.worker._global_node.get_session_dir_path()).rglob("*")
            if p.is_file() and p.stat().st_size < 50 * 2**20]  # fmt: skip
    texts = [json.dumps(summary.to_dict()), *map(str, errors), *(repr(e.__dict__) for e in errors), captured.out, captured.err]
    assert logs and not [t for t in texts if secret in t]
    assert not [b for b in written + logs if secret.encode() in b]
