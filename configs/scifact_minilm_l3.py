"""MD2PR on SciFact with a teacher that has something to teach: the SciFact recipe
(configs/scifact_minilm.py) with a 3-layer student cut from all-MiniLM-L6-v2, the 6-layer teacher
reading the passage at 256 tokens (the student reads 128; the median SciFact abstract is about
248), and hybrid soft labels (teacher + w BM25 / max BM25, w the rerank stage's best on dev).

Command:
    python -m md2pr_jax.main --config configs/scifact_minilm_l3.py --workdir runs/scifact_l3 --mode pipeline
Runtime and results: not run end to end as written. Issue 27's experiment ran it with one
round, 10 mined candidates, the rerank at BM25's top 20 and 100 teacher steps
(`launch/distill_experiment.sh scifact`, 2-core CPU): baselines 178 s, teacher 66 min, rerank
33 min, round-1 teacher pass over 8,101 pairs 20 min, each row and seed ~9.5 min. Test
nDCG@10: BM25 0.686, untrained 3-layer cut 0.201, teacher rerank of BM25 top 20 0.736, hybrid
(w = 6 from dev) 0.756, DE after one 51-step round 0.354 (docs/results/distill_l3/).
"""

import os

from md2pr_jax.config import bert_shape, load_config


def get_config():
    c = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "scifact_minilm.py"))
    c.name = "scifact_minilm_l3"
    c.student.bert = bert_shape(num_layers=3)
    c.student.truncate_init = True
    c.teacher.max_passage_len = 256
    c.teacher.bm25_weight_from_dev = True
    return c
