"""Every seed by purpose (md2pr_jax.seeds): the values the published runs used; the config rules of
the seeded teacher folds."""

import pytest

from md2pr_jax.config import base_config
from md2pr_jax.seeds import PURPOSES, derive_seed


def test_seed_values_are_the_published_formulas():
    c = base_config()
    c.seed, c.train.seed = 3, 5
    want = {
        "student_init": 3, "teacher_init": 4, "teacher_state": 3, "student_state": 3 * 7919 + 5, "planted": 10,
        "teacher_epoch": [3, 1002], "negatives": [3, 5, 2], "batch_order": (3 * 1000 + 5) * 100 + 2,
        "teacher_folds": 14, "pseudo_queries": 16, "list_positives": 20,
        "random_flags": [3, 5, 1002],
    }
    assert set(want) == set(PURPOSES)
    for purpose, value in want.items():
        assert derive_seed(c, purpose, 2) == value, purpose
    with pytest.raises(ValueError, match="unknown seed purpose 'dropout'"):
        derive_seed(c, "dropout")


def test_fold_teachers_epochs_have_their_own_seeds():
    c = base_config()
    assert derive_seed(c, "teacher_epoch", (1, 2)) == [0, 2001, 2]
    assert derive_seed(c, "teacher_epoch", (1, 2)) != derive_seed(c, "teacher_epoch", (0, 2))


def test_fold_teachers_and_hybrid_labels_need_the_cached_teacher():
    from md2pr_jax.config import ConfigError, validate

    c = base_config()
    c.loss.teacher_mode = "online"
    c.teacher_train.folds = 2
    with pytest.raises(ConfigError, match="folds > 1 needs loss.teacher_mode='cached'"):
        validate(c)
    c.teacher_train.folds = 1
    c.teacher.bm25_weight = 4.0
    with pytest.raises(ConfigError, match="bm25_weight > 0 needs loss.teacher_mode='cached'"):
        validate(c)
    c.loss.teacher_mode = "cached"
    c.teacher.bm25_weight = -1.0
    with pytest.raises(ConfigError, match="must be >= 0"):
        validate(c)
    c.teacher.bm25_weight = 4.0
    assert validate(c) is c
