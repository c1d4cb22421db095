"""Whole jobs on a real local Ray: Parquet in, Parquet out, read back with plain pyarrow and compared
with transformers; ids, schema, summary; the Python API; and clear errors for bad input."""

import json
import os
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline
from pipeline import InputError, Options, TaskError, TaskOptions, run
from pipeline.runner import JEMALLOC, check_job, SHAPE_CACHE_CAPACITY, SHAPE_CACHES, cpu_inference_env, inference_pool, inference_remote_args
from tests.pipeline import reference

ATOL = 1e-4


@pytest.fixture(scope="module")
def corpus(reviews):
    """40 real reviews, a null, an empty and a whitespace-only text, with ids that are not row numbers."""
    texts = reviews[100:140] + [None, "", "  "]
    return pa.table({"id": pa.array([1000 + 7 * i for i in range(len(texts))], pa.int64()),
                     "text": pa.array(texts, pa.string()),
                     "source": pa.array(["s%d" % (i % 3) for i in range(len(texts))])})  # fmt: skip


@pytest.fixture
def shards(tmp_path, corpus):
    """The corpus as three Parquet shards in a directory."""
    directory = tmp_path / "in"
    directory.mkdir()
    for i, rows in enumerate(np.array_split(np.arange(corpus.num_rows), 3)):
        pq.write_table(corpus.take(rows), directory / f"part-{i}.parquet")
    return directory


def read(directory):
    table = pq.read_table(directory)
    return table.take(np.argsort(table["id"].to_numpy()))


def test_classify_job_equals_transformers(ray_session, checkpoints, shards, corpus, tmp_path):
    out_dir = tmp_path / "out"
    options = Options(task="classify", model=str(checkpoints["classifier"]), keep_columns=("source", "text:review"), batch_tokens=512)
    summary = run(str(shards), str(out_dir), options)
    out = read(out_dir)
    assert out.num_rows == corpus.num_rows and out["id"].to_pylist() == corpus["id"].to_pylist()
    assert out["source"].to_pylist() == corpus["source"].to_pylist()
    assert out["review"].to_pylist() == corpus["text"].to_pylist() and "text" not in out.column_names  # kept, renamed
    assert out.schema.field("label").type == pa.string() and out.schema.field("label_id").type == pa.int32()
    assert out.schema.field("score").type == pa.float32() and out.schema.field("probs").type == pa.list_(pa.float32(), 3)
    logits = reference.classify(checkpoints["classifier"], corpus["text"].to_pylist())
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(np.stack(out["probs"].to_numpy(zero_copy_only=False)), probs, atol=ATOL)
    assert out["label_id"].to_pylist() == probs.argmax(1).tolist()

    on_disk = json.loads((out_dir / "_summary.json").read_text())
    assert on_disk == summary.to_dict()
    assert summary.rows == corpus.num_rows
    assert summary.tokens == sum(out["input_tokens"].to_pylist())
    assert summary.truncated_rows == sum(out["truncated"].to_pylist()) > 0
    assert summary.empty_texts == 2  # null and "" (whitespace is a token for byte-level BPE)


def test_every_task_runs_end_to_end(ray_session, checkpoints, shards, corpus, tmp_path):
    texts = corpus["text"].to_pylist()
    run(str(shards), str(tmp_path / "embed"), Options(task="embed", model=str(checkpoints["base"])))
    out = read(tmp_path / "embed")
    np.testing.assert_allclose(np.stack(out["embedding"].to_numpy(zero_copy_only=False)), reference.embed(checkpoints["base"], texts), atol=ATOL)

    summary = run(str(shards), str(tmp_path / "score"), Options(task="score", model=str(checkpoints["causal_lm"])))
    out = read(tmp_path / "score")
    expected = reference.causal_log_likelihood(checkpoints["causal_lm"], texts)
    np.testing.assert_allclose(out["log_likelihood"].to_numpy(), [e[0] for e in expected], rtol=1e-5, atol=1e-3)
    assert summary.method == "causal"

    run(str(shards), str(tmp_path / "fill"), Options(task="fill-mask", model=str(checkpoints["masked_lm"])))
    out = read(tmp_path / "fill")
    assert out["predictions"].to_pylist() == [[] for _ in texts]  # reviews have no <mask>: empty lists


def test_missing_id_column_derives_stable_ids(ray_session, checkpoints, tmp_path, corpus, monkeypatch):
    (tmp_path / "in").mkdir()
    pq.write_table(corpus.drop_columns(["id"]), tmp_path / "in" / "part.parquet")
    options = Options(task="classify", model=str(checkpoints["classifier"]))
    run(str(tmp_path / "in"), str(tmp_path / "a"), options)
    run(str(tmp_path / "in"), str(tmp_path / "b"), options)
    a, b = pq.read_table(tmp_path / "a"), pq.read_table(tmp_path / "b")
    assert a.schema.field("id").type == pa.uint64()
    assert len(set(a["id"].to_pylist())) == corpus.num_rows
    assert set(a["id"].to_pylist()) == set(b["id"].to_pylist())
    monkeypatch.chdir(tmp_path)  # however the path is spelled (relative, a Path, a list), the same ids
    for spelled in ("in", tmp_path / "in", ["in/part.parquet"]):
        api = pipeline.classify(spelled, model=checkpoints["classifier"]).to_pandas()
        assert sorted(api["id"]) == sorted(a["id"].to_pylist()), spelled


def test_python_api_chains_on_datasets(ray_session, checkpoints, corpus):
    df = corpus.to_pandas()
    ds = pipeline.classify(df, model=checkpoints["classifier"], keep_columns={"source": "origin"}, logits=True)
    out = ds.to_pandas().sort_values("id")
    assert list(out["id"]) == list(df["id"]) and list(out["origin"]) == list(df["source"])
    logits = reference.classify(checkpoints["classifier"], corpus["text"].to_pylist())
    np.testing.assert_allclose(np.stack(out["logits"]), logits, atol=ATOL)
    chained = pipeline.embed(ds.select_columns(["id", "label"]).rename_columns({"label": "text"}), model=checkpoints["base"])
    assert chained.count() == len(df)


class CalledInItsBuildersThread:
    """A stand-in for Infer: says, for each row, whether the call ran in the thread that built it."""

    def __init__(self):
        self.builder = threading.get_ident()

    def __call__(self, batch: dict) -> dict:
        return {"same_thread": np.full(len(batch["id"]), threading.get_ident() == self.builder)}


def test_inference_actors_compute_in_the_thread_that_built_the_model(ray_session):
    def same_thread(compute) -> set:
        ds = ray_session.data.range(8, override_num_blocks=4)
        return {row["same_thread"] for row in ds.map_batches(CalledInItsBuildersThread, batch_size=2, compute=compute).take_all()}

    assert same_thread(inference_pool(actors=1)) == {True}
    # Ray Data's default, which inference_pool overrides: the calls run in another thread.
    assert same_thread(ray_session.data.ActorPoolStrategy(size=1)) == {False}


def test_cpu_inference_actor_computes_on_every_core_with_its_environment(ray_session, checkpoints):
    # Ray sets OMP_NUM_THREADS to a worker's CPU reservation: 1 for the fractional one of Infer.
    # The shape caches and the allocator are read at a process's start: they come with the actor's
    # remote arguments, the ones the pipeline gives it.
    expected = cpu_inference_env()

    @ray_session.remote(**inference_remote_args(gpu=False))
    def after_infer_loads():
        import torch

        from pipeline.stages import Infer

        before = torch.get_num_threads()
        Infer(str(checkpoints["classifier"]), "classify", device="cpu")
        libraries = {line.split()[-1] for line in open("/proc/self/maps") if line.rstrip().endswith(".so")}
        return before, torch.get_num_threads(), {v: os.environ.get(v) for v in expected}, libraries

    before, after, env, libraries = ray_session.get(after_infer_loads.remote())
    assert before == 1 and after == len(os.sched_getaffinity(0))
    assert env == expected and all(expected[v] == str(SHAPE_CACHE_CAPACITY) for v in SHAPE_CACHES)
    if "LD_PRELOAD" not in os.environ:  # else the driver's own preload passes on instead
        assert expected["MALLOC_CONF"] and os.path.realpath(JEMALLOC) in libraries  # allocates through jemalloc


# ----------------------------------------------------------------------------- bad input
@pytest.fixture
def classify(checkpoints):
    return Options(task="classify", model=str(checkpoints["classifier"]))


def test_missing_input(classify, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"input {tmp_path / 'nope'} does not exist"):
        run(str(tmp_path / "nope"), str(tmp_path / "out"), classify)


def test_empty_input(classify, tmp_path):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": pa.array([], pa.int64()), "text": pa.array([], pa.string())}), tmp_path / "in" / "empty.parquet")
    with pytest.raises(InputError, match="holds no rows"):
        run(str(tmp_path / "in"), str(tmp_path / "out"), classify)
    (tmp_path / "none").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no .parquet files"):
        run(str(tmp_path / "none"), str(tmp_path / "out"), classify)


def test_missing_columns_list_what_is_there(classify, shards, tmp_path):
    with pytest.raises(InputError, match=r"no column 'body' \(--text-column\); available columns: \['id', 'text', 'source'\]"):
        run(str(shards), str(tmp_path / "out"), Options(**{**classify.__dict__, "text_column": "body"}))
    with pytest.raises(InputError, match=r"no id column 'doc_id' \(--id-column\)"):
        run(str(shards), str(tmp_path / "out"), Options(**{**classify.__dict__, "id_column": "doc_id"}))
    with pytest.raises(InputError, match=r"--keep-columns \['lang'\] not found"):
        run(str(shards), str(tmp_path / "out"), Options(**{**classify.__dict__, "keep_columns": ("lang",)}))


def test_non_string_text_column(classify, tmp_path):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": [1, 2], "text": [3.5, 4.0]}), tmp_path / "in" / "x.parquet")
    with pytest.raises(InputError, match="column 'text' .*has type double, expected string"):
        run(str(tmp_path / "in"), str(tmp_path / "out"), classify)


def test_task_the_checkpoint_cannot_run(checkpoints, shards, tmp_path):
    with pytest.raises(TaskError, match="task 'fill-mask' needs a checkpoint with a masked_lm head"):
        run(str(shards), str(tmp_path / "out"), Options(task="fill-mask", model=str(checkpoints["classifier"])))


def test_settings_are_checked_before_any_data_moves(checkpoints, shards, tmp_path):
    """Refused on the driver with what to do, before Ray starts or the output is touched."""
    lm = str(checkpoints["causal_lm"])
    cases = [
        (Options(task="classify", model=str(checkpoints["classifier"]), max_length=129), r"--max-length 129: must be .* at most the 128 positions"),
        (Options(task="classify", model=str(checkpoints["classifier"]), max_length=2), r"more than the 2 special tokens"),
        (Options(task="score", model=lm, max_length=64, task_options=TaskOptions(stride=32)), "--max-length and --stride exclude each other"),
        (Options(task="classify", model=str(checkpoints["classifier"]), task_options=TaskOptions(stride=32)), "--stride is an option of the score task"),
    ]  # fmt: skip
    for options, error in cases:
        with pytest.raises(TaskError, match=error):
            run(str(shards), str(tmp_path / "out"), options)
    with pytest.raises(TaskError, match="a column whose name holds ':' cannot be kept"):  # "a:b:c" would keep a as b:c
        pipeline.classify(str(shards), model=checkpoints["classifier"], keep_columns={"a:b": "c"})
    for bound in (3, 128):  # both ends of the allowed range: one token past the specials, every position
        check_job(Options(task="classify", model=str(checkpoints["classifier"]), max_length=bound))
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((checkpoints["classifier"] / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        run(str(shards), str(tmp_path / "out"), Options(task="classify", model=str(no_tokenizer)))
    assert not (tmp_path / "out").exists()


def test_device_cuda_without_a_gpu_is_an_error_not_a_wait(checkpoints, shards, tmp_path):
    """An embedded Ray without a GPU would leave the inference actors waiting for one forever: refused
    before the output is touched (even with --overwrite) or Ray starts."""
    import subprocess
    import sys

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.parquet").write_bytes(b"earlier results")
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a GPU machine
    cmd = [sys.executable, "-m", "jobs.cli", "classify", "--model", str(checkpoints["classifier"]), "--input", str(shards),
           "--output", str(tmp_path / "out"), "--device", "cuda", "--overwrite"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode != 0 and "--device cuda, but this machine has no GPU" in result.stderr, result.stderr[-2000:]
    assert (tmp_path / "out" / "old.parquet").read_bytes() == b"earlier results"


def test_an_embedded_ray_for_s3_jobs_has_its_workers_import_ray_data_and_s3fs_before_any_task():
    """Ray Data cancels a failed job's tasks with a KeyboardInterrupt; one landing inside a pooled
    worker's first `import s3fs` broke every later S3 task on that worker (CI, after the outage
    test), and `import ray.data` breaks the same way. The workers of the Ray an S3 job starts
    import both as they start, so no task can be inside those imports (pipeline/workers.py)."""
    import subprocess
    import sys

    probe = """if True:
        import sys, fsspec, ray
        from pipeline.runner import init_ray
        init_ray(None, [fsspec.filesystem("file"), fsspec.filesystem("s3", anon=True)])
        # A plain task: nothing in it or its arguments imports Ray Data or s3fs.
        imported = lambda: ("ray.data" in sys.modules, "s3fs.core" in sys.modules,
                            hasattr(sys.modules.get("aiohttp"), "http_exceptions"))
        print(ray.get([ray.remote(imported).options(num_cpus=0).remote() for _ in range(4)]))
    """
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == str([(True, True, True)] * 4)


def test_output_holding_results_needs_overwrite(ray_session, classify, shards, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.parquet").write_bytes(b"earlier results")
    with pytest.raises(FileExistsError, match="already holds results.*--overwrite"):
        run(str(shards), str(tmp_path / "out"), classify)
    assert (tmp_path / "out" / "old.parquet").read_bytes() == b"earlier results"  # nothing lost
    run(str(shards), str(tmp_path / "out"), classify, overwrite=True)
    assert not (tmp_path / "out" / "old.parquet").exists()


def test_cli_names_a_bad_storage_options_flag(capsys):
    from jobs.cli import main

    with pytest.raises(SystemExit):
        main(["embed", "--model", "m", "--input", "in", "--output", "out", "--storage-options", "{endpoint_url: x}"])
    assert "--storage-options '{endpoint_url: x}' is not valid JSON" in capsys.readouterr().err


def test_cli_says_what_to_fix_in_one_line(checkpoints, shards, tmp_path, capsys):
    from jobs.cli import main

    flags = ["classify", "--model", str(checkpoints["classifier"]), "--input", str(shards), "--output", str(tmp_path / "out")]
    assert main([*flags, "--text-column", "body"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rayberta: error: ") and "no column 'body' (--text-column)" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main([*flags, "--storage-options", "[1, 2]"])
    assert "must be a JSON object" in capsys.readouterr().err


def test_cli_runs_the_same_job(ray_session, checkpoints, shards, tmp_path, capsys):
    from jobs.cli import main

    assert main(["classify", "--model", str(checkpoints["classifier"]), "--input", str(shards),
                 "--output", str(tmp_path / "out"), "--keep-columns", "source", "--logits"]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    out = pq.read_table(tmp_path / "out")
    assert summary["rows"] == out.num_rows == 43
    assert {"id", "source", "label", "label_id", "score", "probs", "logits", "input_tokens", "truncated"} <= set(out.column_names)
