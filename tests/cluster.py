"""Real Ray nodes for tests, started with `ray start` apart from the in-process cluster of the
other tests (`ray_session`): their own temp dir (so their `ray_current_cluster` file is not the one a
plain `ray.init()` reads), their own ports, their own auth token. Each node runs as `ray start
--block` in a process group of its own, which teardown ends (SIGTERM, then SIGKILL of the group
and of any process still naming its temp dir or GCS port). Never `ray stop`: it kills every Ray
process on the machine, other tests' clusters too.

Only the dashboard (the job server) can be bound to loopback: Ray turns --node-ip-address=127.0.0.1
into the machine's routable address and its GCS / raylet / worker gRPC ports listen on every
interface (Ray 2.60, whatever the flags), so a real cluster relies on token auth and a firewall
(infra/README.md). The dashboard needs `ray[default]`.
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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the virtualenv's bin: `ray`, and the `python` jobs run
RAY = str(BIN / "ray")


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


@contextmanager
def head_node(num_cpus: int = 2, object_store_bytes: int | None = None):
    """A Ray head node with the dashboard (and so the job server) bound to 127.0.0.1 only."""
    root = Path(tempfile.mkdtemp(prefix="rb-head-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    temp_dir = root / "ray"
    gcs, dashboard, client, agent = free_ports(4)
    command = [
        RAY, "start", "--head", "--block",
        "--node-ip-address=127.0.0.1", f"--port={gcs}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
        f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ] + ([f"--object-store-memory={object_store_bytes}"] if object_store_bytes else [])  # fmt: skip
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
        head = Head(url, dashboard, gcs, temp_dir, command, env, token)
        wait_for_nodes(head, 1)  # the head's own raylet registers a moment after the dashboard is up
        yield head
    finally:
        stop(proc, temp_dir, gcs)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def ray_cli(head: Head, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], cwd=REPO, env=head.env, capture_output=True, text=True, timeout=timeout)


@contextmanager
def worker_node(head: Head, num_cpus: int, object_store_bytes: int | None = None):
    """A node joining `head` (on this machine, its own ports), yielded once the head counts it;
    `kill_node` kills it like a lost machine. On exit it is stopped, and the head has seen it go,
    so that no later job is placed on a node that is dead but not yet noticed (GCS health checks
    take ~15 s to notice a SIGKILLed raylet)."""
    before = alive_nodes(head)
    manager, objects = free_ports(2)
    command = [RAY, "start", "--block", f"--address=127.0.0.1:{head.gcs_port}", "--node-ip-address=127.0.0.1",
               f"--num-cpus={num_cpus}", f"--node-manager-port={manager}", f"--object-manager-port={objects}",
               "--disable-usage-stats"] + ([f"--object-store-memory={object_store_bytes}"] if object_store_bytes else [])  # fmt: skip
    log = open(head.temp_dir.parent / f"worker-{manager}.log", "w")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=head.env, start_new_session=True)
    proc.node_manager_port = manager
    try:
        wait_for_nodes(head, before + 1)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()  # `ray start --block` stops its node cleanly on SIGTERM
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        kill_node(proc)
        wait_for_nodes(head, before)
        log.close()


def kill_node(proc: subprocess.Popen) -> None:
    """SIGKILL a node started by `worker_node`: its `ray start`, raylet, object store and workers."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    mark = f"--node-manager-port={proc.node_manager_port}"  # raylet and workers name their node's port
    for pid, cmd in processes().items():
        if mark in cmd and pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    proc.wait(timeout=10)


def alive_nodes(head: Head) -> int:
    """Nodes the head counts as alive (Ray's state API on the dashboard)."""
    request = urllib.request.Request(f"{head.dashboard}/api/v0/nodes?limit=1000", headers={"Authorization": f"Bearer {head.token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        nodes = json.load(response)["data"]["result"]["result"]
    return sum(n["state"] == "ALIVE" for n in nodes)


def wait_for_nodes(head: Head, n: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while alive_nodes(head) != n:
        assert time.monotonic() < deadline, f"the cluster did not reach {n} alive nodes"
        time.sleep(1)


def workers_of(head: Head, title: str) -> list[int]:
    """Pids of this cluster's worker processes whose title starts with `title` (e.g. an actor
    class): they inherited the cluster's own auth token, other clusters on the machine did not."""
    mine = f"RAY_AUTH_TOKEN={head.token}".encode()
    found = []
    for pid, cmd in processes().items():
        if cmd and cmd[0].startswith(title):
            try:
                if mine in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    found.append(pid)
            except OSError:
                pass
    return found

