"""Progress checkpoints of a long training stage, so that a stopped run resumes where it stopped.

With ``checkpoint_dir`` set, the runner hands a method ``ctx.checkpoint``: ``<checkpoint_dir>/<run_id>.pt``. A
stage made of independent units (GENIE-M: the blocks, reconstructed one after another) saves after every
finished unit what the later units need: the finished modules themselves (pickled whole, so that their
non-tensor attributes, the frozen activation quantizers' ranges, come back too), the method's report so far
and the seconds spent, next to a fingerprint of what the units depend on (the method, the unit names, a
digest of the calibration data). A rerun of the same run_id loads the file, checks the fingerprint and
continues after the last finished unit. Each GENIE-M block draws its randomness from generators seeded by
(seed, block index), so the resumed model is the uninterrupted one bit for bit (tests/test_checkpoint.py).
The row says ``resumed: {units_done, n_units, t_before_s}`` and its ``t_quant_s`` includes ``t_before_s``, the
seconds the earlier process(es) spent on the finished units. The runner deletes the file once the row is written.

Never fatal: the file is written atomically (``results.atomic_write``); one that cannot be written is one
warning and the run goes on without checkpoints; one that cannot be read or was made for other units or
data is one warning and the stage starts from its beginning. The file is a pickle (``torch.load`` with
``weights_only=False``): it is this machine's own cache of its own runs; do not load one from elsewhere.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from torch import Tensor

from dfq_bench.results import atomic_write

log = logging.getLogger(__name__)
FORMAT = 1


def tensor_digest(x: Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes."""
    h = hashlib.sha256(f"{x.dtype} {tuple(x.shape)}".encode())
    h.update(x.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Checkpoint:
    """The progress file of one run's stage; ``path`` None: no checkpoints (``load`` gives None, ``save`` does
    nothing)."""

    def __init__(self, path: str | Path | None, fingerprint: dict):
        self.path = None if path is None else Path(path)
        self.fingerprint = {"format": FORMAT, **fingerprint}
        self.broken = False  # a save failed: no more tries in this run

    def load(self, device: str | torch.device = "cpu") -> dict | None:
        """The saved progress (the keys given to ``save``), or None: no file, or one this run cannot use."""
        if self.path is None or not self.path.is_file():
            return None
        try:
            saved = torch.load(self.path, map_location=device, weights_only=False)
        except Exception as e:  # noqa: BLE001 - a torn or foreign file: start from the beginning
            log.warning("checkpoint %s cannot be read (%s: %s); starting from the beginning", self.path,
                        type(e).__name__, e)
            return None
        if not isinstance(saved, dict) or saved.get("fingerprint") != self.fingerprint:
            log.warning("checkpoint %s was made for other units or data; starting from the beginning", self.path)
            return None
        return saved

    def save(self, **progress) -> None:
        """Writes ``progress`` (picklable) with the fingerprint, atomically; a failure is one warning."""
        if self.path is None or self.broken:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, lambda tmp: torch.save({"fingerprint": self.fingerprint, **progress}, tmp))
        except (OSError, RuntimeError) as e:
            self.broken = True
            log.warning("checkpoint %s cannot be written (%s); the run goes on without checkpoints", self.path, e)
