"""dataset=natural_images (data/natural.py) and the EfficientNet-Lite0/1/2 models with package weights:
the view set is deterministic, labels only where the source gives them, each model's preprocessing,
a missing source package degrades to the others with a note, top-k over labelled views only."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from importlib.metadata import PackageNotFoundError

import pytest
import torch
from helpers import cli, compose_cfg
from PIL import Image
from torchvision import transforms as T

from dfq_bench import catalog  # noqa: F401  (fills the registries)
from dfq_bench.data import UNLABELLED, DatasetError
from dfq_bench.data import natural as nat
from dfq_bench.data.imagenet import eval_transform, preprocess_info
from dfq_bench.models import BuiltModel
from dfq_bench.models.efficientnet import VARIANTS, preprocess
from dfq_bench.registry import DATASETS, MODELS
from dfq_bench.run.runner import evaluate, run_id

if not all(importlib.util.find_spec(m) for m in ("skimage", "sklearn", "efficientnet_lite_pytorch")):
    pytest.skip("extras `natural` and `efficientnet` not installed", allow_module_level=True)
FOOLBOX_IMAGENET_LABELS = [243, 559, 438, 990, 949, 853, 609, 609, 915, 455, 541, 630, 741, 471, 129, 99, 251,
                           22, 317, 305]


def built_for(size: int) -> BuiltModel:
    """A stand-in with an EfficientNet-Lite preprocessing (the dataset reads only these fields)."""
    return BuiltModel(torch.nn.Identity(), (3, size, size), 1000, "test", preprocess(size))


def bundle(tmp_path, overrides=(), built=None):
    cfg = compose_cfg(["dataset=natural_images", f"dataset.cache_dir={tmp_path}", *overrides]).dataset
    return DATASETS.get("natural_images")(cfg, built or built_for(224))


def all_views(b):
    xs, ys = zip(*b.loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


@pytest.fixture(scope="module")
def default_set(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("natural")
    b = bundle(tmp)
    return tmp, b, *all_views(b)


def test_every_source_is_found_with_labels_only_on_foolbox_imagenet(default_set):
    _, b, _, y = default_set
    images, sources, missing = nat.found_sources()
    assert missing == [] and list(sources) == ["foolbox", "scikit-image", "scikit-learn"]
    assert sources["foolbox"]["images"] == 60 and sources["foolbox"]["labelled"] == 20
    assert sources["scikit-image"]["images"] == len(nat.SKIMAGE_PHOTOS) == 13
    assert sources["scikit-learn"]["images"] == 2
    assert b.n_eval == len(y) == 75 * 4 and b.num_classes == 1000 and b.calib is None
    labelled = [im for im in images if im.label != UNLABELLED]
    assert [im.name for im in labelled] == [f"foolbox/{n}" for n in sorted(
        p.name for p in labelled[0].path.parent.glob("imagenet_*"))]
    assert [im.label for im in labelled] == FOOLBOX_IMAGENET_LABELS
    expected = torch.tensor([im.label for im in images for _ in range(4)])  # each image's 4 views in a row
    assert torch.equal(y, expected)
    assert b.info["n_labelled"] == int((y != UNLABELLED).sum()) == 80
    assert all(im.label == UNLABELLED for im in images if "cifar" in im.name or not im.name.startswith("foolbox"))


def test_view_set_is_deterministic_and_keyed_by_its_seed(default_set, tmp_path):
    _, b, x, _ = default_set
    again, _ = all_views(bundle(tmp_path))  # a fresh cache directory: built again from the files
    assert torch.equal(x, again)
    other, _ = all_views(bundle(tmp_path, ["dataset.view_seed=1"]))
    same_plain = other.reshape(75, 4, *other.shape[1:])[:, [0, 2]]  # scale 1 views: no position drawn
    assert torch.equal(same_plain, x.reshape(75, 4, *x.shape[1:])[:, [0, 2]])
    assert not torch.equal(other, x)  # the 0.75 crops moved
    boxes = nat.view_boxes(512, 384, "foolbox/a.jpg", 4, [1.0, 0.75], 0)
    assert boxes == nat.view_boxes(512, 384, "foolbox/a.jpg", 4, [1.0, 0.75], 0)
    assert boxes[0] == (0, 0, 512, 384, False) and boxes[2] == (0, 0, 512, 384, True)
    assert boxes[1][2:] == (384, 288, False) and boxes[3][2:] == (384, 288, True)
    assert all(0 <= left <= 512 - w and 0 <= top <= 384 - h for left, top, w, h, _ in boxes)


def test_each_view_is_the_models_eval_preprocessing_of_its_crop(default_set):
    _, b, x, _ = default_set
    images, _, _ = nat.found_sources()
    pre = preprocess(224)
    for i in (0, 25, 70):  # an ImageNet sample, a CIFAR-10 image, a scikit-image photograph
        rgb = Image.open(images[i].path).convert("RGB")
        torch.testing.assert_close(x[4 * i], eval_transform(pre)(rgb), atol=1e-6, rtol=0)  # view 0: plain eval
        flipped = T.functional.hflip(rgb)
        torch.testing.assert_close(x[4 * i + 2], eval_transform(pre)(flipped), atol=1e-6, rtol=0)
        left, top, w, h, _ = nat.view_boxes(*rgb.size, images[i].name, 4, [1.0, 0.75], 0)[1]
        crop = rgb.crop((left, top, left + w, top + h))
        torch.testing.assert_close(x[4 * i + 1], eval_transform(pre)(crop), atol=1e-6, rtol=0)
    assert b.info["preprocess"] == preprocess_info(pre)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_lite_models_record_their_own_preprocessing_and_the_views_follow_it(name, tmp_path):
    size = VARIANTS[name][0]
    built = MODELS.get(name)(compose_cfg([f"model={name}", "model.weights=null"]).model)
    p = built.preprocess
    assert (p.resize, p.crop, p.interpolation) == (size + 32, size, "bicubic") and built.input_size == (3, size, size)
    assert p.mean == (127 / 255,) * 3 and p.std == (128 / 255,) * 3
    b = bundle(tmp_path, ["dataset.limit=8"], built)
    x, _ = all_views(b)
    assert x.shape == (8, 3, size, size) and b.info["preprocess"] == preprocess_info(p)
    with torch.no_grad():
        assert built.model(x[:2]).shape == (2, 1000)


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_lite1_lite2_package_weights_are_checked_and_classify_the_imagenet_samples(name):
    """18 of foolbox's 20 ImageNet samples right in FP32 for both (measured)."""
    pytest.importorskip(VARIANTS[name][1].replace("-", "_"))
    from dfq_bench.models.efficientnet import package_weights_path

    built = MODELS.get(name)(compose_cfg([f"model={name}"]).model)
    path = package_weights_path(name)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == VARIANTS[name][2]
    assert built.weights.endswith(f"sha256:{VARIANTS[name][2]}") and built.weights.startswith(VARIANTS[name][1])
    b = DATASETS.get("imagenet_samples")(compose_cfg(["dataset=imagenet_samples"]).dataset, built)
    x, y = next(iter(b.loader))
    with torch.no_grad():
        assert int((built.model(x).argmax(1) == y).sum()) >= 17


def test_a_missing_source_package_drops_its_images_with_a_note(monkeypatch, tmp_path, caplog):
    def gone():
        raise PackageNotFoundError("scikit-image")

    monkeypatch.setitem(nat.SOURCES, "scikit-image", (gone, "pip install scikit-image"))
    with caplog.at_level(logging.WARNING):
        b = bundle(tmp_path)
    assert b.n_eval == (75 - 13) * 4 and list(b.info["sources"]) == ["foolbox", "scikit-learn"]
    assert len(b.info["missing"]) == 1 and b.info["missing"][0].startswith("scikit-image: not installed")
    assert "pip install scikit-image" in b.info["missing"][0] and "scikit-image" in caplog.text
    assert b.info["n_labelled"] == 80
    for package in ("foolbox", "scikit-learn"):
        monkeypatch.setitem(nat.SOURCES, package, (gone, "pip install x"))
    with pytest.raises(DatasetError, match="^natural_images found no images: foolbox: not installed"):
        bundle(tmp_path)


def test_views_come_from_the_cache_and_an_unwritable_cache_is_only_a_warning(default_set, tmp_path, caplog):
    tmp, b, x, _ = default_set
    hit = bundle(tmp)
    assert b.info["view_cache"] == "miss" and hit.info["view_cache"] == "hit"
    assert torch.equal(all_views(hit)[0], x)
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    with caplog.at_level(logging.WARNING):
        b2 = bundle(blocked)
    assert b2.info["view_cache"] == "unwritable" and "cannot write natural_images cache" in caplog.text
    assert torch.equal(all_views(b2)[0], x)


def test_topk_counts_labelled_views_only_and_agreement_kl_count_all():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 6, generator=g)
    y = torch.tensor([1, UNLABELLED, 3, UNLABELLED, 0, 5, UNLABELLED, 2, 2, UNLABELLED, 4, 1])

    def q_model(t):  # a "quantized" model that moves some of the top-1 predictions
        return t + 0.8 * torch.sin(7 * t)

    out = evaluate(lambda t: t, q_model, [(x[:5], y[:5]), (x[5:], y[5:])], "cpu", lambda it, **kw: it)
    lab = y != UNLABELLED
    qx = q_model(x)
    fp, q = x.argmax(1), qx.argmax(1)
    assert out["n_eval"] == 12 and 0 < int((fp != q).sum()) < 12
    assert out["top1"] == pytest.approx(100 * float((q[lab] == y[lab]).float().mean()))
    assert out["top1_fp32"] == pytest.approx(100 * float((fp[lab] == y[lab]).float().mean()))
    assert out["agree_fp32"] == pytest.approx(100 * float((fp == q).float().mean()))
    p, lq = x.softmax(1), qx.log_softmax(1)
    assert out["kl_fp32"] == pytest.approx(float((p * (p.log() - lq)).sum(1).mean()), rel=1e-5)
    none = evaluate(lambda t: t, q_model, [(x, torch.full((12,), UNLABELLED))], "cpu", lambda it, **kw: it)
    assert none["top1"] is None and none["top5_fp32"] is None and none["agree_fp32"] == out["agree_fp32"]
    with pytest.raises(DatasetError, match="label -2 in evaluation images 0..11"):
        evaluate(lambda t: t, q_model, [(x, torch.full((12,), -2))], "cpu", lambda it, **kw: it)


def test_run_id_holds_the_source_packages_and_other_datasets_ignore_the_view_keys(monkeypatch):
    cfg = compose_cfg(["model=efficientnet_lite0", "dataset=natural_images"])
    rid = run_id(cfg)
    assert run_id(compose_cfg(["model=efficientnet_lite0", "dataset=natural_images", "dataset.cache_dir=/x"])) == rid
    assert run_id(compose_cfg(["model=efficientnet_lite0", "dataset=natural_images", "dataset.views=2"])) != rid
    monkeypatch.setattr(nat, "source_versions", lambda: ["foolbox==3.3.4"])
    assert run_id(cfg) != rid  # scikit-image and scikit-learn gone: another set, another run
    plain = compose_cfg(["dataset=fashion_mnist"])
    assert run_id(compose_cfg(["dataset=fashion_mnist", "dataset.views=2", "dataset.view_seed=3"])) == run_id(plain)


@pytest.mark.parametrize("arg, valid", [("dataset.views=0", "a positive integer"),
                                        ("dataset.scales=[1.0,1.5]", "crop scales in (0, 1]")])
def test_bad_view_keys_are_one_line_exit_2_no_row(arg, valid, tmp_path):
    res = cli(["model=efficientnet_lite0", "dataset=natural_images", arg, "results_dir=out"], tmp_path)
    assert res.returncode == 2 and valid in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_cli_run_on_natural_images_records_the_set_and_labelled_count(tmp_path):
    """A real run as a user types it (random-init, 40 views: the pipeline, not the numbers)."""
    res = cli(["model=efficientnet_lite0", "model.weights=null", "dataset=natural_images", "dataset.limit=40",
               f"dataset.cache_dir={tmp_path / 'cache'}", "method=rtn", "wbits=8", "abits=null",
               "results_dir=out", "progress=false"], tmp_path)
    assert res.returncode == 0, res.stderr
    row = json.loads((tmp_path / "out" / "runs.jsonl").read_text().splitlines()[-1])
    info = row["dataset_info"]
    assert row["status"] == "ok" and row["n_eval"] == 40 and info["subset"] == "evenly_spaced"
    assert info["n_total"] == 300 and info["missing"] == []
    assert info["n_labelled"] == sum(i * 300 // 40 < 80 for i in range(40)) == 11  # views 0, 7, 15, ... 75
    assert info["sources"]["foolbox"] == {"version": "3.3.4", "images": 60, "labelled": 20}
    assert len(info["images_sha256"]) == 64 and info["views"] == 4 and info["scales"] == [1.0, 0.75]
    assert row["top1"] is not None and 0 <= row["agree_fp32"] <= 100 and row["kl_fp32"] >= -1e-6  # float rounding
    assert "top-k on 11 labelled" in res.stdout
