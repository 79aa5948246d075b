"""Session set-up for every test file. Plain helpers (compose, protocol, CLI, BN randomizing) are in
tests/helpers.py.

One intra-op thread. On a 2-core machine that is also running something else, torch's default of
one OpenMP thread per core stalls at every parallel region waiting for the thread that lost its
core: with other work on the cores, DFQ on regnet_x_400mf at 16 bits took 33 s with 2 threads and
2.4 s with 1, CLE on efficientnet_lite0 28 s and 2.8 s, the whole default suite 640 s and 236 s.
OMP_NUM_THREADS is set before torch is imported (conftest.py is imported before any test file), so
the CLI subprocesses the tests start inherit it too; set it yourself to run the suite at another
thread count, e.g. ``OMP_NUM_THREADS=2 python -m pytest``. The committed sweeps ran the same way
(scripts/sweep_*.sh export OMP_NUM_THREADS=1).
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    yield
    torch.set_num_threads(before)
