"""The coverage matrix (scripts/coverage_matrix.py) on three architectures: a timm model built from
BatchNormAct2d with ReLU6, an untraceable timm model, and a torchvision ResNet. Slow (minutes)."""

import json
import subprocess
import sys

import pytest
from helpers import REPO, SCRIPTS

sys.path.insert(0, str(SCRIPTS))

from coverage_matrix import FE_KL, verdict  # noqa: E402

ARCHS = ["timm:efficientnet_lite0", "timm:mobilevit_xxs", "torchvision:resnet18"]


@pytest.mark.slow
def test_coverage_on_fused_untraceable_and_plain_models(tmp_path):
    out = tmp_path / "coverage"
    proc = subprocess.run([sys.executable, "scripts/coverage_matrix.py", "--out", str(out), "--archs", *ARCHS],
                          cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cells = {(c["arch"], c["method"], c["setting"]): c
             for p in sorted((out / "cells").glob("*.json")) for c in json.loads(p.read_text())["cells"]}
    assert len(cells) == 3 * 11  # 5 methods x 2 settings + the reference
    assert not [k for k, c in cells.items() if c["status"] == "crashed"]
    for (arch, method, setting), c in cells.items():
        if setting != "fe" or c["status"] != "ok":
            continue
        if method == "dfq" and c["n_relu6_to_relu"]:
            assert arch == "timm:efficientnet_lite0"  # the only ReLU6 model of the three
            continue
        assert c["agree"] == 100.0 and c["kl"] < FE_KL, (arch, method, c)
    lite = cells[("timm:efficientnet_lite0", "rtn", "fe")]
    assert lite["n_norm_act_split"] > 0 and lite["n_bn_unfolded"] == 0 and lite["bn_fold_rule"] == "graph"
    for setting in ("fe", "w8a8"):  # the untraceable model: DFQ refused in one line, the rest runs
        c = cells[("timm:mobilevit_xxs", "dfq", setting)]
        assert c["status"] == "refused" and "cannot trace" in c["reason"] and "\n" not in c["reason"]
        assert cells[("timm:mobilevit_xxs", "rtn", setting)]["bn_fold_rule"] == "module"
    assert cells[("torchvision:resnet18", "rtn", "w8a8")]["agree"] >= 90.0
    assert all(verdict(c)[0] for k, c in cells.items() if k[0] == "torchvision:resnet18" and k[1] == "rtn")
    assert "| torchvision:resnet18 |" in (out.parent / "coverage.md").read_text()
