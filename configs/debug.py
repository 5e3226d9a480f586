"""Debug: a tiny random BERT student and teacher on a SciFact subset, the whole pipeline in minutes.

Command:
    python -m md2pr_jax.main --config configs/debug.py --workdir /tmp/md2pr_debug --mode pipeline
Runtime: a few minutes on a 2-core CPU (most of it compiling).
Result: the metrics of an untrained tiny model are near zero; this config checks that every
stage runs, resumes and writes its artifacts, not that it learns.
"""

from md2pr_jax.config import base_config, bert_shape


def get_config():
    c = base_config()
    c.name = "debug"
    tiny = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=128)
    c.student.bert = bert_shape(**tiny)
    c.teacher.bert = bert_shape(**tiny)  # its own copy: overriding one leaves the other alone
    c.data.max_query_len = 16
    c.data.max_passage_len = 48
    c.data.max_docs = 300
    c.data.max_train_queries = 48
    c.data.max_eval_queries = 32
    c.data.num_negatives = 3
    c.loss.word_topk = 1
    c.loss.layer_pairs = ((1, 1), (2, 2))
    c.train.batch_size = 8
    c.train.lr = 1e-3
    c.train.warmup_steps = 2
    c.train.checkpoint_every = 3
    c.train.log_every = 1
    c.teacher_train.batch_size = 8
    c.teacher_train.num_negatives = 3
    c.teacher_train.lr = 1e-3
    c.teacher_train.epochs = 1
    c.teacher_train.warmup_steps = 2
    c.teacher_train.rerank_depth = 20
    c.rounds.num_rounds = 2
    c.rounds.mine_depth = 10
    c.retrieval.encode_batch_size = 32
    c.retrieval.eval_depth = 100
    c.aot.topology = "v5e:2x2"
    return c
