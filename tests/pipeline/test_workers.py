"""The workers' start-up imports, as Ray runs the hook: in a new interpreter (a test of the hook
in a real Ray: tests/pipeline/test_runner.py)."""

import subprocess
import sys

import fsspec

from pipeline import workers


def test_the_hook_imports_ray_data_and_only_remote_filesystems():
    for filesystems, protocols, s3fs in [([fsspec.filesystem("file")], "", False),
                                         ([fsspec.filesystem("file"), fsspec.filesystem("s3", anon=True)], "s3", True)]:  # fmt: skip
        env = workers.runtime_env(filesystems)
        assert env["env_vars"] == {workers.FILESYSTEMS_VARIABLE: protocols}
        module, function = env["worker_process_setup_hook"].rsplit(".", 1)  # what Ray does with it
        probe = f"import sys, {module}; {module}.{function}(); print('ray.data' in sys.modules, 's3fs.core' in sys.modules)"
        result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env["env_vars"] | {"PATH": ""})
        assert result.stdout.split() == ["True", str(s3fs)], result.stderr[-2000:]
