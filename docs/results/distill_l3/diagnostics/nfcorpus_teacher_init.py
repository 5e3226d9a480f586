"""Diagnostic: NFCorpus dev, BM25 top 20 of the first N dev queries: the untrained teacher (the
segment-cosine cross-encoder initialised from all-MiniLM-L6-v2) against the 100-step fine-tuned
teacher's saved logits (rerank/dev.npz) and BM25, on the same pairs."""
import sys, json, numpy as np
sys.path.insert(0, "/work/main")
from md2pr_jax.config import load_config
from md2pr_jax.data.prepare import prepare_dataset
from md2pr_jax.models import teacher_from_config
from md2pr_jax.params import init_teacher_params
from md2pr_jax.teacher import PairScorer
from md2pr_jax.retrieval.evaluate import score_run

N = int(sys.argv[1])
cfg = load_config("/work/main/configs/nfcorpus_minilm.py", ["data.max_train_queries=1000"])
ds = prepare_dataset(cfg, "/work/main/runs/distill/nfcorpus/shared")
z = np.load("/work/main/runs/distill/nfcorpus/shared/rerank/dev.npz")
keep_q = list(dict.fromkeys(z["q"].tolist()))[:N]
m = np.isin(z["q"], keep_q)
q, d, ce, bm = z["q"][m], z["d"][m], z["ce"][m], z["bm25"][m]
sc = PairScorer(cfg, teacher_from_config(cfg), init_teacher_params(cfg), ds, batch_size=64)
ce0 = sc.score(q, d, desc="untrained teacher")
n_dev = len(ds.split_queries["dev"])
def ndcg(s):
    run = {}
    for qi, di, v in zip(q, d, s):
        run.setdefault(ds.query_ids[qi], {})[ds.doc_ids[di]] = float(v)
    return score_run(run, ds, "dev")["ndcg@10"] * n_dev / len(keep_q)  # mean over the subset's queries
out = {"queries": len(keep_q), "pairs": int(len(q)), "bm25": ndcg(bm), "finetuned_teacher": ndcg(ce),
       "untrained_teacher": ndcg(ce0)}
for w in (2.0, 6.0, 12.0):
    out[f"finetuned+{w}bm25"] = ndcg(ce + w * bm)
    out[f"untrained+{w}bm25"] = ndcg(ce0 / 20 * 20 + w * bm)
print(json.dumps(out, indent=1))
