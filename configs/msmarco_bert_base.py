"""MD2PR on MS MARCO passage: BERT-base student, BERT-large-shaped cross-encoder teacher, TPU pod.

Command (every worker of a v5e-16 slice, see launch/tpu_pod.sh):
    python -m md2pr_jax.main --config configs/msmarco_bert_base.py --workdir gs://BUCKET/msmarco_bert_base \
        --mode pipeline
Check that the step fits before renting the pod (runs on any CPU machine with the tpu extra):
    python -m md2pr_jax.main --config configs/msmarco_bert_base.py --workdir /tmp/aot --mode aot
Data: MS MARCO passage TSVs (collection.tsv, queries.{train,dev}.tsv, qrels.{train,dev}.tsv) in
    config.data.dir/msmarco, or gs://; weights: the Hugging Face hub ids below (needs internet).
Runtime: not measured (no pod was available). Estimate from the AOT FLOPs below at 40% of the
    v5e peak (197 bf16 TFLOP/s per chip): about 0.3 s per step, i.e. ~1,000 steps (one pass
    over 502k training queries at 512 per step) in a few minutes per round plus corpus encoding
    (8.8M passages) and mining, roughly 1-2 hours for 2 rounds.
Result: not measured. For reference, RocketQA-style BERT-base dual encoders reach MRR@10 about
    0.37-0.39 on MS MARCO dev; MD2PR reports gains over such baselines.

AOT report measured on this project's 2-core CPU (jax 0.10.2, libtpu 0.0.42), --mode aot:
    v5e:4x4 (16 chips, mesh fsdp=16), batch 512 x 8 passages, teacher online: 14.467 GiB per
    chip of 16 GiB -> fits=true; arguments 160 MiB, temporaries 14.20 GiB, 3.34e+14 FLOPs
    per step (XLA cost analysis), compiled in 668 s.
    The JSON line it printed:
        {"topology": "v5e:4x4", "chips": 16, "device_kind": "TPU v5 lite", "mesh": {"data":
        1, "fsdp": 16, "tensor": 1}, "batch_size": 512, "candidates": 8, "teacher_mode":
        "online", "bytes_per_chip": {"arguments": 167410688, "temporaries": 15245673984,
        "outputs": 82627072, "aliased": 82620416, "code": 121083392, "total": 15534174720},
        "gib_per_chip": 14.467, "flops_per_chip": 20878456782848.0, "flops_per_step":
        334055308525568.0, "hbm_bytes_per_chip": 17179869184, "fits": true, "compile_s":
        668.0}
"""

from md2pr_jax.config import bert_base_pod_config


def get_config():
    c = bert_base_pod_config()
    c.name = "msmarco_bert_base"
    c.data.builder = "msmarco_passage"
    c.data.dataset = "msmarco"
    c.data.eval_split = "dev"
    c.data.max_passage_len = 128
    c.train.warmup_steps = 500
    c.train.epochs = 1
    c.train.checkpoint_every = 500
    c.train.log_every = 50
    c.teacher_train.epochs = 1
    c.teacher_train.warmup_steps = 1000
    c.retrieval.eval_depth = 1000
    c.aot.topology = "v5e:4x4"
    return c
