"""Every seed by purpose (md2pr_jax.seeds): the values the published runs used."""

import pytest

from md2pr_jax.config import base_config
from md2pr_jax.seeds import PURPOSES, derive_seed


def test_seed_values_are_the_published_formulas():
    c = base_config()
    c.seed, c.train.seed = 3, 5
    want = {
        "student_init": 3, "teacher_init": 4, "teacher_state": 3, "student_state": 3 * 7919 + 5, "planted": 10,
        "teacher_epoch": [3, 1002], "negatives": [3, 5, 2], "batch_order": (3 * 1000 + 5) * 100 + 2,
        "teacher_folds": 14,
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
