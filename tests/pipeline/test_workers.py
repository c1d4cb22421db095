"""The workers' start-up imports, as Ray runs the hook: in a new interpreter (a test of the hook
in a real Ray: tests/pipeline/test_runner.py)."""

import subprocess
import sys

import fsspec

from pipeline import workers


def test_the_hook_imports_ray_data_and_the_remote_filesystems_and_local_jobs_get_none():
    assert workers.runtime_env([fsspec.filesystem("file")]) is None
    env = workers.runtime_env([fsspec.filesystem("file"), fsspec.filesystem("s3", anon=True)])
    assert env["env_vars"] == {workers.FILESYSTEMS_VARIABLE: "s3"}
    module, function = env["worker_process_setup_hook"].rsplit(".", 1)  # what Ray does with it
    probe = f"import sys, {module}; {module}.{function}(); print('ray.data' in sys.modules, 's3fs.core' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env["env_vars"] | {"PATH": ""})
    assert result.stdout.split() == ["True", "True"], result.stderr[-2000:]
