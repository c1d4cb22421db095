"""What every Ray worker of a job on remote storage imports as it starts, before it can run a task:
Ray's `worker_process_setup_hook`, given in the job's runtime_env by `runner.init_ray`.

Why: Ray Data stops a failed job's running tasks with `ray.cancel`, a KeyboardInterrupt in the
worker. One that lands inside a worker's first import of a package (made while unpickling a task:
the job's filesystem, or Ray Data itself) leaves submodules in sys.modules without their package,
and the worker is broken for every later task of its driver. Seen in CI: after a job that failed
on purpose, every S3 task on one worker failed with "module aiohttp has no attribute
http_exceptions" (s3fs -> aiobotocore -> aiohttp). An interrupted `import ray.data` breaks the
same way (pandas: "partially initialized module").

Only jobs on remote storage get the hook. A job-level runtime_env makes Ray start new workers
instead of using the ones it prestarted. Measured here on a local 1,000-row classify job: 7 idle
workers instead of 3, and 2 s more (5,100 against 5,360 tokens/s, 3 alternating runs each). An
S3 job's start hides that cost. Besides, a CLI job is one run per Ray job: the hook guards drivers
that run again after a failure, such as a notebook using the Python API.
"""

from __future__ import annotations

import os

import fsspec

from pipeline.storage import is_local, protocols

FILESYSTEMS_VARIABLE = "RAYBERTA_WORKER_FILESYSTEMS"  # the fsspec protocols `setup` imports


def runtime_env(filesystems) -> dict | None:
    """The job-level runtime_env (`ray.init(runtime_env=...)`) whose workers run `setup` as they
    start, for a job on these fsspec filesystems: None when all are local."""
    remote = sorted({protocols(fs)[0] for fs in filesystems if not is_local(fs)})
    if not remote:
        return None
    return {"worker_process_setup_hook": f"{__name__}.setup", "env_vars": {FILESYSTEMS_VARIABLE: ",".join(remote)}}


def setup() -> None:
    import pyarrow.parquet  # noqa: F401 - what unpickling a Parquet read or write task imports
    import ray.data  # noqa: F401

    for protocol in os.environ[FILESYSTEMS_VARIABLE].split(","):
        fsspec.get_filesystem_class(protocol)
