# Convenience targets. The real work is in scripts/ and bench/.
.PHONY: test demo bench

PYTHON ?= .venv/bin/python
# make bench BENCH_ARGS="--sizes 64M,256M,1G --runs 5"
BENCH_ARGS ?=

test:
	bash scripts/test.sh

demo:
	bash scripts/demo.sh

bench:
	PYTHONPATH=. $(PYTHON) -m bench.copy_bench $(BENCH_ARGS)
