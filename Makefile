# Shortcuts for the README commands (the scripts need only Python).
.PHONY: demo test lint
demo:
	python3 scripts/demo.py
test:
	python3 scripts/test.py
lint:
	.venv/bin/ruff check .
