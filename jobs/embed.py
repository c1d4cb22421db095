"""Embed a corpus with the base model (task `embed`).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.embed --model /models/all-MiniLM-L6-v2 --input s3://bucket/corpus/ --output s3://bucket/embeddings/ --normalize \
            --device cuda --concurrency 2

Flags: `python -m jobs.embed --help` (the same as `rayberta embed`).
"""

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))
