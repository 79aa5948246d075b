"""dfq_bench: one harness and one protocol for data-free quantization methods.

The Python API (``dfq_bench.api``): ``quantize``, ``make_calib``, ``evaluate``, ``build_method`` and
``protocol_config``, imported on first use so that ``import dfq_bench`` stays light.
"""

__version__ = "0.1.0"
_API = ("quantize", "make_calib", "evaluate", "build_method", "protocol_config")


def __getattr__(name: str):
    if name in _API:
        from dfq_bench import api

        return getattr(api, name)
    raise AttributeError(f"module 'dfq_bench' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API])
