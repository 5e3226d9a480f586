"""md2pr_jax.compare: rows paired by seed across ablation workdirs."""

import json
import math
import subprocess
import sys

import pytest
from conftest import ROOT

from md2pr_jax import compare


def _row(workdir, row, seed, ndcg_test, ndcg_dev, rounds=1):
    folder = workdir / "rows" / f"{row}_s{seed}"
    folder.mkdir(parents=True)
    metrics = lambda x: {"ndcg@10": x, "mrr@10": x - 0.1, "recall@100": 0.9}  # noqa: E731
    res = {"rounds": [{"round": r, "metrics": {"test": metrics(ndcg_test - 0.01 * (rounds - r)),
                                               "dev": metrics(ndcg_dev)}} for r in range(1, rounds + 1)]}
    (folder / "results.json").write_text(json.dumps(res))


def test_paired_difference_and_its_standard_error(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for seed, (x, y) in enumerate([(0.70, 0.72), (0.68, 0.71), (0.72, 0.73)]):
        _row(a, "de", seed, x, 0.6, rounds=2)
        _row(b, "md2pr", seed, y, 0.61, rounds=2)
    _row(b, "md2pr", 7, 0.9, 0.9, rounds=2)  # a seed the baseline lacks: not paired
    (a / "rows" / "de_s9").mkdir()  # unfinished: no results.json
    base = compare.row_runs(str(a), "de")
    assert sorted(base) == [0, 1, 2]
    result = compare.compare(("de", base), [("md2pr", compare.row_runs(str(b), "md2pr"))])
    d = result["rows"]["md2pr"]["test"]["delta"]["ndcg@10"]
    diffs = [0.02, 0.03, 0.01]
    mean = sum(diffs) / 3
    se = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 2) / math.sqrt(3)
    assert d["n"] == 3 and d["seeds"] == [0, 1, 2]
    assert d["mean"] == pytest.approx(mean) and d["se"] == pytest.approx(se) and d["beyond_2se"]
    assert not d["below_2se"]
    assert result["rows"]["md2pr"]["test"]["ndcg@10"]["n"] == 4  # the row's own mean uses all its seeds
    assert compare.row_runs(str(a), "de", rnd=1)[0]["test"]["ndcg@10"] == pytest.approx(0.69)
    assert "| `md2pr` | 4 |" in compare.markdown(result)


def test_losses_beyond_two_standard_errors_are_marked(tmp_path):
    """A row worse than the baseline by more than 2 SE is marked (†) as a gain is (*); a
    difference within 2 SE gets neither."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for seed, (x, y, z) in enumerate([(0.70, 0.68, 0.71), (0.68, 0.65, 0.66), (0.72, 0.71, 0.73)]):
        _row(a, "de", seed, x, 0.6)
        _row(b, "worse", seed, y, 0.6)
        _row(c, "noisy", seed, z, 0.6)
    runs = lambda w, r: compare.row_runs(str(w), r)  # noqa: E731
    result = compare.compare(("de", runs(a, "de")), [("worse", runs(b, "worse")), ("noisy", runs(c, "noisy"))])
    worse, noisy = (result["rows"][k]["test"]["delta"]["ndcg@10"] for k in ("worse", "noisy"))
    assert worse["mean"] == pytest.approx(-0.02) and worse["below_2se"] and not worse["beyond_2se"]
    assert not noisy["below_2se"] and not noisy["beyond_2se"]
    table = compare.markdown(result)
    assert "-0.0200 ± 0.0058 †" in table and "†" not in table.split("`noisy`")[1].split("\n")[0]


def test_bad_specs_and_missing_rows(tmp_path):
    with pytest.raises(ValueError, match="NAME=WORKDIR:ROW"):
        compare.parse_spec("runs/abl:de")
    assert compare.parse_spec("de=runs/a:b:de") == ("de", "runs/a:b", "de")
    with pytest.raises(FileNotFoundError, match="not an ablation workdir"):
        compare.row_runs(str(tmp_path), "de")
    _row(tmp_path, "de", 0, 0.7, 0.7)
    out = subprocess.run([sys.executable, "-m", "md2pr_jax.compare", "--baseline", f"de={tmp_path}:de",
                          "--row", f"x={tmp_path}:md2pr"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0 and "no finished md2pr_s<seed> rows" in out.stderr
    (tmp_path / "rows" / "de_s0" / "timings.json").write_text(json.dumps({"rounds/r01/train": 61.25}))
    _row(tmp_path, "x", 0, 0.72, 0.7)
    out = subprocess.run([sys.executable, "-m", "md2pr_jax.compare", "--baseline", f"de={tmp_path}:de",
                          "--row", f"x={tmp_path}:x", "--out", str(tmp_path / "cmp")], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert saved["command"].startswith("python -m md2pr_jax.compare --baseline")
    assert saved["cost_s"] == {"de": {"0": {"rounds/r01/train": 61.2}}, "x": {}}
