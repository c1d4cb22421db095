"""`ray job submit` of `python -m jobs.label` to a real Ray head node started with `ray start`
(tests/cluster.py: its own temp dir, ports and auth token; the dashboard on 127.0.0.1 only)."""

from __future__ import annotations

import json
import urllib.request
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.cluster import REPO, head_node, listening, ray_cli

ROWS = 30


@pytest.fixture(scope="module")
def ray_head():
    with head_node() as head:
        yield head


def test_job_submit_labels_parquet(ray_head, checkpoints, reviews, tmp_path):
    ids = pa.array([500 + 3 * i for i in range(ROWS)], pa.int64())
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": ids, "text": pa.array(reviews[:ROWS], pa.string())}), tmp_path / "in" / "part-0.parquet")
    output = tmp_path / "out"
    job = f"rayberta-test-{uuid.uuid4().hex[:8]}"

    submitted = ray_cli(ray_head, "job", "submit", "--address", ray_head.dashboard, "--submission-id", job,
                        "--working-dir", str(REPO), "--",
                        "python", "-m", "jobs.label", "--model", str(checkpoints["classifier"]),
                        "--input", str(tmp_path / "in"), "--output", str(output), timeout=300)  # fmt: skip
    logs = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, logs[-6000:]
    assert f"Job '{job}' succeeded" in logs, logs[-6000:]

    status = ray_cli(ray_head, "job", "status", "--address", ray_head.dashboard, job)
    assert status.returncode == 0 and f"Job '{job}' succeeded" in status.stdout, status.stdout + status.stderr
    request = urllib.request.Request(f"{ray_head.dashboard}/api/jobs/{job}", headers={"Authorization": f"Bearer {ray_head.token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        details = json.load(response)
    assert details["status"] == "SUCCEEDED" and details["driver_exit_code"] == 0, details
    assert details["driver_info"], details  # the job's driver joined this cluster (no embedded Ray of its own)
    job_logs = ray_cli(ray_head, "job", "logs", "--address", ray_head.dashboard, job)
    assert job_logs.returncode == 0
    assert '"rows": 30' in job_logs.stdout  # the summary the job prints

    # The output, read with plain pyarrow.
    table = pq.read_table(output)
    assert table.num_rows == ROWS
    assert sorted(table["id"].to_pylist()) == ids.to_pylist()
    assert set(table["label"].to_pylist()) <= {"negative", "neutral", "positive"}
    assert table.schema.field("label_id").type == pa.int32()
    assert json.loads((output / "_summary.json").read_text())["rows"] == ROWS

    # The working dir that travelled is the repository without .venv (honours .gitignore): small.
    packages = [p for p in (ray_head.temp_dir / "session_latest" / "runtime_resources" / "working_dir_files").iterdir() if p.is_dir()]
    assert packages
    for package in packages:
        assert (package / "jobs" / "label.py").is_file()
        assert not (package / ".venv").exists()
        size = sum(f.stat().st_size for f in package.rglob("*") if f.is_file())
        assert size < 5 * 2**20, f"working dir upload is {size / 2**20:.1f} MiB"

    # The job server listens on loopback only, and nothing was told to bind every interface.
    assert not any("0.0.0.0" in arg for arg in ray_head.command)
    assert listening(ray_head.dashboard_port) == {"127.0.0.1"}
