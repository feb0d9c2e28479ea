"""Retriever benchmarks: CPU (ours against batching off or Search-R1's own server), GPU (the torch backend
against its floors, its fp32 reference, and through HTTP), and their synthetic data and load generator."""
