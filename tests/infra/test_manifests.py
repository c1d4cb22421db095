"""infra/: every manifest parses, and what it names exists: the images this repository builds (or
Ray's, at the installed Ray version), `python -m jobs.X` commands the CLI accepts, repository paths;
and the cluster keeps the promises of infra/README.md: token auth, a job server off the public
network, one scheduled run at a time, no credentials in files.

Nothing here applies a manifest or builds the image (no cluster, no Docker in the tests).
"""

from __future__ import annotations

import copy
import re
import runpy
import shlex
import sys
import tomllib
from pathlib import Path

import pytest
import ray
import yaml

import jobs.cli

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
LAUNCHER = INFRA / "cluster-launcher.yaml"
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
IMAGE = re.compile(rf"rayberta:{re.escape(PROJECT['project']['version'])}-(cpu|cu\d+)")
RAY_IMAGE = re.compile(rf"rayproject/ray:{re.escape(ray.__version__)}-py311(-gpu)?")
KINDS = {
    "RayCluster": "ray.io/v1", "RayJob": "ray.io/v1", "CronJob": "batch/v1",
    "NetworkPolicy": "networking.k8s.io/v1", "ServiceAccount": "v1", "PersistentVolumeClaim": "v1",
}  # fmt: skip
RAY_PORTS = {"6379", "8265", "10001"}  # GCS, job server, Ray client

KUBE = [(p, doc) for p in sorted((INFRA / "kuberay").glob("*.yaml")) for doc in yaml.safe_load_all(p.read_text())]
LAUNCH = yaml.safe_load(LAUNCHER.read_text())


def of_kind(kind: str) -> list[dict]:
    return [doc for _, doc in KUBE if doc["kind"] == kind]


def walk(node):
    """Every (key, value) pair of a parsed YAML tree, depth first."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


def ray_clusters() -> list[tuple[str, dict]]:
    """(name, RayClusterSpec) of the RayCluster and of the cluster each RayJob creates."""
    return [(d["metadata"]["name"], d["spec"]) for d in of_kind("RayCluster")] + [
        (d["metadata"]["name"], d["spec"]["rayClusterSpec"]) for d in of_kind("RayJob")
    ]


def ray_containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


def env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def dockerfile() -> tuple[str, list[str]]:
    """The Dockerfile's text with its ARG defaults substituted, and its logical lines."""
    text = (INFRA / "Dockerfile").read_text()
    for name, default in re.findall(r"^ARG (\w+)=(\S+)", text, re.M):
        text = text.replace(f"${{{name}}}", default)
    lines = [line.strip() for line in text.replace("\\\n", " ").splitlines()]
    return text, [line for line in lines if line and not line.startswith("#")]


def job_commands(words: list[str]):
    """(module, args) of each `python -m jobs.MODULE ARGS...` in a command line, quoted ones included."""
    for i, word in enumerate(words):
        if words[i : i + 2] == ["python", "-m"] and i + 2 < len(words) and words[i + 2].startswith("jobs."):
            yield words[i + 2].removeprefix("jobs."), words[i + 3 :]
        elif " " in word and "python -m jobs." in word:  # e.g. the command `ray exec` runs
            yield from job_commands(shlex.split(word))


def all_job_commands() -> list[tuple[str, str, list[str]]]:
    """(where, module, args) for every job command in the manifests and in infra/README.md."""
    found = []
    for path, doc in KUBE:
        for _, value in walk(doc):
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                found += [(path.name, *c) for c in job_commands(value)]
            elif isinstance(value, str) and "python -m jobs." in value:
                found += [(path.name, *c) for c in job_commands(shlex.split(value))]
    for block in re.findall(r"^```\w*\n(.*?)^```", (INFRA / "README.md").read_text(), re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if "python -m jobs." in line:
                found += [("README.md", *c) for c in job_commands(shlex.split(line, comments=True))]
    return found


def cli_argv(module: str, args: list[str], monkeypatch) -> list[str]:
    """The argv `python -m jobs.MODULE ARGS` hands to jobs.cli.main, by running the module with main replaced."""
    calls = []
    monkeypatch.setattr(jobs.cli, "main", lambda argv=None: calls.append(argv) or 0)
    monkeypatch.setattr(sys, "argv", [f"jobs/{module}.py", *args])
    with pytest.raises(SystemExit):
        runpy.run_module(f"jobs.{module}", run_name="__main__")
    return calls[0]


def test_every_manifest_parses_into_a_known_kind():
    assert set(INFRA.rglob("*.y*ml")) == {p for p, _ in KUBE} | {LAUNCHER}  # no file left unchecked
    for path, doc in KUBE:
        assert KINDS.get(doc["kind"]) == doc["apiVersion"], f"{path.name}: unexpected {doc['apiVersion']} {doc['kind']}"
        assert doc["metadata"]["namespace"] == "rayberta", path.name
    assert {"RayCluster", "RayJob", "CronJob", "NetworkPolicy"} <= {doc["kind"] for _, doc in KUBE}


def test_cluster_launcher_passes_rays_own_checks():
    from ray.autoscaler._private.util import prepare_config, validate_config  # what `ray up` runs before any cloud call

    validate_config(prepare_config(copy.deepcopy(LAUNCH)))
    assert any(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in LAUNCH["available_node_types"].values())


def test_images_are_ours_or_rays_at_the_installed_version():
    images = [(p.name, v) for p, doc in KUBE for k, v in walk(doc) if k == "image"]
    images += [(LAUNCHER.name, v) for k, v in walk(LAUNCH) if k in ("image", "head_image", "worker_image")]
    text, lines = dockerfile()
    images += [("Dockerfile", line.split()[1]) for line in lines if line.startswith("FROM ")]
    assert len(images) > 5
    for where, image in images:
        assert IMAGE.fullmatch(image) or RAY_IMAGE.fullmatch(image), f"{where}: image {image}"
    assert {spec["rayVersion"] for _, spec in ray_clusters()} == {ray.__version__}
    # Version pins of the installs match the Makefile's torch and the installed Ray.
    torch_pin = re.search(r"torch==([\w.]+)", (REPO / "Makefile").read_text())[1]
    installs = text + "\n".join(LAUNCH["setup_commands"])
    assert set(re.findall(r"torch==([\w.]+)", installs)) == {torch_pin}
    assert set(re.findall(r"ray\[[\w,]+\]==([\w.]+)", installs)) == {ray.__version__}


def test_dockerfile_and_launcher_ship_what_the_package_needs():
    _, lines = dockerfile()
    sources = [word for line in lines if line.startswith("COPY ") for word in line.split()[1:-1] if not word.startswith("--")]
    needed = {*PROJECT["tool"]["setuptools"]["packages"], "pyproject.toml", PROJECT["project"]["readme"]}
    assert set(sources) == needed
    # The launcher syncs the whole checkout as one folder, less what .gitignore names.
    assert {local for local in LAUNCH["file_mounts"].values() if not local.startswith("~")} == {"."}
    assert LAUNCH["rsync_filter"] == [".gitignore"]
    ignored = (REPO / ".gitignore").read_text().split()
    assert not any(path.strip("/") in (i.strip("/") for i in ignored) for path in needed)
    for path in needed:
        assert (REPO / path).exists(), path


def test_job_commands_are_accepted_by_the_cli(monkeypatch):
    commands = all_job_commands()
    assert {"label", "score_corpus"} <= {module for _, module, _ in commands}  # the CronJob's and the RayJob's
    for where, module, args in commands:
        assert (REPO / "jobs" / f"{module}.py").is_file(), f"{where}: no module jobs.{module}"
        argv = cli_argv(module, args, monkeypatch)
        try:
            jobs.cli.parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"{where}: the CLI rejects `python -m jobs.{module} {shlex.join(args)}` (argparse's error above)")


def test_models_are_mounted_where_the_jobs_read_them():
    (cluster,), (job,) = of_kind("RayCluster"), of_kind("RayJob")
    runs_on = {"cronjob.yaml": cluster["spec"], "rayjob.yaml": job["spec"]["rayClusterSpec"]}  # driver and actors
    commands = [(where, args) for where, _, args in all_job_commands() if where in runs_on]
    assert len(commands) == 2
    for where, args in commands:
        model = args[args.index("--model") + 1]
        for container in ray_containers(runs_on[where]):
            mounts = [m["mountPath"].rstrip("/") + "/" for m in container.get("volumeMounts", [])]
            assert any(model.startswith(m) for m in mounts), f"{where}: {model} is not mounted in {container['name']}"


def test_gpu_groups_request_gpus_and_run_a_cuda_image():
    for name, spec in ray_clusters():
        gpu = [c for c in ray_containers(spec) if "nvidia.com/gpu" in c["resources"].get("limits", {})]
        assert gpu, f"{name}: no worker group requests nvidia.com/gpu"
        for container in gpu:
            assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
            assert re.search(r"-cu\d+$", container["image"]), f"{name}: GPU pods need a CUDA image"


def test_job_server_is_not_public():
    policies = of_kind("NetworkPolicy")
    for name, spec in ray_clusters():
        head = spec["headGroupSpec"]
        assert head["serviceType"] == "ClusterIP", name
        if head["rayStartParams"].get("dashboard-host") == "0.0.0.0":
            # Listening on the pod network is then fenced by a policy that admits named sources only.
            labels = head["template"]["metadata"]["labels"]
            fences = [p for p in policies if p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()]
            assert fences, f"{name}: job server on 0.0.0.0 with no NetworkPolicy selecting the head"
            for policy in fences:
                assert "Ingress" in policy["spec"]["policyTypes"]
                for rule in policy["spec"]["ingress"]:
                    assert rule.get("from") and not any("ipBlock" in peer for peer in rule["from"]), rule
    start = " ".join(LAUNCH["head_start_ray_commands"] + LAUNCH["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "0.0.0.0" not in start
    for rule in LAUNCH["provider"].get("security_group", {}).get("IpPermissions", []):
        assert not {str(rule.get("FromPort")), str(rule.get("ToPort"))} & RAY_PORTS, rule


def test_token_auth_on_every_cluster_and_submitter():
    secrets = set()
    for name, spec in ray_clusters():
        if spec.get("authOptions", {}).get("mode") == "token":
            continue  # KubeRay generates the token and sets it on every pod, submitter included
        autoscaler = [spec["autoscalerOptions"]] if spec.get("enableInTreeAutoscaling") else []
        for container in [*ray_containers(spec), *autoscaler]:
            variables = env(container)
            assert variables["RAY_AUTH_MODE"]["value"] == "token", name
            secrets.add(str(variables["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]))
    for cronjob in of_kind("CronJob"):
        for container in cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]:
            variables = env(container)
            assert variables["RAY_AUTH_MODE"]["value"] == "token"
            secrets.add(str(variables["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]))
    assert len(secrets) == 1, f"the cluster and its submitters should share one token secret: {secrets}"
    for command in LAUNCH["head_start_ray_commands"] + LAUNCH["worker_start_ray_commands"]:
        assert "ray start" not in command or "RAY_AUTH_MODE=token ray start" in command, command
    assert "~/.ray/auth_token" in LAUNCH["file_mounts"]


def test_no_credentials_in_infra():
    for path, doc in KUBE:
        assert doc["kind"] != "Secret", f"{path.name}: secrets are created by hand, never committed"
        for key, value in walk(doc):
            if key == "env":
                for variable in value:
                    if re.search(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY|CREDENTIAL", variable["name"]):
                        assert "value" not in variable, f"{path.name}: {variable['name']} must come from a secret"
    for path in [p for p in INFRA.rglob("*") if p.is_file()]:
        text = path.read_text()
        assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), f"{path}: an AWS access key id"
        assert not re.search(r"(?i)aws_secret_access_key\W{1,4}[A-Za-z0-9/+]{40}", text), f"{path}: an AWS secret key"


def test_cronjob_runs_one_at_a_time_against_the_cluster():
    (cronjob,) = of_kind("CronJob")
    (cluster,) = of_kind("RayCluster")
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    (container,) = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    assert command[:3] == ["ray", "job", "submit"]
    name, namespace = cluster["metadata"]["name"], cluster["metadata"]["namespace"]
    ports = {p["name"]: p["containerPort"] for p in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert command[command.index("--address") + 1] == f"http://{name}-head-svc.{namespace}.svc.cluster.local:{ports['dashboard']}"


def test_pods_name_volumes_and_accounts_defined_here():
    claims = {d["metadata"]["name"] for d in of_kind("PersistentVolumeClaim")}
    accounts = {d["metadata"]["name"] for d in of_kind("ServiceAccount")}
    for path, doc in KUBE:
        for key, value in walk(doc):
            if key == "persistentVolumeClaim":
                assert value["claimName"] in claims, f"{path.name}: no PVC {value['claimName']}"
            if key == "serviceAccountName":
                assert value in accounts, f"{path.name}: no ServiceAccount {value}"
