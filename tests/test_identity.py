"""The run_id of a run on local weights is the weights' content, not their path: retraining into the same
file is a new run (a resumed sweep does not skip it and keep the old model's numbers), the same file
elsewhere is the same run, and model.sha256 in another case or as a prefix does not change it."""

import torch
from helpers import compose_cfg

from dfq_bench.models import torchvision_timm
from dfq_bench.run.runner import build_model, run_id

FMNIST = ["model=resnet20_fmnist", "dataset=fake", "method=rtn"]


def save_weights(path, seed):
    torch.manual_seed(seed)
    torch.save(build_model(compose_cfg([*FMNIST, "model.weights=null"])).model.state_dict(), path)
    return torchvision_timm.sha256_file(path)


def rid(*overrides):
    return run_id(compose_cfg([*FMNIST, *overrides]))


def test_run_id_follows_the_weights_content(tmp_path, monkeypatch):
    monkeypatch.setenv("DFQ_BENCH_CACHE", str(tmp_path / "cache"))
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    digest = save_weights(a, 0)
    first = rid(f"model.weights={a}")
    b.write_bytes(a.read_bytes())
    assert rid(f"model.weights={b}") == first  # same content elsewhere: the same run
    assert rid(f"model.weights={a}", f"model.sha256={digest.upper()}") == first
    assert rid(f"model.weights={a}", f"model.sha256={digest[:12]}") == first
    save_weights(a, 1)  # retrained into the same path
    assert rid(f"model.weights={a}") != first


def test_the_hash_is_computed_once_per_file_version(tmp_path, monkeypatch):
    monkeypatch.setenv("DFQ_BENCH_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "w.pt"
    path.write_bytes(b"x" * 1000)
    reads = []
    real_open = open

    def counting_open(p, *args, **kw):
        if str(p) == str(path.resolve()):
            reads.append(p)
        return real_open(p, *args, **kw)

    monkeypatch.setattr("builtins.open", counting_open)
    monkeypatch.setattr(torchvision_timm, "_SHA256", {})
    h1 = torchvision_timm.sha256_file(path)
    monkeypatch.setattr(torchvision_timm, "_SHA256", {})  # a new process: the disk cache answers
    assert torchvision_timm.sha256_file(path) == h1 and len(reads) == 1
    path.write_bytes(b"y" * 1000)  # new content (and mtime): hashed again
    assert torchvision_timm.sha256_file(path) != h1 and len(reads) == 2


def test_the_synthetic_data_cache_location_is_not_part_of_the_run_id(tmp_path):
    base = ["method=zeroq", "data=zeroq_cpu", "model=test_cnn", "dataset=fake"]
    ids = {run_id(compose_cfg([*base, *extra])) for extra in
           ([], [f"data.cache_dir={tmp_path / 'a'}"], ["data.cache_dir=.cache/b"])}
    assert len(ids) == 1
    assert run_id(compose_cfg([*base, "data.steps=3"])) not in ids
