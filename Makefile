# Convenience targets. The real work is in scripts/ and bench/.
.PHONY: test demo bench bench-dist

PYTHON ?= .venv/bin/python
# make bench BENCH_ARGS="--sizes 64M,256M,1G --runs 5"
BENCH_ARGS ?=
# make bench-dist DIST_BENCH_ARGS="--images 16 --workers 1,2,4 --runs 5"
DIST_BENCH_ARGS ?=

test:
	bash scripts/test.sh

demo:
	bash scripts/demo.sh

bench:
	PYTHONPATH=. $(PYTHON) -m bench.copy_bench $(BENCH_ARGS)

bench-dist:
	PYTHONPATH=. $(PYTHON) -m bench.dist_bench $(DIST_BENCH_ARGS)
