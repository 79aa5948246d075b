"""ImageNet classifiers from torchvision (``resnet18``, ``resnet50``, ``mobilenet_v2``,
``inception_v3``, and any torchvision classification model by name: ``model=torchvision
model.name=<arch>``) and any timm architecture (``model=timm model.name=<arch>``).

``model.weights`` chooses the parameters, and its identity is recorded in the row:

- ``null``: random initialisation from the torch RNG (the runner seeds it): ``"random-init"``.
- a path to a local state-dict file (``.pth``/``.pt``/``.bin``/``.safetensors``, plain or wrapped
  in ``{"state_dict": ...}``/``{"model": ...}``, ``module.`` prefixes stripped): ``"file:<path>
  sha256:<hash>"``. ``model.sha256`` (the full hash or a prefix of at least 8 hex digits) is
  checked before the file is read. The number of classes is read from the file's classifier, so a
  file fine-tuned on 10 classes builds a 10-class model.
- a library tag: torchvision's weight enum member (``IMAGENET1K_V1``, ``IMAGENET1K_V2``,
  ``DEFAULT``) or, for timm, ``pretrained`` (the architecture's default tag) or a timm pretrained
  tag (``a1_in1k``, same as ``model.name=resnet50.a1_in1k model.weights=pretrained``). The library
  downloads and caches the file (torch hub cache, Hugging Face cache); without network the run
  fails with a one-line error saying how to pass a local file instead.

Eval preprocessing comes from the weights where the library describes it (torchvision's
``weights.transforms()``, timm's ``pretrained_cfg``: crop_pct, interpolation, mean/std); otherwise
the torchvision V1 recipe: resize 256 / center-crop 224 (Inception: 342 / 299), bilinear,
ImageNet mean/std. ``model=torchvision`` with random init or a local file takes the preprocessing
(and so the input size) of the architecture's ``DEFAULT`` weights tag, read from torchvision's
weights enum without downloading anything.

Inception v3: torchvision's ImageNet weights were ported from TensorFlow and expect
``transform_input=True`` (the model re-normalises ImageNet-normalised input to [-1, 1] itself);
it is set whenever weights are loaded (tag or file). The auxiliary classifier is built only when
the weights contain it, so that loading is strict, and is dropped afterwards: eval returns plain
logits and the quantizers never see the aux branch.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import math
import os
import re
from pathlib import Path

import torch
from torch import nn

from dfq_bench.models import BuiltModel, Preprocess

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors", ".tar")
# (resize, crop) of the torchvision V1 recipe, and the classifier whose rows count the classes.
TORCHVISION = {
    "resnet18": (256, 224, "fc"),
    "resnet50": (256, 224, "fc"),
    "mobilenet_v2": (256, 224, "classifier.1"),
    "inception_v3": (342, 299, "fc"),
}


class WeightsError(RuntimeError):
    """Weights that cannot be found, downloaded, verified or loaded; the message says what to do."""


# ---------------------------------------------------------------------------------------------
# local weight files


_SHA256: dict[tuple, str] = {}


def _sha256_cache() -> Path:
    return Path(os.environ.get("DFQ_BENCH_CACHE") or Path.home() / ".cache" / "dfq_bench") / "sha256.json"


def sha256_file(path: str | Path) -> str:
    """The file's sha256, computed once per file: cached by (path, size, mtime) in the process and in
    ``$DFQ_BENCH_CACHE/sha256.json`` (a cache that cannot be read or written is only skipped)."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key in _SHA256:
        return _SHA256[key]
    cache_file, tag = _sha256_cache(), f"{key[0]}|{key[1]}|{key[2]}"
    try:
        disk = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        disk = {}
    digest = disk.get(tag) if isinstance(disk, dict) else None
    if not isinstance(digest, str):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest = h.hexdigest()
        try:
            from dfq_bench.results import atomic_write

            disk = {**(disk if isinstance(disk, dict) else {}), tag: digest}
            atomic_write(cache_file, lambda tmp: tmp.write_text(json.dumps(disk, sort_keys=True)))
        except Exception:  # only a cache
            pass
    _SHA256[key] = digest
    return digest


def check_sha256(path: Path, expected: str | None) -> str:
    """Returns the file's sha256; raises if ``expected`` (full hash or >= 8-digit prefix) differs."""
    if expected is not None and not re.fullmatch(r"[0-9a-fA-F]{8,64}", str(expected)):
        raise WeightsError(
            f"model.sha256={expected!r} is invalid; valid: the file's sha256 in hex (64 digits, "
            "or a prefix of at least 8)"
        )
    actual = sha256_file(path)
    if expected is not None and not actual.startswith(str(expected).lower()):
        raise WeightsError(
            f"checksum mismatch for {path}: sha256 is {actual}, model.sha256 expects {expected}; "
            "wrong or corrupted file (set model.sha256 to the right hash, or null to skip the check)"
        )
    return actual


def local_weights_path(weights: str) -> Path | None:
    """The path if ``weights`` names a file; None if it is a library tag. A value that looks like
    a path (has a separator or a weights suffix) but does not exist is an error."""
    path = Path(str(weights)).expanduser()
    if path.is_file():
        return path.resolve()
    if "/" in str(weights) or "\\" in str(weights) or path.suffix in WEIGHT_SUFFIXES:
        raise WeightsError(
            f"model.weights={weights!r}: no such file; valid: an existing state-dict file, a "
            "library pretrained tag, or null for random init"
        )
    return None


def read_state_dict(path: Path, expected_sha256: str | None) -> tuple[dict, str]:
    """Verifies and reads a state-dict file; returns (state dict, identity for the row)."""
    digest = check_sha256(path, expected_sha256)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"cannot read weights file {path}: {_first_line(e)}") from None
    for key in ("state_dict", "model", "model_state_dict"):  # common checkpoint wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} is not a state dict (a mapping of parameter names to tensors)")
    if obj and all(k.startswith("module.") for k in obj):  # saved from DataParallel
        obj = {k[len("module."):]: v for k, v in obj.items()}
    bad = next((k for k, v in obj.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise WeightsError(f"{path}: tensor {bad!r} holds NaN or Inf; valid: finite weights (a diverged or "
                           "corrupted checkpoint?)")
    return obj, f"file:{path} sha256:{digest}"


def classes_in(state_dict: dict, classifier: str, label: str) -> int:
    """Number of output classes stored in ``<classifier>.weight``."""
    w = state_dict.get(f"{classifier}.weight")
    if w is None:
        raise WeightsError(f"weights for {label} have no {classifier}.weight; wrong architecture?")
    return int(w.shape[0])


def load_strict(model: nn.Module, state_dict: dict, label: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error instead of torch's multi-line one."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if keys:
                shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
                parts.append(f"{len(keys)} {what} ({shown})")
        raise WeightsError(f"weights do not fit {label}: {'; '.join(parts)}")
    model.load_state_dict(state_dict, strict=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def require_file_for_checksum(cfg) -> None:
    if cfg.sha256 is not None:
        what = "null (random init)" if cfg.weights is None else f"the library tag {cfg.weights!r}"
        raise WeightsError(
            f"model.sha256 is set but model.weights is {what}; model.sha256 checks a local "
            "weights file only (libraries verify their own downloads)"
        )


# ---------------------------------------------------------------------------------------------
# torchvision


def build_torchvision(arch: str, cfg) -> BuiltModel:
    """One torchvision classifier; see the module docstring for ``model.weights``."""
    import torchvision

    resize, crop, classifier = TORCHVISION[arch]
    default_pre = Preprocess(resize=resize, crop=crop)
    inception = arch == "inception_v3"
    if cfg.weights is None:
        require_file_for_checksum(cfg)
        kwargs = {"aux_logits": False, "init_weights": True} if inception else {}
        model = torchvision.models.get_model(arch, weights=None, **kwargs)
        return BuiltModel(model.eval(), (3, crop, crop), 1000, "random-init", default_pre)

    path = local_weights_path(cfg.weights)
    if path is not None:
        sd, identity = read_state_dict(path, cfg.sha256)
        n = classes_in(sd, classifier, arch)
        kwargs = {"num_classes": n}
        if inception:
            has_aux = any(k.startswith("AuxLogits.") for k in sd)
            kwargs.update(aux_logits=has_aux, init_weights=False, transform_input=True)
        model = torchvision.models.get_model(arch, weights=None, **kwargs)
        load_strict(model, sd, arch)
        if inception:
            model.aux_logits, model.AuxLogits = False, None
        return BuiltModel(model.eval(), (3, crop, crop), n, identity, default_pre)

    require_file_for_checksum(cfg)
    enum = torchvision.models.get_model_weights(arch)
    kwargs = {"aux_logits": False} if inception else {}  # torchvision keeps the aux head otherwise
    return _torchvision_tagged(arch, enum, cfg.weights, kwargs)


def torchvision_archs() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def check_arch(source: str, name: str) -> None:
    """One-line ``ConfigError`` for an unknown timm or torchvision architecture (before any build)."""
    from dfq_bench.config import ConfigError

    if source == "timm":
        import timm

        known, ok, hint = timm.list_models, timm.is_model(name), "timm.list_models() lists them"
    else:
        known, ok, hint = torchvision_archs, name in torchvision_archs(), "torchvision.models.list_models()"
    if not ok:
        close = difflib.get_close_matches(name, known(), n=1, cutoff=0.6)
        did = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown {source} model {name!r}{did} ({hint} lists the classifiers)")


_AUX = {"inception_v3": "AuxLogits.", "googlenet": "aux1."}  # auxiliary heads, built only if the weights have them


def torchvision_model(cfg) -> BuiltModel:
    """``model=torchvision model.name=<arch>``: any torchvision classification model (see the
    module docstring for ``model.weights``); the row's model label is ``torchvision:<arch>``."""
    import torchvision

    arch = str(cfg.name)
    if arch not in torchvision_archs():
        check_arch("torchvision", arch)
    enum = torchvision.models.get_model_weights(arch)
    if cfg.weights is not None and local_weights_path(cfg.weights) is None:
        require_file_for_checksum(cfg)
        return _torchvision_tagged(arch, enum, cfg.weights, {"aux_logits": False} if arch in _AUX else {})
    pre = _preprocess_of(enum.DEFAULT)
    kwargs = {"aux_logits": False, "init_weights": True} if arch in _AUX else {}
    if cfg.weights is None:
        require_file_for_checksum(cfg)
        model = torchvision.models.get_model(arch, weights=None, **kwargs)
        return BuiltModel(model.eval(), (3, pre.crop, pre.crop), _num_classes(model), "random-init", pre)
    sd, identity = read_state_dict(local_weights_path(cfg.weights), cfg.sha256)
    probe = torchvision.models.get_model(arch, weights=None, **kwargs)
    classifier = _classifier_name(probe)
    kwargs["num_classes"] = classes_in(sd, classifier, arch)
    if arch in _AUX:
        has_aux = any(k.startswith(_AUX[arch]) for k in sd)
        kwargs.update(aux_logits=has_aux, init_weights=False)
    model = torchvision.models.get_model(arch, weights=None, **kwargs)
    load_strict(model, sd, arch)
    if arch in _AUX and getattr(model, "aux_logits", False):
        model.aux_logits = False
        for name in ("AuxLogits", "aux1", "aux2"):
            if hasattr(model, name):
                setattr(model, name, None)
    return BuiltModel(model.eval(), (3, pre.crop, pre.crop), kwargs["num_classes"], identity, pre)


def _classifier_name(model: nn.Module) -> str:
    """The last Linear (or conv, for squeezenet) in module order: the classifier whose rows count classes."""
    last = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return last[-1]


def _num_classes(model: nn.Module) -> int:
    return int(model.get_submodule(_classifier_name(model)).weight.shape[0])


def _preprocess_of(weights) -> Preprocess:
    t = weights.transforms()
    return Preprocess(
        resize=int(t.resize_size[0]), crop=int(t.crop_size[0]), mean=tuple(t.mean),
        std=tuple(t.std), interpolation=t.interpolation.value,
    )


def _torchvision_tagged(arch: str, enum, tag: str, kwargs: dict) -> BuiltModel:
    """A torchvision model with a library weights tag (downloaded into the torch hub cache)."""
    import torchvision

    try:
        weights = enum[str(tag)]
    except KeyError:
        valid = ", ".join(list(enum.__members__))
        raise WeightsError(
            f"model.weights={tag!r} is not a {arch} weight tag; valid: {valid}, a local "
            "state-dict file, or null"
        ) from None
    try:
        model = torchvision.models.get_model(arch, weights=weights, **kwargs)
    except Exception as e:
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise WeightsError(
            f"cannot get torchvision weights {weights} ({_first_line(e)}); without network, download "
            f"{weights.url} elsewhere and put it at {cache}, or pass model.weights=<file>"
        ) from None
    pre = _preprocess_of(weights)
    return BuiltModel(model.eval(), (3, pre.crop, pre.crop), len(weights.meta["categories"]),
                      f"torchvision:{weights}", pre)


def resnet18(cfg) -> BuiltModel:
    return build_torchvision("resnet18", cfg)


def resnet50(cfg) -> BuiltModel:
    return build_torchvision("resnet50", cfg)


def mobilenet_v2(cfg) -> BuiltModel:
    return build_torchvision("mobilenet_v2", cfg)


def inception_v3(cfg) -> BuiltModel:
    return build_torchvision("inception_v3", cfg)


# ---------------------------------------------------------------------------------------------
# timm


def timm_preprocess(model: nn.Module) -> Preprocess:
    """Eval preprocessing from timm's pretrained_cfg (resize = floor(crop / crop_pct))."""
    from timm.data import resolve_data_config

    dc = resolve_data_config({}, model=model)
    _, h, w = dc["input_size"]
    if h != w:
        raise WeightsError(f"timm input size {h}x{w} is not square; only square crops are supported")
    if dc.get("crop_mode", "center") != "center":
        log.warning("timm crop_mode %r approximated by resize + center crop", dc["crop_mode"])
    return Preprocess(
        resize=int(math.floor(h / dc["crop_pct"])), crop=int(h), mean=tuple(dc["mean"]),
        std=tuple(dc["std"]), interpolation=str(dc["interpolation"]),
    )


def timm_model(cfg) -> BuiltModel:
    """``model=timm model.name=<arch>[.<tag>]``; see the module docstring for ``model.weights``."""
    import timm

    name = str(cfg.name)
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise WeightsError(f"unknown timm model {name!r}{hint} (timm.list_models() lists them)")
    if cfg.weights is None:
        require_file_for_checksum(cfg)
        model = timm.create_model(name, pretrained=False)
        identity = "random-init"
    elif (path := local_weights_path(cfg.weights)) is not None:
        sd, identity = read_state_dict(path, cfg.sha256)
        classifier = timm.create_model(name, pretrained=False).pretrained_cfg.get("classifier", "fc")
        classifier = classifier[0] if isinstance(classifier, (list, tuple)) else classifier
        model = timm.create_model(name, pretrained=False, num_classes=classes_in(sd, classifier, name))
        load_strict(model, sd, f"timm:{name}")
    else:
        require_file_for_checksum(cfg)
        tag = str(cfg.weights)
        full = name if tag.lower() in ("pretrained", "true") else f"{name.split('.')[0]}.{tag}"
        try:
            model = timm.create_model(full, pretrained=True)  # downloads into the HF hub cache
        except Exception as e:
            raise WeightsError(
                f"cannot get timm pretrained weights for {full!r} ({_first_line(e)}); without "
                "network, download them elsewhere and pass model.weights=<file>"
            ) from None
        identity = f"timm:{model.pretrained_cfg.get('architecture')}.{model.pretrained_cfg.get('tag')}"
    pre = timm_preprocess(model)
    return BuiltModel(model.eval(), (3, pre.crop, pre.crop), model.num_classes, identity, pre)


__all__ = [
    "WeightsError", "sha256_file", "check_sha256",
    "local_weights_path", "read_state_dict", "classes_in", "load_strict", "require_file_for_checksum",
    "resnet18", "resnet50", "mobilenet_v2", "inception_v3", "timm_model", "torchvision_model",
    "torchvision_archs", "check_arch",
]
