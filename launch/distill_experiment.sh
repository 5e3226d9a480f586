#!/usr/bin/env bash
# Does distillation pay? The rows de, de_sent, md2pr (one student round each, on identical
# round-1 lists) on SciFact and NFCorpus, 3-layer student cut from all-MiniLM-L6-v2, 6-layer
# teacher at 256 passage tokens with dev-chosen hybrid soft labels; then the paired tests
# over queries (docs/results/distill_l3/). Resumable: run it again after a kill or in a later
# session and every finished stage, row and seed is kept.
#
#   bash launch/distill_experiment.sh            # both datasets one after the other, then compare
#   bash launch/distill_experiment.sh scifact    # one dataset only (run the two side by side)
#   bash launch/distill_experiment.sh compare    # only the comparisons, on what has finished
#
# Environment: MD2PR_DATA_DIR (default ../shared/data), RUNS (default runs/distill),
# SEEDS (default 0,1,2), PYTHON (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
RUNS=${RUNS:-runs/distill}
SEEDS=${SEEDS:-0,1,2}
export MD2PR_DATA_DIR=${MD2PR_DATA_DIR:-$(cd .. && pwd)/shared/data}
OUT=docs/results/distill_l3

# The budget cuts against the configs (see docs/results/distill_l3/README.md): one student
# round, 10 mined candidates per query, the teacher's rerank (which chooses the hybrid
# weight on dev) at BM25's top 20, 100 teacher steps; NFCorpus trains on 1,000 of its 2,590
# training queries.
COMMON=(--seeds "$SEEDS" --rows de,de_sent,md2pr --multi_seed_rows de,de_sent,md2pr
        --config.rounds.num_rounds=1 --config.rounds.mine_depth=10
        --config.teacher_train.rerank_depth=20 --config.teacher_train.max_steps=100)

run_dataset() {
  local name=$1 config=$2; shift 2
  mkdir -p "$RUNS"
  echo "== $name: $RUNS/$name (log $RUNS/$name.log)"
  "$PYTHON" -m md2pr_jax.ablation --config "$config" --workdir "$RUNS/$name" "${COMMON[@]}" "$@" \
    >>"$RUNS/$name.log" 2>&1
}

compare() {
  local ds=()
  for name in scifact nfcorpus; do
    [[ -f "$RUNS/$name/ablation.json" ]] && ds+=(--dataset "$name=$RUNS/$name")
  done
  if [[ ${#ds[@]} -eq 0 ]]; then echo "no finished rows under $RUNS yet" >&2; return 1; fi
  # Primary: soft labels against hard labels (and the full method against DE), Holm over the two.
  "$PYTHON" -m md2pr_jax.compare "${ds[@]}" --baseline de=de --row de_sent=de_sent --row md2pr=md2pr \
    --out "$OUT/vs_de" >/dev/null
  # Secondary: the word level and the filter on top of soft labels.
  "$PYTHON" -m md2pr_jax.compare "${ds[@]}" --baseline de_sent=de_sent --row md2pr=md2pr \
    --out "$OUT/md2pr_vs_de_sent" >/dev/null
  echo "wrote $OUT/vs_de and $OUT/md2pr_vs_de_sent"
}

scifact() { run_dataset scifact configs/scifact_minilm_l3.py; }
nfcorpus() { run_dataset nfcorpus configs/nfcorpus_minilm.py --config.data.max_train_queries=1000; }

case "${1:-all}" in
  scifact|nfcorpus|compare) "$1" ;;
  all) scifact; nfcorpus; compare ;;
  *) echo "usage: $0 [all|scifact|nfcorpus|compare]" >&2; exit 2 ;;
esac
