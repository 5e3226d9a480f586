"""MD2PR on SciFact with a teacher that has something to teach: the SciFact recipe
(configs/scifact_minilm.py) with a 3-layer student cut from all-MiniLM-L6-v2, the 6-layer teacher
reading the passage at 256 tokens (the student reads 128; the median SciFact abstract is about
248), and hybrid soft labels (teacher + w BM25 / max BM25, w the rerank stage's best on dev).

Command:
    python -m md2pr_jax.main --config configs/scifact_minilm_l3.py --workdir runs/scifact_l3 --mode pipeline
Runtime and results: not yet measured.
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
