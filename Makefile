# The two set-up commands of the README. Each one installs what it needs into .venv first.
#   make demo   runs the main job on real data with a real model
#   make test   runs the test suite (CI calls exactly this)
PY := .venv/bin/python

.venv/installed: pyproject.toml
	python3 -m venv .venv
	# torch first, pinned: the local CPU wheel. A bare `torch` would pull a multi-GB CUDA build.
	# Where pip sees only PyPI: make TORCH_FROM='--index-url https://download.pytorch.org/whl/cpu' ...
	.venv/bin/pip install -q torch==2.13.0 $(TORCH_FROM)
	.venv/bin/pip install -q -e '.[test]'
	touch $@

demo: .venv/installed
	$(PY) -m jobs.demo

# Every CPU test, the slow fault-injection ones included (a bare `pytest` skips those: -m in
# pyproject's addopts). pytest exits 5 when it collects no test: a failure of the suite, not a pass.
test: .venv/installed
	$(PY) -m pytest -m 'not gpu'

.PHONY: demo test
