"""md2pr_jax.compare: rows paired by seed across ablation workdirs."""

import json
import math
import subprocess
import sys

import numpy as np
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
    with pytest.raises(ValueError, match="needs --dataset"):
        compare.parse_spec("de=de")
    assert compare.parse_spec("de=runs/a:b:de") == ("de", [compare.Part("a:b", "runs/a:b", "de")])
    assert compare.parse_spec("de=nf@runs/a:de") == ("de", [compare.Part("nf", "runs/a", "de")])
    assert compare.parse_spec("x=md2pr", {"sf": "w1", "nf": "w2"}) == (
        "x", [compare.Part("sf", "w1", "md2pr"), compare.Part("nf", "w2", "md2pr")])
    with pytest.raises(ValueError, match="twice for dataset 'sf'"):
        compare.merge_specs([("x", [compare.Part("sf", "a", "r")]), ("x", [compare.Part("sf", "b", "r")])])
    with pytest.raises(FileNotFoundError, match="not an ablation workdir"):
        compare.row_runs(str(tmp_path), "de")
    _row(tmp_path, "de", 0, 0.7, 0.7)
    out = subprocess.run([sys.executable, "-m", "md2pr_jax.compare", "--baseline", f"de={tmp_path}:de",
                          "--row", f"x={tmp_path}:md2pr"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0 and "no finished md2pr_s<seed> rows" in out.stderr


def test_old_results_without_per_query_files_fall_back_to_seed_statistics(tmp_path):
    """Runs evaluated before per-query files were kept: compare says the query level is not
    available and keeps the seed statistics, the command and the costs."""
    for seed, (x, y) in enumerate([(0.70, 0.72), (0.68, 0.71)]):
        _row(tmp_path, "de", seed, x, 0.6)
        _row(tmp_path, "x", seed, y, 0.6)
    (tmp_path / "rows" / "de_s0" / "timings.json").write_text(json.dumps({"rounds/r01/train": 61.25}))
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "timings.json").write_text(json.dumps({"teacher": 600.04, "rounds/r01/score": 300.0}))
    out = subprocess.run([sys.executable, "-m", "md2pr_jax.compare", "--baseline", f"de={tmp_path}:de",
                          "--row", f"x={tmp_path}:x", "--out", str(tmp_path / "cmp")], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert saved["command"].startswith("python -m md2pr_jax.compare --baseline")
    label = tmp_path.name  # no config.json: the workdir's name labels its dataset
    assert saved["cost_s"] == {"de": {label: {"0": {"rounds/r01/train": 61.2}}}, "x": {label: {}}}
    assert saved["shared_cost_s"] == {label: {"teacher": 600.0, "rounds/r01/score": 300.0}}
    assert saved["query_level"]["tests"]["test"]["ndcg@10"] == {}
    assert saved["per_query_files"]["x"][label]["0"] == {"test": None, "dev": None}
    assert any("no per-query file for seed(s) [0, 1]" in m for m in saved["query_level"]["missing"])
    delta = saved["seed_level"][label]["rows"]["x"]["test"]["delta"]["ndcg@10"]
    assert delta["mean"] == pytest.approx(0.025) and delta["n"] == 2
    text = (tmp_path / "cmp" / "COMPARE.md").read_text()
    assert "Query level: not available" in text and "## Seed statistics" in text and "+0.0250 ± 0.0050" in text
    assert f"every row and seed on {label} (round 0, round 1's mining and teacher pass): 900 s" in text


# --- query level -------------------------------------------------------------------------------


def _pq_row(workdir, dataset, row, seed, values: dict[str, dict[str, list[float]]]):
    """A finished row whose round 1 kept per-query files: values {split: {metric: [per query]}}
    (queries q0, q1, ...); its results.json holds their means, as the eval stage writes them."""
    from md2pr_jax.layout import Layout, round_stage
    from md2pr_jax.retrieval import metrics, per_query

    lay = Layout.at(workdir).row(row, seed)
    folder = lay.per_query_dir(round_stage(1, "eval"))
    folder.mkdir(parents=True, exist_ok=True)
    means = {}
    for split, by_metric in values.items():
        table = {m: {f"q{i}": float(v) for i, v in enumerate(vals)} for m, vals in by_metric.items()}
        means[split] = metrics.mean_of(table)
        per_query.metrics_path(folder, "student", split).write_text(json.dumps(
            {"system": "student", "split": split, "queries": len(next(iter(table.values()))), "mean": means[split],
             "metrics": table}))
    lay.results.write_text(json.dumps({"rounds": [{"round": 1, "metrics": means}]}))
    lay.config_json.write_text(json.dumps({"data": {"dataset": dataset}}))


def _values(base, shift, rng, noise=0.15):
    return {m: np.clip(base + shift + rng.normal(0, noise, len(base)), 0, 1) for m in compare.METRICS}


def _two_datasets(tmp_path, n=(300, 323), seeds=(0, 1, 2)):
    """SciFact- and NFCorpus-sized query sets: `good` gains 0.04 on every query, `null` nothing."""
    rng = np.random.default_rng(0)
    work = {}
    for label, nq in zip(("scifact", "nfcorpus"), n):
        work[label] = tmp_path / label
        base = rng.choice([0.0, 0.5, 1.0], size=nq, p=[0.2, 0.3, 0.5])
        for seed in seeds:
            for row, shift in (("de", 0.0), ("good", 0.04), ("null", 0.0)):
                _pq_row(work[label], label, row, seed, {"test": _values(base, shift, rng)})
    return work


def test_query_level_detects_a_planted_difference_pooled_and_per_dataset(tmp_path):
    from md2pr_jax import significance

    work = _two_datasets(tmp_path)
    datasets = {k: str(v) for k, v in work.items()}
    specs = compare.merge_specs([compare.parse_spec(s, datasets) for s in ("de=de", "good=good", "null=null")])
    result = compare.run_comparison(specs[0], specs[1:], permutations=5000)
    tests = result["query_level"]["tests"]["test"]["ndcg@10"]
    assert set(tests) == {"scifact", "nfcorpus", "pooled"}
    assert tests["scifact"]["good"]["n"] == 300 and tests["nfcorpus"]["good"]["n"] == 323
    pooled = tests["pooled"]
    assert pooled["good"]["n"] == 623 and pooled["good"]["seeds"] == {"scifact": [0, 1, 2], "nfcorpus": [0, 1, 2]}
    assert pooled["good"]["p_randomization_holm"] < 0.01 and pooled["good"]["ci95"][0] > 0
    assert pooled["null"]["p_randomization_holm"] > 0.05 and pooled["null"]["ci95"][0] < 0 < pooled["null"]["ci95"][1]
    assert pooled["null"]["mde80"] < 0.04  # the experiment could have seen the planted gain
    # Each query averaged over the seeds first, then differenced: the pooled mean by hand.
    files = result["per_query_files"]
    def avg(row, label):  # noqa: E306
        tables = [json.loads(open(files[row][label][s]["test"]).read())["metrics"]["ndcg@10"] for s in (0, 1, 2)]
        return np.array([np.mean([t[q] for t in tables]) for q in tables[0]])
    diffs = np.concatenate([avg("good", k) - avg("de", k) for k in ("scifact", "nfcorpus")])
    assert pooled["good"]["mean"] == pytest.approx(diffs.mean()) and pooled["good"]["sd"] == pytest.approx(
        diffs.std(ddof=1))
    # Holm across the two rows of each scope, from their raw p-values.
    for scope in tests.values():
        raw = [scope[r]["p_randomization"] for r in ("good", "null")]
        assert [scope[r]["p_randomization_holm"] for r in ("good", "null")] == pytest.approx(significance.holm(raw))
    assert len(result["query_level"]["files"]) == 2 * 3 * 3 and not result["query_level"]["missing"]
    # The seed statistics stand beside, per dataset.
    assert result["seed_level"]["nfcorpus"]["rows"]["good"]["test"]["delta"]["ndcg@10"]["n"] == 3
    text = compare.report_markdown(result)
    assert "Claims rest on the query-level paired randomization test" in text
    assert "| pooled | `good` | 623 | 3 |" in text and "## Seed statistics: nfcorpus" in text


def test_cli_pools_labelled_workdirs_and_refuses_stale_files(tmp_path):
    work = _two_datasets(tmp_path, n=(40, 50), seeds=(0, 1))
    out_dir = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "md2pr_jax.compare", "--dataset", f"scifact={work['scifact']}",
           "--dataset", f"nfcorpus={work['nfcorpus']}", "--baseline", "de=de", "--row", "good=good",
           "--row", "null=null", "--permutations", "2000", "--out", str(out_dir)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    saved = json.loads((out_dir / "compare.json").read_text())
    assert saved["datasets"] == ["scifact", "nfcorpus"] and "--dataset scifact=" in saved["command"]
    assert saved["query_level"]["permutations"] == 2000
    assert saved["query_level"]["tests"]["test"]["mrr@10"]["pooled"]["good"]["n"] == 90
    assert all(p.endswith("student.test.json") for p in saved["query_level"]["files"])
    # One dataset's baseline evaluated before per-query files: tested alone where possible, not pooled.
    old = work["nfcorpus"] / "rows" / "de_s1" / "rounds" / "r01" / "eval" / "per_query" / "student.test.json"
    old.unlink()
    res = compare.run_comparison(*(lambda s: (s[0], s[1:]))(compare.merge_specs(
        [compare.parse_spec(s, {k: str(v) for k, v in work.items()}) for s in ("de=de", "good=good")])),
        permutations=200)
    tests = res["query_level"]["tests"]["test"]["ndcg@10"]
    assert tests["nfcorpus"]["good"]["seeds"] == [0] and "pooled" in tests
    assert any("nfcorpus/test: no per-query file for seed(s) [1]" in m for m in res["query_level"]["missing"])
    # A per-query file whose mean is not the reported mean is stale: an error naming it.
    stale = work["scifact"] / "rows" / "good_s0" / "rounds" / "r01" / "eval" / "per_query" / "student.test.json"
    d = json.loads(stale.read_text())
    d["mean"]["ndcg@10"] += 0.01
    stale.write_text(json.dumps(d))
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0 and "good_s0" in out.stderr and "stale" in out.stderr


def test_an_archive_reruns_the_comparison_after_the_runs_are_gone(tmp_path):
    """--archive copies the per-query files read (and the rows' costs); the comparison rerun
    from the archive, pooled with a workdir, gives the same tests once the runs are deleted."""
    import shutil

    work = _two_datasets(tmp_path, n=(40, 50), seeds=(0, 1))
    timing = work["scifact"] / "rows" / "good_s1" / "timings.json"
    timing.write_text(json.dumps({"rounds/r01/train": 12.5}))
    archive = tmp_path / "archive"
    run = lambda *args: subprocess.run([sys.executable, "-m", "md2pr_jax.compare", *args, "--permutations", "500"],  # noqa: E731
                                       cwd=ROOT, capture_output=True, text=True)
    rows = ["--baseline", "de=de", "--row", "good=good", "--row", "null=null"]
    out = run("--dataset", f"scifact={work['scifact']}", "--dataset", f"nfcorpus={work['nfcorpus']}", *rows,
              "--out", str(tmp_path / "a"), "--archive", str(archive))
    assert out.returncode == 0, out.stderr
    names = sorted(p.name for p in archive.iterdir())
    assert len(names) == 2 * 3 * 2 + 1 and "scifact.good_s1.test.json" in names and "nfcorpus.de_s0.test.json" in names
    assert json.loads((archive / "costs.json").read_text())["scifact"]["rows"]["good"] == {"1": {"rounds/r01/train": 12.5}}
    shutil.rmtree(work["scifact"])
    out = run("--dataset", f"scifact={archive}", "--dataset", f"nfcorpus={work['nfcorpus']}", *rows,
              "--out", str(tmp_path / "b"))
    assert out.returncode == 0, out.stderr
    a, b = (json.loads((tmp_path / d / "compare.json").read_text()) for d in "ab")
    assert a["query_level"]["tests"] == b["query_level"]["tests"] and a["seed_level"] == b["seed_level"]
    assert b["cost_s"]["good"]["scifact"] == {"1": {"rounds/r01/train": 12.5}}
    assert all(f.startswith(str(archive)) for f in b["per_query_files"]["good"]["scifact"]["0"].values())
    # An unlabelled archive spec takes the one dataset its files of that row carry; two is an error.
    with pytest.raises(ValueError, match="name one as LABEL@"):
        compare.parse_spec(f"x={archive}:good")
    for f in archive.glob("nfcorpus.good_s*"):
        f.unlink()
    assert compare.parse_spec(f"x={archive}:good") == ("x", [compare.Part("scifact", str(archive), "good")])
    with pytest.raises(FileNotFoundError, match="no scifact.md2pr_s<seed>.SPLIT.json files"):
        compare.row_runs(str(archive), "md2pr", label="scifact")


def test_a_baseline_given_once_per_dataset_pools_like_dataset_specs(tmp_path):
    """--baseline repeated under one NAME (one workdir per dataset) is the same comparison as
    --dataset specs; two baseline names are refused (a later --baseline never silently wins)."""
    work = _two_datasets(tmp_path, n=(40, 50), seeds=(0, 1))
    run = lambda *args: subprocess.run([sys.executable, "-m", "md2pr_jax.compare", *args, "--permutations", "500"],  # noqa: E731
                                       cwd=ROOT, capture_output=True, text=True)
    out = run("--dataset", f"scifact={work['scifact']}", "--dataset", f"nfcorpus={work['nfcorpus']}",
              "--baseline", "de=de", "--row", "good=good", "--out", str(tmp_path / "a"))
    assert out.returncode == 0, out.stderr
    out = run("--baseline", f"de=scifact@{work['scifact']}:de", "--baseline", f"de=nfcorpus@{work['nfcorpus']}:de",
              "--row", f"good=scifact@{work['scifact']}:good", "--row", f"good=nfcorpus@{work['nfcorpus']}:good",
              "--out", str(tmp_path / "b"))
    assert out.returncode == 0, out.stderr
    a, b = (json.loads((tmp_path / d / "compare.json").read_text()) for d in "ab")
    assert [p["dataset"] for p in b["specs"]["de"]] == ["scifact", "nfcorpus"]
    assert b["query_level"]["tests"]["test"]["ndcg@10"]["pooled"]["good"]["n"] == 90
    assert a["query_level"]["tests"] == b["query_level"]["tests"]
    out = run("--baseline", f"de=scifact@{work['scifact']}:de", "--baseline", f"x=nfcorpus@{work['nfcorpus']}:de",
              "--row", f"good=scifact@{work['scifact']}:good")
    assert out.returncode != 0 and "one baseline row" in out.stderr
