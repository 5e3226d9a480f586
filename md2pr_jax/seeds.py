"""Every seed of an experiment, derived from the config in one place, by purpose.

`config.seed` fixes what the rows of an ablation share (data splits, planted positives, the
teacher, round-1 candidates); `config.train.seed` is the student's own randomness on top of it.
The formulas are the ones the runs in docs/results were made with: changing one changes results.
"""

from __future__ import annotations

PURPOSES = {
    # jax.random.PRNGKey seeds
    "student_init": "random student params (the reference tree when the student is pretrained)",
    "teacher_init": "random teacher params (and its score head when the teacher is pretrained)",
    "teacher_state": "the teacher's TrainState rng",
    "student_state": "the student's TrainState rng (dropout)",
    # numpy.random.default_rng seeds
    "planted": "which training positives the planted check hides",
    "teacher_epoch": "negatives and order of the teacher's lists in epoch `index` (fold teachers: (fold, epoch))",
    "teacher_folds": "which training queries each cross-fitted teacher leaves out",
    "pseudo_queries": "which passages give pseudo-queries, and which sentence of each (shared by every row)",
    "list_positives": "which positives of a query with more than data.positives_per_query get lists (shared by every row)",
    "negatives": "round `index`'s negative sampling from the unflagged candidates",
    "random_flags": "round `index`'s random flags (filter.random_flags: which candidates of each list are dropped)",
    "batch_order": "round `index`'s batch order (the train iterator's seed)",
}


def derive_seed(config, purpose: str, index: int | tuple[int, int] = 0) -> int | list[int]:
    """The seed for `purpose` (see PURPOSES); `index` is the round or the epoch where one applies
    (a fold teacher's epoch: (fold, epoch))."""
    s, t = int(config.seed), int(config.train.seed)
    if purpose == "student_init" or purpose == "teacher_state":
        return s
    if purpose == "teacher_init":
        return s + 1
    if purpose == "student_state":
        return s * 7919 + t
    if purpose == "planted":
        return s + 7
    if purpose == "teacher_epoch":
        if isinstance(index, tuple):
            return [s, 2000 + int(index[0]), int(index[1])]
        return [s, 1000 + int(index)]
    if purpose == "teacher_folds":
        return s + 11
    if purpose == "pseudo_queries":
        return s + 13
    if purpose == "list_positives":
        return s + 17
    if purpose == "negatives":
        return [s, t, int(index)]
    if purpose == "random_flags":
        return [s, t, 1000 + int(index)]
    if purpose == "batch_order":
        return (s * 1000 + t) * 100 + int(index)
    raise ValueError(f"unknown seed purpose {purpose!r}; choose from {sorted(PURPOSES)}")
