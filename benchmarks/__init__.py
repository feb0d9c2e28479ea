"""Benchmarks of the project and their committed JSON results; not part of the installed package.

Run from the checkout root (``python -m benchmarks.retriever.cpu ...``); see benchmarks/README.md."""
