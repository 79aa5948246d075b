"""Progress checkpoints of long stages, so that a stopped run resumes where it stopped, with the result an
uninterrupted run gives, bit for bit (tests/test_checkpoint.py). Two users:

- BN-statistics calibration data (``data=zeroq|genie``, calib/bnstats.py), when the synthetic-data cache is on:
  after every finished batch, the batches so far and the state of the one seeded generator every draw comes
  from go to ``synth/<name>-<key>.partial.pt`` beside the cache entry they will make (calib/cache.py); a rerun
  continues at the next batch. The entry's ``data_info`` says ``resumed: {batches_done, t_before_s}``, its
  ``t_generate_s`` and the row's ``t_synth_s`` include the earlier part, and the partial file is removed once the
  entry is written.
- GENIE-M (methods/genie.py), with ``checkpoint_dir`` set: the runner hands the method ``ctx.checkpoint``
  (``<checkpoint_dir>/<run_id>.pt``). After every reconstructed block it saves the finished modules themselves
  (pickled whole, so that their non-tensor attributes, the frozen activation quantizers' ranges, come back
  too), its report so far and the seconds spent; a rerun of the run_id continues after the last finished block
  (each block draws its randomness from generators seeded by (seed, block index)). The row says ``resumed:
  {units_done, n_units, t_before_s}`` and its ``t_quant_s`` includes ``t_before_s``; the runner deletes the
  file once the row is written.

Each file holds a fingerprint of what the saved work depends on (GENIE-M: its keys, the protocol, the seed, every
layer's bits, digests of the float weights and of the calibration data, the block names; the data: the cache
key) and is used only by a run that has the same. Never fatal: a
file is written atomically (``results.atomic_write``); one that cannot be written is one warning and the run
goes on without checkpoints; one that cannot be read or does not match is one warning and the stage starts from
its beginning. The files are pickles (``torch.load`` with ``weights_only=False``): this machine's own cache of
its own runs; do not load one from elsewhere.
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
    nothing). ``warn_unwritable`` False: a failed save is logged at debug level only (the synthetic-data cache,
    whose own entry write then gives the one warning about the unwritable directory)."""

    def __init__(self, path: str | Path | None, fingerprint: dict, warn_unwritable: bool = True):
        self.path = None if path is None else Path(path)
        self.fingerprint = {"format": FORMAT, **fingerprint}
        self.warn_unwritable = warn_unwritable
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
            log.log(logging.WARNING if self.warn_unwritable else logging.DEBUG,
                    "checkpoint %s cannot be written (%s); the run goes on without checkpoints", self.path, e)
