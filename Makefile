# Convenience targets. The real work is in scripts/ and bench/.
.PHONY: test demo bench bench-dist bench-lifecycle bench-wan

PYTHON ?= .venv/bin/python
# make bench BENCH_ARGS="--sizes 64M,256M,1G --runs 5"
BENCH_ARGS ?=
# make bench-dist DIST_BENCH_ARGS="--images 16 --workers 1,2,4 --runs 5"
DIST_BENCH_ARGS ?=
# make bench-wan WAN_BENCH_ARGS="--repos 15 --tags 4 --small 1000" (needs: pip install -e '.[bench]' for the plot)
WAN_BENCH_ARGS ?=
# make bench-lifecycle LIFECYCLE_BENCH_ARGS="--tags 1000 --runs 3"
LIFECYCLE_BENCH_ARGS ?=

test:
	bash scripts/test.sh

demo:
	bash scripts/demo.sh

bench:
	PYTHONPATH=. $(PYTHON) -m bench.copy_bench $(BENCH_ARGS)

bench-dist:
	PYTHONPATH=. $(PYTHON) -m bench.dist_bench $(DIST_BENCH_ARGS)

bench-lifecycle:
	PYTHONPATH=. $(PYTHON) -m bench.lifecycle_bench $(LIFECYCLE_BENCH_ARGS)

bench-wan:
	PYTHONPATH=. $(PYTHON) -m bench.wan_bench $(WAN_BENCH_ARGS)
