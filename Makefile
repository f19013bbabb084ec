.PHONY: setup run test lint format train evaluate bench

setup:
	scripts/setup test

run:
	scripts/serve

test:
	scripts/test

lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

format:
	.venv/bin/ruff check --fix .
	.venv/bin/ruff format .

train:
	.venv/bin/python -m trainer train

evaluate:
	.venv/bin/python -m trainer evaluate

bench:
	scripts/setup bench
	.venv/bin/python scripts/bench.py --out bench-results.md
