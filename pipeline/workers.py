"""What every Ray worker of a job imports as it starts, before it can run a task: Ray's
`worker_process_setup_hook`, given in the job's runtime_env by `runner.init_ray`.

Why: Ray Data stops a failed job's running tasks with `ray.cancel`, a KeyboardInterrupt in the
worker. One that lands inside a pooled worker's first import of a package (made while unpickling
a task: Ray Data itself, or the job's filesystem) leaves submodules in sys.modules without their
package, and the worker is broken for every later task until the cluster restarts. Seen in CI:
after a job that failed on purpose, every S3 task on one worker failed with "module aiohttp has no
attribute http_exceptions" (s3fs -> aiobotocore -> aiohttp). `import ray.data` interrupted at
the wrong moment breaks the same way (pandas, "partially initialized module"). A worker imports
all of these for its first task anyway, so importing them at start costs nothing more.
"""

from __future__ import annotations

import os

import fsspec

from pipeline.storage import is_local

FILESYSTEMS_VARIABLE = "RAYBERTA_WORKER_FILESYSTEMS"  # the fsspec protocols `setup` imports


def runtime_env(filesystems=()) -> dict:
    """The job-level runtime_env (`ray.init(runtime_env=...)`) whose workers run `setup` as they
    start; filesystems: the job's fsspec filesystems (local ones need no import)."""
    protocols = sorted({fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0] for fs in filesystems if not is_local(fs)})
    return {"worker_process_setup_hook": f"{__name__}.setup", "env_vars": {FILESYSTEMS_VARIABLE: ",".join(protocols)}}


def setup() -> None:
    import pyarrow.parquet  # noqa: F401 - what unpickling a Parquet read or write task imports
    import ray.data  # noqa: F401

    for protocol in filter(None, os.environ.get(FILESYSTEMS_VARIABLE, "").split(",")):
        fsspec.get_filesystem_class(protocol)
