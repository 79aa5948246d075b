"""Bad input as a user types it: one line naming the value and what is valid, exit code 2, no row,
before any model is built (the README's "bad input" section)."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("overrides,message", [
    (["method=dfq", "method.cle_tol=-1"], "error: method.cle_tol=-1.0 is invalid; valid: a positive float"),
    (["method=dfq", "method.cle_max_iter=0"], "error: method.cle_max_iter=0 is invalid; valid: an integer >= 1"),
    (["method=genie_cpu", "method.drop_p=2"], "error: method.drop_p=2.0 is invalid; valid: a probability in [0, 1]"),
    (["method=genie_cpu", "method.steps=-1"], "error: method.steps=-1 is invalid; valid: an integer >= 0"),
])
def test_method_keys_are_checked_before_any_work(tmp_path, overrides, message):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "dfq_bench", *overrides, f"results_dir={out}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [message]
    assert not out.exists()  # no row, not even an empty runs.jsonl
