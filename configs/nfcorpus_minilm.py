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
Runtime and results: not yet measured (only `--mode prepare` has run on this config; see README).
"""

from md2pr_jax.config import MINILM_ID, base_config, bert_shape


def get_config():
    c = base_config()
    c.name = "nfcorpus_minilm"
    c.student.init = MINILM_ID
    c.student.bert = bert_shape(num_layers=3)
    c.student.truncate_init = True  # the first 3 of all-MiniLM-L6-v2's 6 layers
    c.student.pooling = "mean"
    c.student.normalize = True
    c.student.similarity_scale = 20.0
    c.teacher.init = MINILM_ID
    c.teacher.bert = bert_shape(num_layers=6)
    c.teacher.max_passage_len = 256
    # The teacher reads the pair jointly with the segment-cosine head (see configs/scifact_minilm.py).
    c.teacher.head = "segment_cosine"
    c.teacher.head_scale = 20.0
    c.teacher.head_bias = -15.0
    c.teacher.bm25_weight_from_dev = True
    c.data.dataset = "nfcorpus"
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.dev_fraction = 0.0  # NFCorpus has its own dev split
    c.data.max_query_len = 32
    c.data.max_passage_len = 128
    c.data.num_negatives = 7
    c.data.positives_per_query = 1
    c.loss.layer_pairs = ((-1, -1),)
    c.train.batch_size = 16
    c.train.lr = 3e-5
    c.train.warmup_steps = 10
    c.train.epochs = 1
    c.teacher_train.batch_size = 8
    c.teacher_train.num_negatives = 7
    c.teacher_train.max_steps = 300  # ~1 epoch of the 2,590 training lists
    c.teacher_train.warmup_steps = 10
    c.teacher_train.lr = 1e-4
    c.teacher_train.rerank_depth = 100
    c.rounds.num_rounds = 2
    c.rounds.mine_depth = 20
    return c
