"""md2pr_jax.dev_tune: the grid's parsing and choice, and (data) a tuning run over a finished
ablation that shares its stages, evaluates dev alone, and runs the chosen row on test."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from md2pr_jax import dev_tune
from md2pr_jax.config import ConfigError, base_config


def test_the_grid_takes_row_keys_only_and_types_their_values():
    c = base_config()
    grid = dev_tune.parse_grid(c, ["train.epochs=1,3", "loss.kd_temperature=1,2"])
    assert grid == [("train.epochs", [1, 3]), ("loss.kd_temperature", [1.0, 2.0])]
    assert isinstance(grid[1][1][0], float)  # typed as the config's own value, not the text
    pts = dev_tune.points(grid)
    assert [dev_tune.point_name(p) for p in pts] == [
        "train.epochs=1__loss.kd_temperature=1.0", "train.epochs=1__loss.kd_temperature=2.0",
        "train.epochs=3__loss.kd_temperature=1.0", "train.epochs=3__loss.kd_temperature=2.0"]
    cfg = dev_tune.with_point(c, pts[3], "dev")
    assert (cfg.train.epochs, cfg.loss.kd_temperature, cfg.data.eval_split) == (3, 2.0, "dev")
    assert c.data.eval_split == "test" and c.train.epochs == 1  # the source config is left alone
    for bad, says in [("teacher_train.lr=1e-4,3e-4", "only the row keys"), ("train.lr", "KEY=V1,V2"),
                      ("train.lr=1e-4,1e-4", "repeated"), ("train.nope=1,2", "unknown config key")]:
        with pytest.raises(ConfigError, match=says):
            dev_tune.parse_grid(c, [bad])
    with pytest.raises(ConfigError, match="given twice"):
        dev_tune.parse_grid(c, ["train.lr=1e-4", "train.lr=3e-4"])


def test_each_row_gets_its_best_dev_point_and_ties_go_to_the_earlier():
    table = {"a": {"de": {"dev": {"ndcg@10": 0.30}}, "md2pr": {"dev": {"ndcg@10": 0.40}}},
             "b": {"de": {"dev": {"ndcg@10": 0.35}}, "md2pr": {"dev": {"ndcg@10": 0.40}}},
             "c": {"de": {"dev": {"ndcg@10": 0.33}}}}
    chosen = dev_tune.choose(table, ["de", "md2pr", "de_sent"], ["a", "b", "c"], "ndcg@10")
    assert chosen["de"]["point"] == "b" and chosen["de"]["points_finished"] == 3
    assert chosen["md2pr"]["point"] == "a" and chosen["md2pr"]["points_finished"] == 2
    assert "de_sent" not in chosen


@pytest.mark.data
def test_tuning_shares_the_source_evaluates_dev_only_and_runs_the_choice_on_test(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    config = ["--config", os.path.join(ROOT, "configs/debug.py"), "--config.rounds.num_rounds=1"]
    no_dev = subprocess.run([sys.executable, "-m", "md2pr_jax.ablation", *config, "--workdir", str(tmp_path / "nodev"),
                             "--rows", "de", "--seeds", "0", "--upto", "filter"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    assert no_dev.returncode == 0, no_dev.stderr[-3000:]
    refused = subprocess.run([sys.executable, "-m", "md2pr_jax.dev_tune", *config, "--source", str(tmp_path / "nodev"),
                              "--workdir", str(tmp_path / "t0"), "--grid", "train.lr=1e-3,3e-3"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "no dev split" in refused.stderr  # debug.py: train and test only
    config.append("--config.data.dev_fraction=0.25")
    source = tmp_path / "source"
    out = subprocess.run([sys.executable, "-m", "md2pr_jax.ablation", *config, "--workdir", str(source),
                          "--rows", "de", "--seeds", "0"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    tune, final, docs = tmp_path / "tune", tmp_path / "final", tmp_path / "docs"
    cmd = [sys.executable, "-m", "md2pr_jax.dev_tune", *config, "--source", str(source), "--workdir", str(tune),
           "--rows", "de", "--grid", "train.lr=1e-3,3e-3", "--final_workdir", str(final), "--final_seeds", "0,1",
           "--results_dir", str(docs)]
    bad = subprocess.run([*cmd[:-8], "--grid", "teacher_train.lr=1e-3,3e-3"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "only the row keys" in bad.stderr
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]

    own, other = tune / "train.lr=0.001", tune / "train.lr=0.003"
    # Both points share the source's round 0 and round-1 teacher pass; the point at the source's own
    # lr (debug: 1e-3) links the source's finished row, the other trains and evaluates dev alone.
    for point in (own, other):
        assert os.path.islink(point / "shared" / "teacher") and os.path.islink(point / "shared" / "rounds" / "r01" / "score")
    assert os.path.islink(own / "rows" / "de_s0" / "rounds" / "r01" / "train")
    assert not (own / "rows" / "de_s0" / "timings.json").exists()
    ran = json.loads((other / "rows" / "de_s0" / "timings.json").read_text())
    assert "rounds/r01/train" in ran
    metrics = json.loads((other / "rows" / "de_s0" / "results.json").read_text())["rounds"][-1]["metrics"]
    assert set(metrics) == {"dev"}  # test never computed while tuning

    result = json.loads((tune / "tune.json").read_text())
    assert result == json.loads((docs / "tune.json").read_text()) and (docs / "TUNE.md").exists()
    assert result["complete"] and result["points"] == ["train.lr=0.001", "train.lr=0.003"]
    table = result["table"]
    assert table["train.lr=0.001"]["de"]["linked"] and not table["train.lr=0.003"]["de"]["linked"]
    dev = {p: table[p]["de"]["dev"]["ndcg@10"] for p in result["points"]}
    best = max(result["points"], key=dev.get)
    assert result["chosen"]["de"]["point"] == best
    assert json.loads(out.stdout.strip().splitlines()[-2]) == {"de": [f"--config.{best}"]}

    # The chosen point with every final seed, on the config's own eval split (test) and dev: seed 0
    # is the chosen point's own run (linked where that is the source's), seed 1 trains anew.
    rows = {seed: final / "de" / "rows" / f"de_s{seed}" for seed in (0, 1)}
    got = {seed: json.loads((row / "results.json").read_text())["rounds"][-1]["metrics"] for seed, row in rows.items()}
    assert all({"test", "dev"} <= set(m) for m in got.values())
    assert got[0]["dev"]["ndcg@10"] == pytest.approx(dev[best])
    assert "rounds/r01/train" in json.loads((rows[1] / "timings.json").read_text())
    assert got[1]["dev"]["ndcg@10"] != got[0]["dev"]["ndcg@10"]
