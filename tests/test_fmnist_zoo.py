"""The embedded benchmark: the fashion_mnist dataset and the committed resnet20/mobilenetv2/vgg_fmnist
weights (checksums, FP32 accuracy recorded in zoo.json, RTN W8A8 close to FP32).

References are written here independently of dfq_bench: the idx files are parsed with gzip + struct,
the normalisation is ToTensor + Normalize spelled out, checksums come from hashlib.
"""

import gzip
import hashlib
import json
import shutil
import struct
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from helpers import compose_cfg

from dfq_bench.data import DatasetError
from dfq_bench.data import fashion_mnist as fm
from dfq_bench.models import BuiltModel, fmnist
from dfq_bench.models.torchvision_timm import WeightsError
from dfq_bench.registry import DATASETS, MODELS
from dfq_bench.run.runner import run

ZOO = ("mobilenetv2_fmnist", "resnet20_fmnist", "vgg_fmnist")
DATA_DIR = next((d for d in fm.SYSTEM_DIRS if fm.complete_dir(d)), None) or fm.complete_dir(
    Path(fm.DEFAULT_ROOT).expanduser())
needs_data = pytest.mark.skipif(DATA_DIR is None, reason="Fashion-MNIST not installed (apt-get install "
                                "dataset-fashion-mnist)")
MANIFEST = json.loads((fmnist.WEIGHTS_DIR / fmnist.MANIFEST).read_text()) \
    if (fmnist.WEIGHTS_DIR / fmnist.MANIFEST).is_file() else {"models": {}}
needs_weights = pytest.mark.skipif(set(MANIFEST["models"]) != set(ZOO), reason="zoo weights not trained yet")


def ref_idx(path: Path) -> np.ndarray:
    """Independent idx reader: big-endian magic (0, 0, 0x08, ndim), ndim uint32 sizes, then bytes."""
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    assert (zero, dtype) == (0, 8)
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    return np.frombuffer(raw[4 + 4 * ndim:], np.uint8).reshape(dims)


def ref_file(stem: str) -> Path:
    return next(p for p in (DATA_DIR / f"{stem}.gz", DATA_DIR / stem) if p.is_file())


@pytest.fixture(scope="module")
def random_model():
    """A random-init resnet20_fmnist: the dataset tests do not need the trained weights."""
    torch.manual_seed(0)
    return MODELS.get("resnet20_fmnist")(compose_cfg(["model=resnet20_fmnist", "model.weights=null"]).model)


# --- dataset ------------------------------------------------------------------------------------


@needs_data
def test_test_split_shapes_labels_classes_and_normalisation(random_model):
    bundle = DATASETS.get("fashion_mnist")(compose_cfg(["dataset=fashion_mnist"]).dataset, random_model)
    xs, ys = zip(*bundle.loader, strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    assert bundle.n_eval == 10000 and bundle.num_classes == 10 and x.shape == (10000, 1, 28, 28)
    assert [len(b) for b in ys] == [500] * 20  # batch_size of conf/dataset/fashion_mnist.yaml
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.bincount(y).tolist() == [1000] * 10  # the test split is balanced
    ref_images, ref_labels = ref_idx(ref_file("t10k-images-idx3-ubyte")), ref_idx(ref_file("t10k-labels-idx1-ubyte"))
    assert torch.equal(y, torch.from_numpy(ref_labels.astype(np.int64)))
    expected = (torch.from_numpy(ref_images.astype(np.float32)) / 255.0 - 0.2860) / 0.3530
    torch.testing.assert_close(x[:, 0], expected, atol=1e-6, rtol=0)
    assert bundle.info["split"] == "test" and bundle.info["limit"] is None and bundle.info["n_total"] == 10000
    assert bundle.info["preprocess"] == {"mean": [0.2860], "std": [0.3530]}


@needs_data
def test_limit_takes_evenly_spaced_images_and_is_recorded(random_model):
    cfg = compose_cfg(["dataset=fashion_mnist", "dataset.limit=7", "dataset.batch_size=3"]).dataset
    bundle = DATASETS.get("fashion_mnist")(cfg, random_model)
    batches = list(bundle.loader)
    assert [len(b[1]) for b in batches] == [3, 3, 1] and bundle.n_eval == 7
    ref_labels = ref_idx(ref_file("t10k-labels-idx1-ubyte"))
    picked = [0, 1428, 2857, 4285, 5714, 7142, 8571]  # i * 10000 // 7
    assert torch.cat([b[1] for b in batches]).tolist() == ref_labels[picked].tolist()
    assert bundle.info["limit"] == 7 and bundle.info["subset"] == "evenly_spaced"


@needs_data
def test_calib_is_a_seeded_subset_of_the_train_split(random_model):
    bundle = DATASETS.get("fashion_mnist")(compose_cfg(["dataset=fashion_mnist"]).dataset, random_model)
    a, b, c = bundle.calib(64, 0), bundle.calib(64, 0), bundle.calib(64, 1)
    assert a.shape == (64, 1, 28, 28) and torch.equal(a, b) and not torch.equal(a, c)
    train = ref_idx(ref_file("train-images-idx3-ubyte"))
    test = ref_idx(ref_file("t10k-images-idx3-ubyte"))
    train_set = {img.tobytes() for img in train}
    pixels = torch.round((a[:, 0] * 0.3530 + 0.2860) * 255).to(torch.uint8).numpy()
    assert all(img.tobytes() in train_set for img in pixels)
    assert len({img.tobytes() for img in pixels}) == 64  # drawn without replacement
    test_set = {img.tobytes() for img in test}
    assert sum(img.tobytes() in test_set for img in pixels) < 64  # not the evaluation split


@needs_data
def test_root_in_torchvision_layout_is_found_first(tmp_path, random_model):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for stems in fm.FILES.values():
        for stem in stems:
            (raw / ref_file(stem).name).symlink_to(ref_file(stem))
    cfg = compose_cfg(["dataset=fashion_mnist", f"dataset.root={tmp_path}", "dataset.limit=10"]).dataset
    bundle = DATASETS.get("fashion_mnist")(cfg, random_model)
    assert bundle.info["root"] == str(raw) and bundle.info["source"] == "root" and bundle.n_eval == 10


def test_missing_everywhere_gives_one_line_how_to_get_it(tmp_path, monkeypatch, random_model):
    monkeypatch.setattr(fm, "SYSTEM_DIRS", (tmp_path / "system",))

    def no_network(root):
        raise URLError("no network")

    monkeypatch.setattr(fm, "download", no_network)
    cfg = compose_cfg(["dataset=fashion_mnist", f"dataset.root={tmp_path / 'empty'}"]).dataset
    with pytest.raises(DatasetError) as e:
        DATASETS.get("fashion_mnist")(cfg, random_model)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"Fashion-MNIST not found in dataset.root='{tmp_path / 'empty'}'")
    assert "URLError" in msg and "apt-get install dataset-fashion-mnist" in msg and "set dataset.root" in msg


@needs_data
def test_truncated_idx_file_is_an_error(tmp_path):
    raw = gzip.open(ref_file("t10k-labels-idx1-ubyte")).read()
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(raw[:-5])
    with pytest.raises(DatasetError, match=r"holds 9995 bytes of data, its header says \(10000,\); truncated"):
        fm.read_idx(tmp_path / "t10k-labels-idx1-ubyte")


def test_wrong_model_is_rejected(random_model):
    cfg = compose_cfg(["dataset=fashion_mnist"]).dataset
    test_cnn = MODELS.get("test_cnn")(compose_cfg(["model=test_cnn"]).model)  # 3x32x32, 10 classes
    with pytest.raises(DatasetError, match="^fashion_mnist images are 1x28x28 but the model takes 3x32x32"):
        DATASETS.get("fashion_mnist")(cfg, test_cnn)
    thousand = BuiltModel(torch.nn.Identity(), (1, 28, 28), 1000, "none", fmnist.PREPROCESS)
    with pytest.raises(DatasetError, match="^dataset 'fashion_mnist' has 10 classes but the model outputs 1000"):
        DATASETS.get("fashion_mnist")(cfg, thousand)


# --- committed weights --------------------------------------------------------------------------


@needs_weights
@pytest.mark.parametrize("name", ZOO)
def test_manifest_matches_the_files(name):
    entry = MANIFEST["models"][name]
    path = fmnist.WEIGHTS_DIR / entry["file"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    assert path.stat().st_size == entry["bytes"]
    sd = torch.load(path, weights_only=True)
    assert all(v.dtype in (torch.float32, torch.int64) for v in sd.values())
    model = fmnist.make(name)
    assert sum(p.numel() for p in model.parameters()) == entry["params"]
    built = MODELS.get(name)(compose_cfg([f"model={name}"]).model)
    assert built.weights == f"zoo:{name} sha256:{entry['sha256']}"
    assert all(torch.equal(built.model.state_dict()[k], v) for k, v in sd.items())


@pytest.fixture
def corrupt_dir(tmp_path, monkeypatch):
    if "resnet20_fmnist" not in MANIFEST["models"]:
        pytest.skip("resnet20_fmnist weights not trained yet")
    for f in ("resnet20_fmnist.pt", fmnist.MANIFEST):
        shutil.copy(fmnist.WEIGHTS_DIR / f, tmp_path / f)
    monkeypatch.setattr(fmnist, "WEIGHTS_DIR", tmp_path)
    return tmp_path / "resnet20_fmnist.pt"


def build_resnet20():
    return MODELS.get("resnet20_fmnist")(compose_cfg(["model=resnet20_fmnist"]).model)


def test_checksum_mismatch_is_a_one_line_error(corrupt_dir):
    data = bytearray(corrupt_dir.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    corrupt_dir.write_bytes(bytes(data))
    with pytest.raises(WeightsError) as e:
        build_resnet20()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"checksum mismatch for {corrupt_dir}: sha256 is "
                                              f"{hashlib.sha256(bytes(data)).hexdigest()}, zoo.json expects")


def test_truncated_weights_are_a_one_line_error(corrupt_dir):
    data = corrupt_dir.read_bytes()
    corrupt_dir.write_bytes(data[:1000])
    with pytest.raises(WeightsError) as e:
        build_resnet20()
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(f"weights file {corrupt_dir} is truncated or altered: 1000 bytes, "
                                   f"zoo.json expects {len(data)}")


def test_missing_manifest_entry_says_how_to_train(corrupt_dir):
    (corrupt_dir.parent / fmnist.MANIFEST).write_text('{"models": {}}')
    with pytest.raises(WeightsError, match=r"^no committed weights for resnet20_fmnist .*train_zoo\.py"):
        build_resnet20()


# --- accuracy through the harness ---------------------------------------------------------------


@pytest.fixture(scope="module")
def w8a8_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("rows")
    return {name: run(compose_cfg([f"model={name}", "dataset=fashion_mnist", "method=rtn", "wbits=8", "abits=8",
                                   f"results_dir={out}"])) for name in ZOO}


@pytest.fixture(scope="module")
def w8a8_subset_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("subset_rows")
    return {name: run(compose_cfg([f"model={name}", "dataset=fashion_mnist", "dataset.limit=2000", "method=rtn",
                                   "wbits=8", "abits=8", f"results_dir={out}"])) for name in ZOO}


@needs_data
@needs_weights
@pytest.mark.parametrize("name", ZOO)
def test_rtn_w8a8_is_close_to_fp32_on_a_2000_image_subset(name, w8a8_subset_rows):
    # The fast default check; the full 10k test set (and the recorded FP32 top-1) is the slow test below.
    row = w8a8_subset_rows[name]
    assert row["status"] == "ok" and row["n_eval"] == 2000
    assert row["top1_fp32"] >= (88.0 if name == "mobilenetv2_fmnist" else 90.0)
    assert abs(row["top1"] - row["top1_fp32"]) <= 0.5 and row["agree_fp32"] >= 98.0


@pytest.mark.slow
@needs_data
@needs_weights
@pytest.mark.parametrize("name", ZOO)
def test_fp32_top1_matches_zoo_json_and_rtn_w8a8_is_close(name, w8a8_rows):
    row, entry = w8a8_rows[name], MANIFEST["models"][name]
    assert row["status"] == "ok" and row["n_eval"] == entry["n_eval"] == 10000
    assert row["top1_fp32"] == pytest.approx(entry["top1_fp32"], abs=0.01 + 1e-9)
    assert row["top1_fp32"] >= (90.0 if name == "mobilenetv2_fmnist" else 92.0)
    assert abs(row["top1"] - row["top1_fp32"]) <= 0.5
