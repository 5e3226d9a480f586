"""MD2PR on SciFact with pseudo-queries: the teacher labels queries it never trained on.

The SciFact recipe (configs/scifact_minilm.py) plus 500 pseudo-queries cut from the corpus
(one seeded sentence of a passage, inverse-cloze style; md2pr_jax/data/pseudo.py), mined and
scored by the teacher in every round beside the 728 training queries. The student trains on
both (`train.pseudo`): a pseudo-query's hard label is its source passage; its soft labels are
the teacher's scores over the mined candidates. The filter's tau_hat comes from the
pseudo-queries' positives (which no teacher trained on), and flagged candidates stay in the
distillation lists with their teacher scores (out of the contrastive negatives).

Command:
    python -m md2pr_jax.main --config configs/scifact_minilm_pseudo.py --workdir runs/scifact_pseudo --mode pipeline
The comparison that matters is soft against hard labels on the same queries (README, "Does
the teacher help?"):
    python -m md2pr_jax.ablation --config configs/scifact_minilm_pseudo.py --workdir runs/abl_pseudo \
        --rows de_pseudo,md2pr_pseudo,de,md2pr --multi_seed_rows de_pseudo,md2pr_pseudo,de,md2pr --seeds 0
Runtime (2-core CPU, one round, rerank stage off: `--config.rounds.num_rounds=1
--config.teacher_train.rerank_depth=0`): round 0 about 23 min (baselines 3, teacher 20), round
1's teacher pass over 25.9k pairs 17.6 min, then per row 6-16 min of training and 1.3 min of
evaluation (md2pr_pseudo: 82 steps). The two-round pipeline was not run end to end.
Result (README, "Pseudo-queries, the word-level layer fix, flagged candidates kept"): one
round, paired by seed, md2pr_pseudo beats de_pseudo on test but not on dev, and both pseudo
rows stay below plain DE on test: this recipe does not yet make distillation pay.
"""

import os

from md2pr_jax.config import load_config


def get_config():
    c = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "scifact_minilm.py"))
    c.name = "scifact_minilm_pseudo"
    c.data.pseudo_queries = 500
    c.data.pseudo_kind = "sentence"
    c.train.pseudo = True
    c.filter.tau_source = "pseudo"
    c.filter.keep_flagged = True
    return c
