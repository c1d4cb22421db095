"""Faults injected into running jobs on a real multi-process Ray cluster (`ray start` head + worker
nodes on this machine, tests/cluster.py), with the job's driver a separate `rayberta` process:

- an inference actor SIGKILLed mid-job: Ray restarts it and the job finishes by itself;
- the driver SIGKILLed mid-job: the rerun of the same command reuses the committed shards;
- the worker node SIGKILLed mid-job (raylet, object store, workers) and a replacement node joined,
  as an autoscaler would: the job finishes, or its rerun does.

Each ends with every input row in the output exactly once (tests/conftest.py:assert_exactly_once).
The head has no CPUs, so all work runs on the worker node that gets killed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline import shards
from tests.cluster import REPO, head_node, kill_node, worker_node, workers_of
from tests.conftest import FAULT_ROWS, FAULT_SHARDS, assert_exactly_once, marker_files

OBJECT_STORE = 300 * 2**20  # per node: three nodes share this machine's memory
pytestmark = pytest.mark.slow  # about a minute each: `make test` (and CI) runs them, a bare `pytest` does not


@pytest.fixture(scope="module")
def head():
    with head_node(num_cpus=0, object_store_bytes=OBJECT_STORE) as head:
        yield head


@pytest.fixture
def corpus_dir(tmp_path, fault_corpus):
    for i, table in enumerate(fault_corpus):
        (tmp_path / "in").mkdir(exist_ok=True)
        pq.write_table(table, tmp_path / "in" / f"part-{i}.parquet")
    return tmp_path / "in"


def start_job(head, model, corpus_dir, output) -> subprocess.Popen:
    command = [sys.executable, "-m", "jobs.cli", "classify", "--model", str(model), "--input", str(corpus_dir),
               "--output", str(output), "--max-length", "64", "--address", f"127.0.0.1:{head.gcs_port}"]  # fmt: skip
    return subprocess.Popen(command, cwd=REPO, env=head.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def markers(output) -> list[dict]:
    return list(marker_files(output).values())


def committed(output) -> list[dict]:
    """Markers whose result file is in place (a marker is written just before its file moves in)."""
    return [m for m in markers(output) if m["output"] is None or (output / m["output"]).exists()]


def wait_for_first_commit(job: subprocess.Popen, output, timeout: float = 240) -> int:
    """Block until a shard is committed while the job still runs; returns the markers then."""
    deadline = time.monotonic() + timeout
    while not (done := committed(output)):
        assert job.poll() is None, f"the job ended before any commit:\n{job.stderr.read()[-4000:]}"
        assert time.monotonic() < deadline, "no shard committed in time"
        time.sleep(0.05)
    assert len(done) < FAULT_SHARDS, "the job finished before the fault could be injected"
    return len(done)


def finish(job: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    """(exit status, stderr then stdout); a job that succeeds prints its summary alone on stdout."""
    out, err = job.communicate(timeout=timeout)
    if job.returncode == 0:
        assert json.loads(out) == summary_of(Path(job.args[job.args.index("--output") + 1])), out[-4000:]
    return job.returncode, err + out


def summary_of(output) -> dict:
    return json.loads((output / "_summary.json").read_text())


def check_output(output, corpus) -> None:
    table = pq.read_table(output, columns=["id", "label"])
    expected = [i for t in corpus for i in t["id"].to_pylist()]
    assert_exactly_once(table, markers(output), [p.name for p in output.glob("*.parquet")], expected)
    assert table["label"].null_count == 0
    assert shards.Output(str(output)).markers() == (marker_files(output), 0)  # the finishing run indexed every marker


def test_inference_actor_killed_mid_job(head, slow_classifier, corpus_dir, fault_corpus, tmp_path):
    with worker_node(head, num_cpus=2, object_store_bytes=OBJECT_STORE):
        job = start_job(head, slow_classifier, corpus_dir, tmp_path / "out")
        wait_for_first_commit(job, tmp_path / "out")
        actors = workers_of(head, "ray::MapWorker(MapBatches(Infer))")
        assert len(actors) == 1, actors
        os.kill(actors[0], signal.SIGKILL)

        code, log = finish(job)
        assert code == 0, log[-4000:]
    summary = summary_of(tmp_path / "out")
    assert (summary["rows"], summary["shards_run"]) == (FAULT_SHARDS * FAULT_ROWS, FAULT_SHARDS)  # one run, no rerun
    check_output(tmp_path / "out", fault_corpus)


def test_driver_killed_mid_job_then_rerun(head, slow_classifier, corpus_dir, fault_corpus, tmp_path):
    with worker_node(head, num_cpus=2, object_store_bytes=OBJECT_STORE):
        job = start_job(head, slow_classifier, corpus_dir, tmp_path / "out")
        wait_for_first_commit(job, tmp_path / "out")
        job.kill()
        job.wait()
        done = len(committed(tmp_path / "out"))

        code, log = finish(start_job(head, slow_classifier, corpus_dir, tmp_path / "out"))
        assert code == 0, log[-4000:]
    summary = summary_of(tmp_path / "out")
    assert (summary["shards_reused"], summary["shards_run"]) == (done, FAULT_SHARDS - done)
    assert summary["rows_run"] == (FAULT_SHARDS - done) * FAULT_ROWS and summary["rows"] == FAULT_SHARDS * FAULT_ROWS
    check_output(tmp_path / "out", fault_corpus)


def test_worker_node_lost_mid_job(head, slow_classifier, corpus_dir, fault_corpus, tmp_path):
    with worker_node(head, num_cpus=2, object_store_bytes=OBJECT_STORE) as node:
        job = start_job(head, slow_classifier, corpus_dir, tmp_path / "out")
        done = wait_for_first_commit(job, tmp_path / "out")
        kill_node(node)
    with worker_node(head, num_cpus=2, object_store_bytes=OBJECT_STORE):  # the replacement, as an autoscaler would
        try:
            code, log = finish(job, timeout=240)
        except subprocess.TimeoutExpired:  # still waiting on what the lost node held: give up, rerun
            job.kill()
            code, log = job.wait(), ""
        if code != 0:
            assert "rerun the same command" in log or not log, log[-4000:]
            code, log = finish(start_job(head, slow_classifier, corpus_dir, tmp_path / "out"))
            assert code == 0, log[-4000:]
            assert summary_of(tmp_path / "out")["shards_reused"] >= done
    check_output(tmp_path / "out", fault_corpus)
