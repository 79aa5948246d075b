"""scripts/device_summary.py, the table of a scripts/device_check.sh run (the GPU check itself never runs here)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_summary():
    spec = importlib.util.spec_from_file_location("device_summary", ROOT / "scripts" / "device_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(method: str, device: str | None, top1: float | None, **extra) -> dict:
    command = f"python -m dfq_bench model=resnet20_fmnist method={method} wbits=4 abits=4 seed=0"
    return {"run_id": f"{method}{device}", "status": "ok" if top1 is not None else "failed", "method": method,
            "model": "resnet20_fmnist", "dataset": "fashion_mnist", "wbits": 4, "abits": 4, "seed": 0,
            "top1": top1, "command": command + (f" device={device}" if device else ""),
            "error": None if top1 is not None else "RuntimeError: Expected all tensors to be on the same device\n...",
            **extra}


def test_the_table_gives_each_runs_device_its_step_times_and_the_cuda_minus_cpu_top1(tmp_path, capsys):
    rows = [row("rtn", "cuda", 91.25), row("rtn", None, 90.75),
            {**row("squant", None, None), "device": "cuda:1"},  # the row's field, where it has one
            row("genie", "cuda", 80.0, method_cfg={"preset": "paper", "steps": 100}, data={"steps": 50},
                t_synth_s=10.0, t_quant_s=50.0, n_blocks=10, data_info={"cache": "miss", "t_generate_s": 9.5}),
            row("genie", "cuda:1", 81.0, method_cfg={"preset": "paper", "steps": 100}, data={"steps": 50},
                t_synth_s=0.1, t_quant_s=50.0, n_blocks=10, data_info={"cache": "hit", "t_generate_s": 9.5}),
            row("gdfq", "cuda", 70.0, method_cfg={"preset": "paper", "iters_per_epoch": 50, "epochs": 2,
                                                  "warmup_epochs": 1, "batch_size": 200},
                t_warmup_s=5.0, t_student_s=20.0)]
    path = tmp_path / "runs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"torn\n')
    assert load_summary().main(str(path)) == 0
    out = capsys.readouterr().out.splitlines()
    devices = ("cpu", "cuda", "cuda:1")
    lines = {ln.split()[0] + next(t for t in ln.split() if t in devices): ln for ln in out[1:7]}
    assert lines["rtncuda"].split()[2:5] == ["cuda", "ok", "91.25"]
    assert lines["rtncpu"].split()[2:5] == ["cpu", "ok", "90.75"]
    failed = lines["squantcuda:1"]
    assert "failed" in failed and "Expected all tensors to be on the same device" in failed
    assert "GENIE-D 0.190 s/step, GENIE-M 0.0500 s/step over 10 blocks" in lines["geniecuda"]
    assert "GENIE-D 0.190 s/step (cached data: as made then)" in lines["geniecuda:1"]
    assert "warm-up 0.100 s/iter, student 0.400 s/iter (batch 200)" in lines["gdfqcuda"]
    assert "  rtn        resnet20_fmnist      W4A4: 91.25 - 90.75 = +0.50" in out
    assert not any(ln.lstrip().startswith("squant ") for ln in out[out.index("CUDA - CPU top-1 (same machine, "
                                                                              "same setting):"):])
    assert out[-1].startswith("warning: ") and ":7: corrupt row skipped" in out[-1]
