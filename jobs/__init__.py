"""Entry points: the `rayberta` CLI and the `python -m jobs.<job>` jobs for `ray job submit`."""
