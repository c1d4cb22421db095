"""Score a corpus: log-likelihood and perplexity per document (task `score`).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.score_corpus --model /models/lm --input s3://bucket/corpus/ --output s3://bucket/scores/ \
            --device cuda --concurrency 2

Causal-LM checkpoints give exact log-likelihoods; masked-LM checkpoints give pseudo-log-likelihoods.
Flags: `python -m jobs.score_corpus --help` (the same as `rayberta score`).
"""

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
