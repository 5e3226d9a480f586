"""benchmarks/pod_plan.py's arithmetic on stubbed FLOPs and rehearsal figures (nothing compiled)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_plan_module():
    spec = importlib.util.spec_from_file_location("pod_plan", os.path.join(ROOT, "benchmarks", "pod_plan.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["pod_plan"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


pp = _load_plan_module()

FPI = {"encode_query": 1e9, "encode_passage": 5e9, "teacher_score": 1e11, "teacher_train_step": 1e14,
       "train_step": 3e14}
ITEMS = {"encode_query": "text", "encode_passage": "text", "teacher_score": "pair", "teacher_train_step": "step",
         "train_step": "step"}


def _flops(**overrides):
    fpi = {**FPI, **overrides}
    return {"functions": {k: {"flops_per_item": v, "item": ITEMS[k], "items_per_call": 1, "devices": 16,
                              "bytes_per_chip": 0, "compile_s": 0.0, "source": "stub"} for k, v in fpi.items()}}


def _rehearsal(tmp_path, drop=(), rate=1000.0, cores=2):
    stages = [{"name": n, "items": 2_000_000, "wall_s": 2_000_000 / rate, "items_per_s": rate, "peak_rss_gb": 1.0}
              for n in ("prepare", "bm25_index", "bm25_search", "bm25_pair_scores", "scann_build", "scann_search",
                        "mining", "filter") if n not in drop]
    path = tmp_path / "rehearsal.json"
    path.write_text(json.dumps({"cores": cores, "stand_in": True, "stages": stages}))
    return pp.load_rehearsal(str(path))


@pytest.fixture(scope="module")
def config():
    from md2pr_jax.config import load_config

    return load_config(os.path.join(ROOT, "configs", "msmarco_bert_base.py"))


def _plan(config, rehearsal, flops=None, utilisation=0.4, hosts=4, vcpus=112, efficiency=0.5):
    pod = pp.make_pod("v5e:4x4", 16, hosts, utilisation, efficiency, host_vcpus=vcpus)
    return pp.plan(config, pod, flops or _flops(), rehearsal, pp.dataset_sizes(config))


def _stage(result, name):
    return next(s for s in result["stages"] if s["name"] == name)


def test_work_counts_follow_the_config(config):
    work = pp.pipeline_work(config, pp.dataset_sizes(config))
    assert work["score_pairs"] == 502_939 * 50 + 532_761 == 25_679_711
    assert work["teacher_steps"] == 532_761 // 128
    assert work["student_steps"] == 532_761 // 512
    assert work["rerank_pairs"] == 6_980 * 100
    cfg = config.copy_and_resolve_references()
    cfg.rounds.mine_depth = 100
    assert pp.pipeline_work(cfg, pp.dataset_sizes(cfg))["score_pairs"] == 502_939 * 100 + 532_761


def test_compute_stage_is_flops_over_chips_peak_utilisation(config, tmp_path):
    reh = _rehearsal(tmp_path)
    low, high = _plan(config, reh, utilisation=0.4), _plan(config, reh, utilisation=0.8)
    score = _stage(low, "r1_teacher_score")
    assert score["projected_s"] == pytest.approx(25_679_711 * 1e11 / (16 * 197e12 * 0.4), rel=1e-12)
    assert _stage(low, "r2_train")["projected_s"] == pytest.approx(1040 * 3e14 / (16 * 197e12 * 0.4), rel=1e-12)
    for name in ("r1_teacher_score", "r1_train", "teacher_train", "encode_corpus_r0"):
        assert _stage(low, name)["projected_s"] == pytest.approx(2 * _stage(high, name)["projected_s"], rel=1e-12)
    # host stages do not depend on the chips' utilisation
    assert _stage(low, "r1_filter")["projected_s"] == _stage(high, "r1_filter")["projected_s"]
    assert low["assumptions"]["utilisation"] == 0.4 and "0.4 utilisation" in score["basis"]


def test_host_stages_split_across_hosts_only_where_the_code_splits_them(config, tmp_path):
    reh = _rehearsal(tmp_path)
    four, two = _plan(config, reh, hosts=4), _plan(config, reh, hosts=2)
    bm = _stage(four, "bm25_search_train")
    assert bm["work"]["per_host"] == math.ceil(502_939 / 4) and bm["split_across_hosts"]
    # BM25 search: 1000 items/s on 2 cores -> x 112/2 x 0.5 threads, x 2M / 8.84M for the whole corpus
    rate = 1000.0 * (112 / 2) * 0.5 * (2_000_000 / 8_841_823)
    assert bm["projected_s"] == pytest.approx(math.ceil(502_939 / 4) / rate, rel=1e-9)
    assert _stage(two, "bm25_search_train")["projected_s"] == pytest.approx(2 * bm["projected_s"], rel=1e-5)
    # the filter and the BM25 index: every host does all of it
    for name in ("r1_filter", "bm25_index", "prepare"):
        assert _stage(two, name)["projected_s"] == _stage(four, name)["projected_s"]
    assert _stage(four, "r1_filter")["projected_s"] == pytest.approx(502_939 / 1000.0)


def test_only_threaded_host_work_scales_with_cores(config, tmp_path):
    reh = _rehearsal(tmp_path)
    base, wide = _plan(config, reh, vcpus=112), _plan(config, reh, vcpus=224)
    assert _stage(wide, "r1_scann_search")["projected_s"] == pytest.approx(
        _stage(base, "r1_scann_search")["projected_s"] / 2, rel=1e-12)
    assert _stage(wide, "r1_mining")["projected_s"] == _stage(base, "r1_mining")["projected_s"]
    # ScaNN measured on 384-dim embeddings: the config's 768 take twice as long per item
    reh["stages"]["scann_search"] = dict(reh["stages"]["scann_search"], dim=384)
    assert _stage(_plan(config, reh), "r1_scann_search")["projected_s"] == pytest.approx(
        2 * _stage(base, "r1_scann_search")["projected_s"], rel=1e-12)
    del reh["stages"]["scann_search"]["dim"]
    half = _plan(config, reh, efficiency=0.25)
    assert _stage(half, "bm25_search_dev")["projected_s"] == pytest.approx(
        2 * _stage(base, "bm25_search_dev")["projected_s"], rel=1e-12)


def test_over_budget_stage_is_flagged_with_a_fix(config, tmp_path):
    reh = _rehearsal(tmp_path, rate=1e9)
    slow = _plan(config, reh, flops=_flops(teacher_score=1e12))  # ~2.8 h per round's pass
    row = _stage(slow, "r1_teacher_score")
    assert row["over_budget"] and "mine_depth" in row["note"]
    assert "rounds/r01/score" in slow["budget"]["stages_over"]
    assert slow["budget"]["verdict"].startswith("over budget")
    entry = next(e for e in slow["pipeline_stages"] if e["name"] == "rounds/r02/score")
    assert entry["over_budget"] and "r2_teacher_score" in entry["note"]
    fast = _plan(config, reh, flops=_flops(teacher_score=1e9, train_step=1e12, teacher_train_step=1e12))
    assert fast["budget"]["stages_over"] == [] and fast["budget"]["verdict"] == "within budget"
    assert fast["total_projected_s"] == pytest.approx(sum(s["projected_s"] for s in fast["stages"]))
    assert fast["budget"]["chips_s"] + fast["budget"]["hosts_s"] == pytest.approx(fast["total_projected_s"])
    # a slow one-thread host stage names the missing parallelism
    serial = _plan(config, _rehearsal(tmp_path, rate=10.0))
    filt = _stage(serial, "r1_filter")
    assert filt["over_budget"] and "one thread" in filt["note"] and "split the work" in filt["note"]


def test_unmeasured_host_stage_is_not_guessed(config, tmp_path):
    result = _plan(config, _rehearsal(tmp_path, drop=("filter",), rate=1e9))
    row = _stage(result, "r1_filter")
    assert row["projected_s"] is None and "unmeasured" in row["note"]
    assert "r1_filter" in result["budget"]["unprojected_rows"]
    assert "lower bound" in result["budget"]["verdict"]
    assert "REHEARSAL IS A STAND-IN" in pp.format_table(result)


def test_rehearsal_map_names_another_stage(config, tmp_path):
    reh = _rehearsal(tmp_path, drop=("filter",))
    reh["stages"]["filter_round_v2"] = {"name": "filter_round_v2", "items": 10, "wall_s": 1.0, "items_per_s": 10.0}
    reh["map"] = {"filter": ("filter_round_v2",)}
    row = _stage(_plan(config, reh), "r1_filter")
    assert row["projected_s"] == pytest.approx(502_939 / 10.0) and "filter_round_v2" in row["basis"]


def test_memory_per_host_and_total(config, tmp_path):
    result = _plan(config, _rehearsal(tmp_path))
    comp = result["memory"]["components_per_host_gb"]
    assert comp["corpus_emb_shard"]["gb"] == pytest.approx(math.ceil(8_841_823 / 4) * 768 * 4 / 1e9, rel=1e-3)
    # the rehearsal's BM25 peak RSS (1 GB at 2M passages) scaled to the corpus
    assert comp["bm25_index"]["gb"] == pytest.approx(8_841_823 / 2_000_000, rel=1e-3)
    assert result["memory"]["total_gb"] == pytest.approx(4 * result["memory"]["peak_per_host_gb"], rel=1e-6)
    assert result["memory"]["peak_per_host_gb"] == max(s["host_memory_gb"] for s in result["stages"])
    # every process keeps its BM25 index loaded from the baselines on: in the filter's memory, not in prepare's
    parts = ("scores", "mining_lists", "bm25_index")
    assert _stage(result, "r1_filter")["host_memory_gb"] == pytest.approx(sum(comp[p]["gb"] for p in parts), abs=0.01)
    assert _stage(result, "prepare")["host_memory_gb"] == pytest.approx(
        comp["doc_texts"]["gb"] + comp["doc_tokens"]["gb"], abs=0.01)


def test_flops_cache_is_keyed_by_the_config(config, tmp_path):
    cfg = config.copy_and_resolve_references()
    key = pp.config_key(cfg)
    cfg.train.batch_size = 256
    assert pp.config_key(cfg) != key
    cfg.train.batch_size = config.train.batch_size
    cfg.student.init = "elsewhere"  # init paths do not change what is compiled
    assert pp.config_key(cfg) == key
    path = tmp_path / "cache.json"
    path.write_text(json.dumps({"key": "stale", "topology": "v5e:4x4", "functions": _flops()["functions"]}))
    with pytest.raises(RuntimeError, match="no-compile"):
        pp.flops_table(config, "v5e:4x4", str(path), compile_missing=False)
    path.write_text(json.dumps({"key": key, "topology": "v5e:4x4", "functions": _flops()["functions"]}))
    assert pp.flops_table(config, "v5e:4x4", str(path), compile_missing=False)["functions"]["train_step"][
        "flops_per_item"] == 3e14


def test_flops_checks_compare_xla_counts_with_the_hand_rule(config):
    # a fine-tuning step of exactly 3 forwards per pair, and a train step at half the hand count
    fpi = dict(FPI, teacher_train_step=3 * 128 * 8 * FPI["teacher_score"])
    hand = 3 * (512 * 8 * FPI["encode_passage"] + 512 * FPI["encode_query"]) + 512 * 2 * FPI["teacher_score"]
    fpi["train_step"] = hand / 2
    checks = pp.flops_checks(config, _flops(**fpi)["functions"])
    assert checks["teacher_train_step_over_forward"] == pytest.approx(3.0)
    assert checks["train_step_hand_count"] == pytest.approx(hand)
    assert checks["train_step_over_hand_count"] == pytest.approx(0.5)


def test_bad_inputs_raise_clear_errors(config, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"stages": [{"name": "filter"}]}))
    with pytest.raises(ValueError, match="items_per_s"):
        pp.load_rehearsal(str(bad))
    with pytest.raises(ValueError, match="utilisation"):
        pp.make_pod("v5e:4x4", 16, 4, 1.5, 0.5)
    cfg = config.copy_and_resolve_references()
    cfg.data.dataset = "unknown"
    with pytest.raises(ValueError, match="--sizes"):
        pp.dataset_sizes(cfg)


def test_scale_rehearsal_json_is_read_per_host_kind(tmp_path):
    """benchmarks/scale_rehearsal.py's stages-with-parts JSON maps onto the host kinds: a ScaNN
    build per call on the rehearsal's corpus, mining as the mine stage less its parts."""
    plan = _load_plan_module()
    data = {"machine": {"cores": 2}, "sizes": {"passages": 1000}, "config": {"student.bert": {"hidden_size": 32}},
            "stages": {"prepare": {"items": 1000, "wall_s": 10.0, "items_per_s": 100.0},
                       "mine": {"items": 50, "wall_s": 12.0, "items_per_s": 50 / 12,
                                "parts": {"ann_index": {"calls": 2, "items": 2000, "wall_s": 4.0, "items_per_s": 500.0},
                                          "dense_search": {"calls": 1, "items": 50, "wall_s": 2.0, "items_per_s": 25.0}}}}}
    path = tmp_path / "rehearsal.json"
    path.write_text(json.dumps(data))
    r = plan.load_rehearsal(str(path))
    build = plan.rehearsal_stage(r, "scann_build")
    assert build["items"] == 1000 and build["wall_s"] == 2.0 and build["dim"] == 32 and build["corpus"] == 1000
    assert plan.rehearsal_stage(r, "scann_search")["items_per_s"] == 25.0
    mining = plan.rehearsal_stage(r, "mining")
    assert mining["wall_s"] == pytest.approx(6.0) and mining["items_per_s"] == pytest.approx(50 / 6)
    assert r["corpus"] == 1000 and plan.rehearsal_stage(r, "prepare")["items_per_s"] == 100.0
