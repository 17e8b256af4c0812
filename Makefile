# The two README commands. Both install what is missing first (seconds when already set up).
.PHONY: setup run test lint mutate

setup:
	@bash scripts/setup.sh

run: setup
	.venv/bin/lmforge generate "Men on the moon" --max-length 40 --temperature 0.9 --num-return-sequences 10 --do-sample

test: setup
	.venv/bin/ruff check src tests benchmarks scripts examples
	.venv/bin/python -m pytest

lint: setup
	.venv/bin/ruff check src tests benchmarks scripts examples

# Mutation testing of the training step's core (scripts/mutate.sh; timing and survivors in docs/testing.md).
mutate: setup
	bash scripts/mutate.sh
