"""MD2PR on SciFact: all-MiniLM-L6-v2 student, teacher initialised from the same encoder.

Command:
    python -m md2pr_jax.main --config configs/scifact_minilm.py --workdir runs/scifact --mode pipeline
Runtime: target at most 90 minutes on a 2-core CPU (see README for the measured time).
Result: see README "Results" (SciFact test nDCG@10; BM25 0.686 and zero-shot 0.645 for reference).
"""

from md2pr_jax.config import MINILM_ID, base_config


def get_config():
    c = base_config()
    c.name = "scifact_minilm"
    c.student.init = MINILM_ID
    c.teacher.init = MINILM_ID
    c.student.pooling = "mean"
    c.student.normalize = True
    c.student.similarity_scale = 20.0
    c.data.dataset = "scifact"
    c.data.max_query_len = 32
    c.data.max_passage_len = 128
    c.data.num_negatives = 7
    c.data.dev_fraction = 0.1
    c.loss.layer_pairs = ((-1, -1),)
    c.train.batch_size = 16
    c.train.lr = 3e-5
    c.train.warmup_steps = 5  # one epoch is ~50 steps
    c.train.epochs = 1
    c.teacher_train.batch_size = 8
    c.teacher_train.num_negatives = 7
    c.teacher_train.epochs = 1
    c.teacher_train.warmup_steps = 10
    c.teacher_train.lr = 3e-5
    c.teacher_train.rerank_depth = 50
    c.rounds.num_rounds = 2
    c.rounds.mine_depth = 20
    c.aot.topology = "v5e:2x2"
    return c
