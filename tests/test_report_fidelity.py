"""The reporter on partly labelled evaluation sets (natural_images: top-1 over the labelled views only,
``dataset_info.n_labelled`` < ``n_eval``; none labelled: top-1 null): agreement with FP32 and the KL to
FP32, which count every view, as columns with their spread over seeds in every table, and a KL-vs-bits
plot; fully labelled sets keep the tables they had (no such columns, no such plot)."""

import csv
import random
import re
import statistics
from pathlib import Path

import pytest

from dfq_bench.results import append_row, report

BITS = [(4, None), (8, 8)]
METHODS = ("rtn", "squant")
SEEDS = (0, 1, 2)
N_EVAL = 100
# (model, dataset, n_labelled of dataset_info; None: no such field, as in the fashion_mnist rows)
GROUPS = [("net_p", "natural_images", 40), ("net_u", "natural_images", 0), ("net_l", "fashion_mnist", None),
          ("net_f", "natural_images", N_EVAL)]


def make_row(model, dataset, n_labelled, method, wbits, abits, seed, rng):
    top1 = None if n_labelled == 0 else round(rng.uniform(20, 70), 2)
    info = {"limit": None} if n_labelled is None else {"n_labelled": n_labelled, "n_total": N_EVAL}
    return {"run_id": f"{model}-{method}-{wbits}-{abits}-{seed}", "status": "ok", "error": None, "method": method,
            "method_version": "1", "model": model, "dataset": dataset, "wbits": wbits, "abits": abits, "seed": seed,
            "protocol": {"name": "common"}, "method_cfg": {"name": method}, "data": None, "weights": "w0",
            "n_eval": N_EVAL, "dataset_info": info, "top1": top1, "top5": None if top1 is None else top1 + 10,
            "top1_fp32": None if top1 is None else 75.0, "delta_top1": None,
            "agree_fp32": round(rng.uniform(40, 99), 3), "kl_fp32": rng.uniform(0.001, 0.5), "t_quant_s": 0.5,
            "t_synth_s": 0.0, "t_total_s": 1.0}


def make_rows(groups=GROUPS):
    rng = random.Random(17)
    return [make_row(*g, m, w, a, s, rng) for g in groups for m in METHODS for w, a in BITS for s in SEEDS]


def label(wbits, abits):
    return f"W{wbits}A{abits if abits is not None else 32}"


def expected(rows, model, field):
    """(method, bits) -> (mean, sample std) of ``field`` over the seeds, computed here."""
    out = {}
    for m in METHODS:
        for w, a in BITS:
            vals = [r[field] for r in rows if (r["model"], r["method"], r["wbits"], r["abits"]) == (model, m, w, a)]
            assert len(vals) == len(SEEDS)
            out[m, label(w, a)] = (statistics.fmean(vals), statistics.stdev(vals))
    return out


def md_section(md: str, model: str, dataset: str) -> str:
    return md.split(f"\n## {model} / {dataset}\n", 1)[1].split("\n## ", 1)[0]


def md_pivot(section: str, title_start: str) -> dict:
    """(method, bits) -> cell text of the pivot under the heading starting with ``title_start``."""
    block = section.split(f"\n{title_start}", 1)[1].split("\n\n", 2)[1]
    head, _, *body = block.strip().splitlines()
    cols = [c.strip() for c in head.strip("|").split("|")]
    cells = {}
    for line in body:
        values = [c.strip() for c in line.strip("|").split("|")]
        cells.update({(values[0], b): v for b, v in zip(cols[1:], values[1:], strict=True)})
    return cells


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fidelity")
    rows = make_rows()
    (tmp / "in").mkdir()
    for r in rows:
        append_row(tmp / "in", r)
    read, written = report.report([tmp / "in" / "runs.jsonl"], tmp / "out")
    return tmp / "out", rows, read, written


def test_rows_without_any_labelled_view_are_kept_with_a_null_top1(made):
    out, rows, read, _ = made
    assert read.warnings == [] and len(read.ok) == len(rows)
    section = md_section((out / "tables.md").read_text(), "net_u", "natural_images")
    assert set(md_pivot(section, "Top-1 (%)").values()) == {"-"}  # no top-1, and no crash


@pytest.mark.parametrize("model", ["net_p", "net_u"])
def test_agreement_and_kl_are_the_means_and_stds_over_seeds_in_every_table(made, model):
    out, rows, _, _ = made
    agree, kl = expected(rows, model, "agree_fp32"), expected(rows, model, "kl_fp32")
    section = md_section((out / "tables.md").read_text(), model, "natural_images")
    assert "count the labelled views only" in section
    md_agree, md_kl = md_pivot(section, "Agreement with the FP32 top-1"), md_pivot(section, "KL(p_fp32")
    tex = (out / "tables.tex").read_text()
    with open(out / "summary.csv", newline="") as f:
        csv_rows = {(r["variant"], r["bits"]): r for r in csv.DictReader(f) if r["model"] == model}
    page = (out / "index.html").read_text()
    for key in agree:
        (am, asd), (km, ksd) = agree[key], kl[key]
        assert md_agree[key] == f"{am:.2f} ± {asd:.2f} ({len(SEEDS)})"
        assert md_kl[key] == f"{km:#.3g} ± {ksd:#.3g} ({len(SEEDS)})"
        c = csv_rows[key]
        assert float(c["agree_fp32_mean"]) == pytest.approx(am, abs=1e-4)
        assert float(c["agree_fp32_std"]) == pytest.approx(asd, abs=1e-4)
        assert float(c["kl_fp32_mean"]) == pytest.approx(km, rel=1e-5)
        assert float(c["kl_fp32_std"]) == pytest.approx(ksd, rel=1e-5)
        assert f"{am:.2f}$\\pm${asd:.2f}" in tex and f"{km:#.3g}$\\pm${ksd:#.3g}" in tex
        assert f'data-v="{am!r}">{am:.2f} ± {asd:.2f}</td>' in page  # the cells table: its full mean, then text
        assert f'data-v="{km!r}">{km:#.3g} ± {ksd:#.3g}</td>' in page
    assert f"% {model} / natural_images: agree_fp32\n" in tex and f"% {model} / natural_images: kl_fp32\n" in tex


def test_fully_labelled_sections_have_no_agreement_or_kl_columns(made):
    out, _, _, _ = made
    md = (out / "tables.md").read_text()
    page = (out / "index.html").read_text()
    tex = (out / "tables.tex").read_text()
    for model, dataset in (("net_l", "fashion_mnist"), ("net_f", "natural_images")):  # n_labelled == n_eval too
        section = md_section(md, model, dataset)
        assert "Agreement with" not in section and "KL(" not in section and "labelled views" not in section
        cells = page.split(f'<table id="cells__{model}__{dataset}"', 1)[1].split("</table>", 1)[0]
        assert 'data-key="agree"' in cells and 'data-key="kl"' not in cells  # agreement stays the plain mean
        assert f"% {model} / {dataset}: agree_fp32" not in tex and f"% {model} / {dataset}: kl_fp32" not in tex


def test_a_kl_plot_per_partly_labelled_section_and_accuracy_plots_where_there_is_a_top1(made):
    out, _, _, written = made
    names = {p.name for p in written}
    for model, partial, top1 in (("net_p", True, True), ("net_u", True, False), ("net_l", False, True),
                                 ("net_f", False, True)):
        dataset = "fashion_mnist" if model == "net_l" else "natural_images"
        for ext in ("png", "pdf"):
            assert (f"kl_vs_bits__{model}__{dataset}.{ext}" in names) == partial
            assert (f"acc_vs_bits__{model}__{dataset}.{ext}" in names) == top1
            assert (f"acc_vs_time__{model}__{dataset}.{ext}" in names) == top1
    png = (out / "kl_vs_bits__net_p__natural_images.png").read_bytes()
    assert png.startswith(b"\x89PNG") and (out / "kl_vs_bits__net_p__natural_images.pdf").stat().st_size > 1000
    page = (out / "index.html").read_text()
    assert 'id="fig-kl_vs_bits__net_p__natural_images"' in page and "fig-kl_vs_bits__net_l" not in page


def test_labelled_rows_alone_give_the_summary_columns_they_always_had(tmp_path):
    rows = [r for r in make_rows() if r["dataset"] == "fashion_mnist"]
    (tmp_path / "in").mkdir()
    for r in rows:
        append_row(tmp_path / "in", r)
    report.report([tmp_path / "in" / "runs.jsonl"], tmp_path / "out", html=False)
    header = (tmp_path / "out" / "summary.csv").read_text().splitlines()[0].split(",")
    assert "agree_fp32_mean" in header and "kl_fp32_mean" in header
    assert "agree_fp32_std" not in header and "kl_fp32_std" not in header
    assert not list(Path(tmp_path / "out").glob("kl_vs_bits__*"))
    md = (tmp_path / "out" / "tables.md").read_text()
    assert not re.search(r"Agreement|KL\(|labelled views", md)
