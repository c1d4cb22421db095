"""Label a corpus with a sequence-classification checkpoint (task `classify`).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.label --model /models/sentiment --input s3://bucket/corpus/ --output s3://bucket/labels/ \
            --device cuda --concurrency 2

Scheduled runs are incremental: each run labels only input shards that are new or changed since
the last successful one (recorded in OUTPUT/_manifest/), so rerunning with nothing new is a quick
no-op, and a run killed half-way is finished by the next. A changed model is refused, never mixed.

On a GPU cluster whose GPU workers scale from zero (infra/), pass `--device cuda`: `auto` would
find no GPU when the job starts. With token auth (infra/), export RAY_AUTH_MODE=token and
RAY_AUTH_TOKEN before `ray job submit`.
Flags: `python -m jobs.label --help` (the same as `rayberta classify`).
"""

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["classify", *sys.argv[1:]]))
