"""The config keys of the distillation design: their validation and the shipped configs."""

import os

import pytest
from conftest import ROOT

from md2pr_jax.config import ConfigError, base_config, load_config, teacher_passage_len, validate


def test_teacher_passage_length_rules():
    c = base_config()
    assert teacher_passage_len(c) == c.data.max_passage_len  # 0: the student's
    c.teacher.max_passage_len = 256
    assert teacher_passage_len(validate(c)) == 256
    c.teacher.max_passage_len = 64
    with pytest.raises(ConfigError, match="teacher.max_passage_len=64 is shorter than the student's"):
        validate(c)
    c.teacher.max_passage_len = 500
    with pytest.raises(ConfigError, match="max_position_embeddings=512"):
        validate(c)


@pytest.mark.parametrize("key,value,match", [
    ("loss.word_temperature", 0.0, "word_temperature must be positive"),
    ("data.positives_per_query", -1, "positives_per_query and teacher.max_passage_len must be >= 0"),
    ("data.tokenize_threads", -2, "tokenize_threads must be an integer >= 0"),
])
def test_bad_values_are_named(key, value, match):
    c = base_config()
    section, name = key.split(".")
    c[section][name] = value
    with pytest.raises(ConfigError, match=match):
        validate(c)


def test_dev_chosen_hybrid_weight_needs_the_cached_teacher_and_the_rerank_sweep():
    c = base_config()
    c.teacher.bm25_weight_from_dev = True
    c.teacher_train.rerank_depth = 100
    assert validate(c) is c
    c.loss.teacher_mode = "online"
    with pytest.raises(ConfigError, match="needs loss.teacher_mode='cached'"):
        validate(c)


@pytest.mark.parametrize("name,dataset,layers", [("nfcorpus_minilm", "nfcorpus", 3), ("scifact_minilm_l3", "scifact", 3)])
def test_small_student_configs(name, dataset, layers):
    c = load_config(os.path.join(ROOT, "configs", f"{name}.py"))
    assert c.data.dataset == dataset and c.student.bert.num_layers == layers and c.student.truncate_init
    assert c.teacher.bert.num_layers == 6 and c.teacher.max_passage_len == 256 and c.data.max_passage_len == 128
    assert c.teacher.bm25_weight_from_dev and c.loss.teacher_mode == "cached"
