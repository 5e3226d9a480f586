"""MD2PR on NFCorpus: a 3-layer student cut from all-MiniLM-L6-v2, distilled from a 6-layer
teacher (the whole all-MiniLM-L6-v2, fine-tuned as a cross-encoder) that reads the passage at
256 tokens where the student reads 128, with hybrid soft labels (teacher + w BM25 / max BM25,
w the rerank stage's best on dev).

NFCorpus (../shared/data/nfcorpus, its PROVENANCE.md): 3,633 documents, 2,590 train / 324 dev /
323 test queries, its own dev split (no hold-out from train), about 43 relevant documents per
train query, graded dev/test judgements (nDCG@10 reads the grades; training counts any
relevance > 0 as positive). Each query's lists use one of its positives
(`data.positives_per_query`), drawn by config.seed; every labelled positive stays out of the
mined negatives.

Command:
    python -m md2pr_jax.main --config configs/nfcorpus_minilm.py --workdir runs/nfcorpus --mode pipeline
Runtime and results: not yet measured. Only `--mode prepare` has run on this config (2-core CPU
shared with other jobs: 6.5 s and 14.3 s as prepare reports them, 9 s and 18 s wall, passages
stored at 256 tokens, mean 242). `benchmarks/small_student_step.py --config
configs/nfcorpus_minilm.py` measured the 3-layer student step at 5.3-6.3 s and the teacher at
6.6-12.3 pairs/s (32 + 256 tokens) under a load average of 2-6 on 2 cores: not a planning figure.
Known limitation: with many relevant documents per query, another query's passage in the
batch may be relevant to this one; the contrastive loss still counts it as a negative.
"""

import os

from md2pr_jax.config import load_config


def get_config():
    # The design of configs/scifact_minilm_l3.py (3-layer student cut from all-MiniLM-L6-v2,
    # 6-layer segment-cosine teacher at 256 passage tokens, dev-chosen hybrid labels) on NFCorpus.
    c = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "scifact_minilm_l3.py"))
    c.name = "nfcorpus_minilm"
    c.data.dataset = "nfcorpus"
    c.data.dev_fraction = 0.0  # NFCorpus has its own dev split
    c.data.positives_per_query = 1
    c.train.warmup_steps = 10
    c.teacher_train.max_steps = 300  # ~1 epoch of the 2,590 training lists at batch 8
    return c
