"""MD2PR on MS MARCO passage: BERT-base student, BERT-large-shaped cross-encoder teacher, TPU pod.

Command (every worker of a v5e-16 slice, see launch/tpu_pod.sh):
    python -m md2pr_jax.main --config configs/msmarco_bert_base.py --workdir gs://BUCKET/msmarco_bert_base \
        --mode pipeline
Check that the step fits before renting the pod (runs on any CPU machine with the tpu extra):
    python -m md2pr_jax.main --config configs/msmarco_bert_base.py --workdir /tmp/aot --mode aot
Data: MS MARCO passage TSVs (collection.tsv, queries.{train,dev}.tsv, qrels.{train,dev}.tsv) in
    config.data.dir/msmarco, or gs://; fetched once from the official collectionandqueries.tar.gz by
    `python -m md2pr_jax.data.fetch --config configs/msmarco_bert_base.py --data_dir gs://BUCKET/data`
    (`tpu_pod.sh ... data`); weights: the Hugging Face hub ids below (needs internet).
Runtime: not measured (no pod yet); planned by benchmarks/pod_plan.py (`--config
    configs/msmarco_bert_base.py --topology v5e:4x4 --remeasured
    benchmarks/results/prepare_at_scale.json`, JSON in
    benchmarks/results/pod_plan_msmarco_bert_base_v5e_4x4.json): 2.61 h for the 2 rounds, no
    stage over 1 h. Chips, from XLA's FLOPs of the real functions compiled for v5e:4x4 at an
    assumed 40% of the 197 TFLOP/s peak: 1.64 h (teacher fine-tuning 4,162 steps x 2.32e14
    FLOPs, 12.7 min; per round the teacher pass 25.7M pairs x 9.98e10, 33.9 min, training
    1,040 steps x 3.28e14, 4.5 min, corpus encoding 8.8M x 2.25e10, 2.6 min). XLA counts the
    train steps 15-30% below a hand count, so these may be optimistic. Hosts, from
    benchmarks/scale_rehearsal.py at 2.2M passages / 125k queries on a 2-core CPU
    (benchmarks/results/scale_rehearsal.json; preparation re-measured on current code,
    benchmarks/prepare_at_scale.py: 3,811 passages/s), scaled to a v5e host's 112 vCPUs at 50%
    efficiency where the code is threaded: 58 min, of which preparation 38.7 min (every host
    prepares all 8.8M passages) and the BM25 index 9.2 min. Peak host RAM about 34 GB of 192
    per host (the BM25 index ~20 GB, an upper bound scaled from the rehearsal's RSS).
Teacher scoring per round (the filter's pass, rounds.mine_depth below): 502,939 training queries
    x 50 mined candidates + 532,761 labelled positives = 25,679,711 pairs; XLA's cost analysis of
    the scoring function (benchmarks/score_flops.py: teacher_forward, 32 + 128 tokens, bf16) gives
    9.94e10 FLOPs per pair, so 2.55e18 FLOPs per round: ~34 min on v5e:4x4 at 40% of the
    197 TFLOP/s peak (the former depth 200 was 101M pairs, ~2.2 h per round).
Result: not measured. For reference, RocketQA-style BERT-base dual encoders reach MRR@10 about
    0.37-0.39 on MS MARCO dev; MD2PR reports gains over such baselines.

AOT report measured on this project's 2-core CPU (jax 0.10.2, libtpu 0.0.42), --mode aot, on
the model, loss and train step of commit 1f062f0 (re-run after the attention rewrite of the CPU
work; before it: 14.467 GiB, 3.34e+14 FLOPs); re-run on the process-major mesh (each host's chips
contiguous along data x fsdp): the same bytes and FLOPs to the byte, compiled in 605 s on the
loaded machine:
    v5e:4x4 (16 chips, mesh fsdp=16), batch 512 x 8 passages, teacher online, bf16 compute:
    15.003 GiB per chip of 16 GiB -> fits=true, with 1 GiB to spare; arguments 160 MiB,
    temporaries 14.75 GiB, 3.28e+14 FLOPs per step (XLA cost analysis), compiled in 393 s
    (453 s in a second run beside other work; the same figures).
    Dtypes of the 1067 dots/convolutions of the optimised HLO: 1057 bf16 x bf16 -> bf16; the
    10 that take or give f32 are all in losses.py (contrastive_loss, word_kl), which computes
    in f32 on purpose. The same step in f32 (--config.model.dtype=float32) does not fit a v5e
    chip: XLA stops with "the total memory required for HLO temporaries (17.84G) exceeds
    available HBM (15.75G)". Both side by side on v6e:4x4 (32 GiB per chip,
    benchmarks/aot_dtypes.py -> benchmarks/results/aot_dtypes_msmarco_bert_base.json): bf16
    14.17 GiB per chip, f32 21.00 GiB, the same 3.28e+14 FLOPs; of the f32 step's 995 dots
    only 42 are f32 x f32 (at the default matmul precision the compiler gives the rest one or
    two bf16 operands): on a TPU the f32 step's matmuls are largely bf16 already, and bf16
    compute mostly saves memory.
    The JSON line it printed, less its f32_dots list:
        {"topology": "v5e:4x4", "chips": 16, "device_kind": "TPU v5 lite", "mesh": {"data":
        1, "fsdp": 16, "tensor": 1}, "batch_size": 512, "candidates": 8, "teacher_mode":
        "online", "dtype": "bfloat16", "param_dtype": "float32", "hbm_bytes_per_chip":
        17179869184, "bytes_per_chip": {"arguments": 167410688, "temporaries": 15838806528,
        "outputs": 82627072, "aliased": 82620416, "code": 103412736, "total": 16109636608},
        "gib_per_chip": 15.003, "flops_per_chip": 20504345837568.0, "flops_per_step":
        328069533401088.0, "fits": true, "compile_s": 453.1, "dots": {"bf16,bf16->bf16":
        1057, "bf16,bf16->f32": 3, "f32,bf16->bf16": 1, "f32,bf16->f32": 4, "f32,f32->f32":
        1}}
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
    # Candidates per training query that the teacher scores each round. The literature this
    # project follows scores tens, not hundreds: RocketQA (Qu et al., NAACL 2021) denoises hard
    # negatives drawn from its retriever's top-ranked passages, RocketQAv2 (Ren et al., EMNLP
    # 2021) distils over lists of one positive and tens of such negatives, AR2 (Zhang et al.,
    # ICLR 2022) trains its ranker on 15 negatives from the retriever's top 100. 50 leaves a pool
    # of 7x the 7 negatives a list takes after the filter. Cost: 502,939 x 50 + 532,761
    # positives = 25.7M pairs per round (9.94e10 FLOPs each: ~34 min on v5e:4x4 at 40%).
    c.rounds.mine_depth = 50
    c.aot.topology = "v5e:4x4"
    return c
