"""`ray job submit` of `python -m jobs.label` to a real Ray head node started with `ray start`.

The head node is separate from the in-process cluster of the other tests (`ray_session`): its own
temp dir (so its `ray_current_cluster` file is not the one a plain `ray.init()` reads), its own
ports, its own auth token, and it runs as `ray start --block` in a process group of its own, which
teardown ends (SIGTERM, then SIGKILL of the group and of any process still naming its temp dir or
GCS port). Never `ray stop`: it kills every Ray process on the machine, other tests' clusters too.

Only the dashboard (the job server) can be bound to loopback: Ray turns --node-ip-address=127.0.0.1
into the machine's routable address and its GCS / raylet / worker gRPC ports listen on every
interface (Ray 2.60, whatever the flags), so a real cluster relies on token auth (its default) and a firewall.
The dashboard needs `ray[default]`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the virtualenv's bin: `ray`, and the `python` the job runs
RAY = str(BIN / "ray")
ROWS = 30


@dataclass
class Head:
    dashboard: str  # http://127.0.0.1:PORT, the job server
    dashboard_port: int
    gcs_port: int
    temp_dir: Path
    command: list[str]
    env: dict[str, str]
    token: str  # this cluster's auth token (Ray's token auth is on by default)


def free_ports(n: int) -> list[int]:
    """n distinct ports free on every interface right now (the sockets are held until all are picked)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def http_status(url: str, token: str | None = None) -> int | None:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def processes() -> dict[int, list[str]]:
    """pid -> command line of every live (not zombie) process, from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            found[int(entry.name)] = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except (OSError, IndexError):
            pass
    return found


def listening(port: int) -> set[str]:
    """Addresses with a TCP socket listening on `port`, from /proc/net/tcp{,6}."""
    addresses = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # host-order 32-bit words
            ip = socket.inet_ntop(family, raw)
            addresses.add(ip.removeprefix("::ffff:"))
    return addresses


def stop(proc: subprocess.Popen, temp_dir: Path, gcs_port: int) -> None:
    """End the head node and everything it started, and nothing else."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` shuts its processes down on SIGTERM
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of its process group (a session of its own)
    except (ProcessLookupError, PermissionError):
        pass
    def named_ours(arg: str) -> bool:  # workers name the temp dir; the client server, the GCS address
        return str(temp_dir) in arg or arg.endswith(f":{gcs_port}")

    ours = lambda: [pid for pid, cmd in processes().items() if pid != os.getpid() and any(map(named_ours, cmd))]  # noqa: E731
    deadline = time.monotonic() + 15
    while (left := ours()) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    assert not ours(), f"head node processes still alive: {ours()}"


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head node with the dashboard (and so the job server) bound to 127.0.0.1 only."""
    root = Path(tempfile.mkdtemp(prefix="rb-head-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    temp_dir = root / "ray"
    gcs, dashboard, client, agent = free_ports(4)
    command = [
        RAY, "start", "--head", "--block",
        "--node-ip-address=127.0.0.1", f"--port={gcs}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
        "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    # Token auth (Ray's default) with a token of this cluster's own, not ~/.ray/auth_token.
    token = uuid.uuid4().hex
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is this virtualenv's
    env["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # SIGTERM: stop at once, no 30 s drain
    log = open(root / "ray_start.log", "w")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while http_status(f"{url}/api/jobs/", token) != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                text = (root / "ray_start.log").read_text()
                hint = "\nThe dashboard (job server) needs ray[default]." if "missing packages" in text else ""
                pytest.fail(f"ray start did not come up (exit {proc.poll()}):\n{text[-4000:]}{hint}")
            time.sleep(0.5)
        assert http_status(f"{url}/api/jobs/") == 401  # no token, no job API
        yield Head(url, dashboard, gcs, temp_dir, command, env, token)
    finally:
        stop(proc, temp_dir, gcs)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def ray_cli(head: Head, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], cwd=REPO, env=head.env, capture_output=True, text=True, timeout=timeout)


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
