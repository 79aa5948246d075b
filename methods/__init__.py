"""Quantizer plugins, one file per method; imported lazily as ``dfq_bench.methods.<name>``."""
