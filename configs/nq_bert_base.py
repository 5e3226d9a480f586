"""MD2PR on Natural Questions (DPR release): BERT-base student, BERT-large-shaped teacher, TPU pod.

Command (every worker of a v4-32 slice = 16 chips, see launch/tpu_pod.sh):
    python -m md2pr_jax.main --config configs/nq_bert_base.py --workdir gs://BUCKET/nq_bert_base --mode pipeline
Check that the step fits before renting the pod (runs on any CPU machine with the tpu extra):
    python -m md2pr_jax.main --config configs/nq_bert_base.py --workdir /tmp/aot --mode aot
Data: DPR's psgs_w100.tsv, biencoder-nq-{train,dev}.json and nq-test.qa.csv in
    config.data.dir/nq; weights: the Hugging Face hub ids below (needs internet).
Runtime: not measured (no pod was available). Estimate from the AOT FLOPs below at 40% of the
    v4 peak (275 bf16 TFLOP/s per chip): well under a second per step; ~115 steps per pass over
    the 58.9k training questions at 512 per step, so a round is dominated by encoding the
    21M-passage corpus and mining; roughly 2-3 hours for 2 rounds.
Teacher scoring per round (rounds.mine_depth below): 58,880 training questions x 50 mined
    candidates = 2,944,000 pairs plus the labelled positives (about 3.0M); XLA's cost analysis of
    the scoring function (benchmarks/score_flops.py; 32 + 192 tokens, bf16) gives 1.41e11 FLOPs per pair,
    so ~4.2e17 FLOPs per round: ~4 min on v4:2x2x4 at 40% of the 275 TFLOP/s peak.
Result: not measured. For reference, DPR (BERT-base) reaches top-20 retrieval accuracy 78.4 on
    the NQ test set and RocketQA 82.7; MD2PR reports gains over such baselines.

AOT report measured on this project's 2-core CPU (jax 0.10.2, libtpu 0.0.42), --mode aot, on
the model, loss and train step of commit 1f062f0 (re-run after the attention rewrite of the CPU
work; before it: 28.265 GiB, 4.98e+14 FLOPs):
    v4:2x2x4 (16 chips, mesh fsdp=16), batch 512 x 8 passages, teacher online, bf16 compute:
    26.806 GiB per chip of 32 GiB -> fits=true; arguments 160 MiB, temporaries 26.23 GiB,
    code 428 MiB, 4.89e+14 FLOPs per step (XLA cost analysis), compiled in 416 s.
    Dtypes of the 1066 dots/convolutions of the optimised HLO: 1057 bf16 x bf16 -> bf16; the
    7 that take an f32 operand are all in losses.py (contrastive_loss, word_kl), and 2 more
    are bf16 x bf16 -> f32 (this run's report traced only f32 operands; in the MS MARCO
    config's step those come from losses.py too).
    The JSON line it printed, less its f32_dots list:
        {"topology": "v4:2x2x4", "chips": 16, "device_kind": "TPU v4", "mesh": {"data": 1,
        "fsdp": 16, "tensor": 1}, "batch_size": 512, "candidates": 8, "teacher_mode":
        "online", "dtype": "bfloat16", "param_dtype": "float32", "bytes_per_chip":
        {"arguments": 167672832, "temporaries": 28166278144, "outputs": 82627072, "aliased":
        82620416, "code": 448505856, "total": 28782463488}, "gib_per_chip": 26.806,
        "flops_per_chip": 30589449142272.0, "flops_per_step": 489431186276352.0,
        "hbm_bytes_per_chip": 34359738368, "fits": true, "compile_s": 416.1, "dots":
        {"bf16,bf16->bf16": 1057, "bf16,bf16->f32": 2, "bf16,f32->f32": 1, "f32,bf16->bf16":
        1, "f32,bf16->f32": 4, "f32,f32->f32": 1}}
"""

from md2pr_jax.config import bert_base_pod_config


def get_config():
    c = bert_base_pod_config()
    c.name = "nq_bert_base"
    c.data.builder = "nq_dpr"
    c.data.dataset = "nq"
    c.data.eval_split = "test"
    c.data.max_passage_len = 192  # title + 100-word passage
    c.train.warmup_steps = 100
    c.train.epochs = 4
    c.train.checkpoint_every = 200
    c.train.log_every = 20
    c.teacher_train.epochs = 2
    c.teacher_train.warmup_steps = 200
    c.retrieval.eval_depth = 100
    # Candidates per training question the teacher scores each round: tens, as in RocketQA /
    # RocketQAv2 (denoising and listwise distillation over tens of retrieved passages) and AR2
    # (15 negatives from the retriever's top 100; see configs/msmarco_bert_base.py). Cost:
    # 58,880 x 50 = 2.94M candidate pairs per round plus the positives (1.41e11 FLOPs each).
    c.rounds.mine_depth = 50
    c.aot.topology = "v4:2x2x4"
    return c
