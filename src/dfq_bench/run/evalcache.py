"""Cache of the FP32 model's evaluation outputs, so a sweep runs each FP32 forward pass once.

The runner feeds every evaluation batch to the FP32 and the quantized model in one pass, because
the row's agreement and KL compare the two models' outputs image by image. Caching only the FP32
accuracy would therefore save nothing: the FP32 logits would still be needed. So the cache keeps
the FP32 *logits* (float32, in loader order) with the labels. On a hit the runner skips the FP32
forward and reads each batch's logits from the cache; top-1/top-5 FP32, agreement and KL are then
computed by the same code from the same numbers as on a miss (the logits are stored exactly).

The key is a hash of everything the FP32 logits depend on: the weights (sha256 of every tensor in
the state dict, so a retrained checkpoint under the same tag misses), the model label and its input
size and preprocessing, the dataset config and what the dataset factory reported (root, limit,
batch size: batch composition can change the last bits of a float result), the device and the torch
version. The labels are stored too and checked batch by batch; a mismatch is an error, never a
silent reuse. Size: n_eval x num_classes x 4 bytes (10,000 x 10 = 0.4 MB; ImageNet val 200 MB).

Entries are written by temp file + rename, so concurrent jobs at worst compute the same entry twice.
The cache never fails a run: an entry that is unreadable or not one of ours (a torn file, another
key's entry, wrong shapes) is recomputed and overwritten, and a cache that cannot be written (a
read-only directory, a file in its place, a full disk) gives one warning and the run goes on.
A row says ``eval_cache: "hit" | "miss"`` (null when ``eval_cache`` is off); on a hit its
``t_eval_fp32_s`` is the time measured when the entry was made.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from dfq_bench.results import atomic_write

log = logging.getLogger(__name__)


@dataclass
class FP32Outputs:
    logits: Tensor  # (n_eval, num_classes) float32, loader order
    labels: Tensor  # (n_eval,) int64
    t_eval_fp32_s: float  # time of the FP32 forward passes when the entry was made


def weights_sha256(model: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every parameter and buffer."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class EvalCache:
    """One cache entry: ``directory/<key>.pt``."""

    def __init__(self, directory: str | Path, key_fields: dict):
        self.key_fields = key_fields
        blob = json.dumps(key_fields, sort_keys=True, default=str)
        self.key = hashlib.sha256(blob.encode()).hexdigest()[:24]
        self.path = Path(directory).expanduser() / f"{self.key}.pt"  # ~/...: as a row's command writes it

    @classmethod
    def for_run(cls, directory: str | Path, model_label: str, built, dataset_cfg: dict, dataset_info: dict,
                device: str) -> EvalCache:
        fields = {
            "weights_sha256": weights_sha256(built.model),
            "model": model_label,
            "input_size": list(built.input_size),
            "num_classes": built.num_classes,
            "preprocess": asdict(built.preprocess),
            "dataset": dataset_cfg,
            "dataset_info": {k: v for k, v in dataset_info.items() if k != "view_cache"},  # hit or miss: not the data
            "device": device,
            "torch": torch.__version__,
        }
        return cls(directory, fields)

    def load(self) -> FP32Outputs | None:
        """The entry, or None when there is none (also when the cache directory cannot exist, e.g. a
        file in its place: ``save`` then says why) or it is unreadable or foreign (with a warning)."""
        try:
            blob = torch.load(self.path, map_location="cpu", weights_only=True)
            return self._check(blob)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except Exception as e:  # a torn or foreign file: recompute and overwrite it
            log.warning("eval cache entry %s unreadable (%s: %s); recomputing", self.path, type(e).__name__, e)
            return None

    def _check(self, blob) -> FP32Outputs:
        if not isinstance(blob, dict):
            raise ValueError(f"a {type(blob).__name__}, not an entry")
        if blob.get("key_fields") != json.dumps(self.key_fields, sort_keys=True, default=str):
            raise ValueError("made for another key")
        logits, labels, t = blob.get("logits"), blob.get("labels"), blob.get("t_eval_fp32_s")
        if not (isinstance(logits, Tensor) and isinstance(labels, Tensor) and isinstance(t, (int, float))
                and logits.is_floating_point() and not labels.is_floating_point() and logits.dim() == 2
                and labels.dim() == 1 and len(logits) == len(labels)
                and logits.shape[1] == self.key_fields.get("num_classes", logits.shape[1])):
            raise ValueError("unexpected contents")
        return FP32Outputs(logits, labels, float(t))

    def save(self, out: FP32Outputs) -> bool:
        """Writes the entry; returns False, with one warning, when it cannot be written (the run
        keeps its result). atomic_write leaves no partial entry."""
        blob = {"logits": out.logits, "labels": out.labels, "t_eval_fp32_s": out.t_eval_fp32_s,
                "key_fields": json.dumps(self.key_fields, sort_keys=True, default=str)}
        try:
            atomic_write(self.path, lambda tmp: torch.save(blob, tmp))
        except Exception as e:  # OSError, or torch.save's RuntimeError for a file it cannot open
            log.warning("cannot write eval cache entry %s (%s: %s); the run goes on without it",
                        self.path, type(e).__name__, e)
            return False
        return True
