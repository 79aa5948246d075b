"""The run path: the runner (``runner.py``: one run, its phases timed, its row), the CLI (``cli.py``),
the done-index that resumes sweeps (``sweep.py``), the FP32 evaluation cache (``evalcache.py``) and
the row mirrors (``loggers.py``)."""
