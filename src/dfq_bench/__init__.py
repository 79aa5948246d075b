"""dfq_bench: one harness and one protocol for data-free quantization methods."""

__version__ = "0.1.0"
