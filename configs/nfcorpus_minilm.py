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
Runtime and results, measured with issue 27's cuts (`bash launch/distill_experiment.sh nfcorpus`:
one student round, 10 mined candidates, rerank at BM25's top 20, 1,000 training queries, and
`--config.teacher_train.epochs=0`, the teacher left at its cross-encoder initialisation, chosen
on dev: the 100-step fine-tuned teacher reranked 120 dev queries at 0.191, its init at 0.272),
2-core CPU: shared stages 29 min (rerank 13 min at 12-16 pairs/s, round-1 teacher pass of
11,000 pairs 15 min), then 6.4-7.4 min per row and seed (62 student steps and evaluation).
Test nDCG@10 (323 queries): BM25 0.3210, untrained 3-layer cut 0.0708, hybrid teacher (w = 6
on dev) reranking BM25's top 20 0.3297, rows over seeds 0-2 de 0.1033, de_sent 0.1313, md2pr
0.1227 (docs/results/distill_l3/). With 2,000 title pseudo-queries (`--config.data.pseudo_kind=title
--config.data.pseudo_queries=2000`, `bash launch/distill_experiment.sh pseudo nfcorpus`: teacher
pass over 33,000 pairs 56 min, ~17-18 min per row and seed, 187 steps), over seeds 0-2:
de_pseudo 0.1392, de_sent_pseudo 0.1519, de_sent_word_pseudo 0.1472, md2pr_pseudo 0.1673 test
nDCG@10 (the filter, not the word level, gives md2pr_pseudo its lead; and the filter's gain is
that of dropping the pseudo-queries' mined candidates: md2pr_pfilter_pseudo 0.1667, which drops the
teacher's 95% of them, and md2pr_pdropall_pseudo 0.1695, which drops all of them, ~25-34 min per row
and seed on a slower day). The full config (300 teacher steps, 2 rounds, all 2,590
queries) has not been run.
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
