#!/usr/bin/env bash
# Does distillation pay? The rows de, de_sent, md2pr (one student round each, on identical
# round-1 lists) on SciFact and NFCorpus, 3-layer student cut from all-MiniLM-L6-v2, 6-layer
# teacher at 256 passage tokens with dev-chosen hybrid soft labels; then the paired tests
# over queries (docs/results/distill_l3/). Resumable: run it again after a kill and every
# finished stage, row and seed is kept; each finished row and seed is also archived in
# OUT/per_query (commit it), so that a later session whose RUNS are gone recomputes the shared
# stages and trains only the rows the archive lacks (md2pr_jax.row_archive).
#
#   bash launch/distill_experiment.sh            # both datasets one after the other, then compare
#   bash launch/distill_experiment.sh scifact    # one dataset only (run the two side by side)
#   bash launch/distill_experiment.sh compare    # only the comparisons, on what has finished
#
# Then the settings chosen on dev (md2pr_jax.dev_tune: the same grid for every row, dev only,
# sharing the dataset's finished stages), each row at its choice with every seed, and the
# comparisons of those rows:
#   bash launch/distill_experiment.sh tune scifact      # (or nfcorpus) after `scifact` finished
#   bash launch/distill_experiment.sh compare-tuned
# The kd temperature and β on dev, then the rows at their choice (below, tune_kd), and their
# comparison with each dataset's `de`, pooled (rows from RUNS/NAME_kd_tuned, else OUT/kd_tuned/per_query):
#   bash launch/distill_experiment.sh tune-kd scifact
#   bash launch/distill_experiment.sh compare-kd-tuned
# Pseudo-queries (title as query, body as positive) beside the labelled ones, rows
# de_pseudo, de_sent_pseudo, md2pr_pseudo (reusing the finished dataset's round 0):
#   bash launch/distill_experiment.sh pseudo nfcorpus
#   bash launch/distill_experiment.sh compare-pseudo
#
# Environment: MD2PR_DATA_DIR (default ../shared/data), RUNS (default runs/distill), OUT
# (default docs/results/distill_l3),
# SEEDS (default 0,1,2), PYTHON (default .venv/bin/python), TUNE_GRID (default
# "train.epochs=1,3 train.lr=3e-5,1e-4": space-separated KEY=V1,V2 of row keys), PSEUDO_KIND
# (default title), PSEUDO_QUERIES (default 2000).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
RUNS=${RUNS:-runs/distill}
SEEDS=${SEEDS:-0,1,2}
export MD2PR_DATA_DIR=${MD2PR_DATA_DIR:-$(cd .. && pwd)/shared/data}
OUT=${OUT:-docs/results/distill_l3}

# The budget cuts against the configs (see docs/results/distill_l3/README.md): one student
# round, 10 mined candidates per query, the teacher's rerank (which chooses the hybrid
# weight on dev) at BM25's top 20, 100 teacher steps (none on NFCorpus, below).
CUTS=(--config.rounds.num_rounds=1 --config.rounds.mine_depth=10
      --config.teacher_train.rerank_depth=20 --config.teacher_train.max_steps=100)
ROWS=de,de_sent,md2pr
read -r -a GRID <<<"${TUNE_GRID:-train.epochs=1,3 train.lr=3e-5,1e-4}"

# name -> "config file and its flags". NFCorpus trains on 1,000 of its 2,590 queries, and its
# teacher is the cross-encoder's initialisation (teacher_train.epochs=0), chosen on dev: on
# 120 NFCorpus dev queries the 100-step fine-tuned teacher reranked BM25's top 20 at nDCG@10
# 0.191, its initialisation at 0.272 (docs/results/distill_l3/diagnostics/).
dataset_args() {
  case $1 in
    scifact) echo configs/scifact_minilm_l3.py ;;
    nfcorpus) echo configs/nfcorpus_minilm.py --config.data.max_train_queries=1000 --config.teacher_train.epochs=0 ;;
  esac
}

run_dataset() {
  local name=$1 args
  read -r -a args <<<"$(dataset_args "$name")"
  mkdir -p "$RUNS"
  echo "== $name: $RUNS/$name (log $RUNS/$name.log)"
  "$PYTHON" -m md2pr_jax.ablation --config "${args[@]}" "${CUTS[@]}" --workdir "$RUNS/$name" \
    --seeds "$SEEDS" --rows $ROWS --multi_seed_rows $ROWS --archive "$OUT/per_query" >>"$RUNS/$name.log" 2>&1
}

# Pseudo-queries the teacher never saw (kind PSEUDO_KIND, default 'title': a document's title as
# the query, its body, a training-only passage, as the positive; PSEUDO_QUERIES of them, default
# 2,000) beside the labelled queries: the rows de_pseudo, de_sent_pseudo and md2pr_pseudo train
# on both, for the same steps, in RUNS/NAME_KIND. Round 0 (baselines, teacher, rerank) is
# linked from RUNS/NAME when that has finished (else computed here); round 1's mining and
# teacher pass run over both query sets. Rows archive under OUT/per_query as NAME.<row>_s<seed>.
# PSEUDO_ROWS (default de_pseudo,de_sent_pseudo,md2pr_pseudo) run with every seed;
# PSEUDO_EXTRA_ROWS (e.g. de_sent_word_pseudo) with the first seed only. Other pseudo rows:
# de_sent_word_pseudo, md2pr_pfilter_pseudo (the filter on the pseudo-queries' lists only),
# md2pr_rfilter_pseudo (its control: as many drops per list as the filter flags, at random),
# md2pr_pdropall_pseudo (every mined candidate of the pseudo-queries' lists dropped).
PSEUDO_ROWS=${PSEUDO_ROWS:-de_pseudo,de_sent_pseudo,md2pr_pseudo}
pseudo() {
  local name=$1 args reuse=() kind=${PSEUDO_KIND:-title}
  [[ -n $name && -n $(dataset_args "$name") ]] || { echo "usage: $0 pseudo scifact|nfcorpus" >&2; exit 2; }
  read -r -a args <<<"$(dataset_args "$name")"
  [[ -f "$RUNS/$name/shared/rerank/DONE" ]] && reuse=(--reuse_from "$RUNS/$name")
  mkdir -p "$RUNS"
  echo "== $name pseudo-queries ($kind): $RUNS/${name}_$kind (log $RUNS/${name}_$kind.log)"
  "$PYTHON" -m md2pr_jax.ablation --config "${args[@]}" "${CUTS[@]}" --workdir "$RUNS/${name}_$kind" \
    --config.data.pseudo_queries="${PSEUDO_QUERIES:-2000}" --config.data.pseudo_kind="$kind" "${reuse[@]}" \
    --seeds "$SEEDS" --rows "$PSEUDO_ROWS${PSEUDO_EXTRA_ROWS:+,$PSEUDO_EXTRA_ROWS}" --multi_seed_rows "$PSEUDO_ROWS" \
    --archive "$OUT/per_query" \
    >>"$RUNS/${name}_$kind.log" 2>&1
}

# The pseudo-query rows of each dataset that has archived them (OUT/per_query): soft labels
# against hard labels on the same labelled + pseudo lists (de_pseudo the baseline), every
# pseudo row against the labelled-only de (what the pseudo-queries add, at more steps), the
# word level and filter on top of soft labels (md2pr_pseudo against de_sent_pseudo), and the
# word level and the filter apart (through de_sent_word_pseudo). A comparison reads each dataset
# that has archived all of its rows and is skipped where none has: a dataset part-way through
# its rows joins the comparisons its finished rows make.
compare_pseudo() {
  local kind=${PSEUDO_KIND:-title} wrote=()
  if ! compgen -G "$OUT/per_query/*.de_pseudo_s*.test.json" >/dev/null; then
    echo "no pseudo rows archived in $OUT/per_query yet (run \`$0 pseudo NAME\`)" >&2; return 1
  fi
  # pair OUT_NAME BASELINE ROW...: one comparison (each row under its own name) into OUT/pseudo_KIND/OUT_NAME.
  pair() {
    local out=$1 base=$2 name row ds=() rows=() missing
    shift 2
    for name in scifact nfcorpus; do
      missing=0
      for row in "$base" "$@"; do
        compgen -G "$OUT/per_query/$name.${row}_s*.test.json" >/dev/null || missing=1
      done
      [[ $missing -eq 0 ]] && ds+=(--dataset "$name=$OUT/per_query")
    done
    if [[ ${#ds[@]} -eq 0 ]]; then echo "skipped $out: no dataset has archived $base and $*" >&2; return 0; fi
    for row; do rows+=(--row "$row=$row"); done
    "$PYTHON" -m md2pr_jax.compare "${ds[@]}" --baseline "$base=$base" "${rows[@]}" --out "$OUT/pseudo_$kind/$out" >/dev/null
    wrote+=("$out")
  }
  pair vs_de_pseudo de_pseudo de_sent_pseudo md2pr_pseudo
  pair vs_de de de_pseudo de_sent_pseudo md2pr_pseudo
  pair md2pr_vs_de_sent_pseudo de_sent_pseudo md2pr_pseudo
  pair word_vs_de_sent_pseudo de_sent_pseudo de_sent_word_pseudo
  pair filter_vs_de_sent_word_pseudo de_sent_word_pseudo md2pr_pseudo
  # The filter on the pseudo-queries' lists alone (md2pr_pfilter_pseudo), and what filtering
  # the labelled lists as well adds to it (md2pr_pseudo).
  pair pfilter_vs_de_sent_word_pseudo de_sent_word_pseudo md2pr_pfilter_pseudo
  pair md2pr_vs_pfilter_pseudo md2pr_pfilter_pseudo md2pr_pseudo
  # Its control (md2pr_rfilter_pseudo): as many drops per list, at random; md2pr_pseudo against
  # it is which candidates the teacher flags, at the same count.
  pair rfilter_vs_de_sent_word_pseudo de_sent_word_pseudo md2pr_rfilter_pseudo
  pair md2pr_vs_rfilter_pseudo md2pr_rfilter_pseudo md2pr_pseudo
  # What the teacher's choice adds on the pseudo lists: the filter there against dropping all
  # of their mined candidates (md2pr_pdropall_pseudo).
  pair pfilter_vs_pdropall_pseudo md2pr_pdropall_pseudo md2pr_pfilter_pseudo
  pair pdropall_vs_de_sent_word_pseudo de_sent_word_pseudo md2pr_pdropall_pseudo
  echo "wrote ${wrote[*]} under $OUT/pseudo_$kind"
}

# The grid on dev over the finished ablation's stages (RUNS/NAME_tune), then each row at its
# chosen point with every seed on test and dev (RUNS/NAME_tuned/ROW); tune.json and TUNE.md
# to docs/results/distill_l3/tune_NAME/.
tune() {
  local name=$1 args grid=()
  [[ -n $name && -n $(dataset_args "$name") ]] || { echo "usage: $0 tune scifact|nfcorpus" >&2; exit 2; }
  [[ -f "$RUNS/$name/shared/rounds/r01/score/DONE" ]] || {
    echo "$RUNS/$name has no finished round-1 teacher pass: run \`$0 $name\` first" >&2; exit 1; }
  read -r -a args <<<"$(dataset_args "$name")"
  for g in "${GRID[@]}"; do grid+=(--grid "$g"); done
  echo "== tune $name: $RUNS/${name}_tune, then $RUNS/${name}_tuned (log $RUNS/${name}_tune.log)"
  "$PYTHON" -m md2pr_jax.dev_tune --config "${args[@]}" "${CUTS[@]}" --source "$RUNS/$name" \
    --workdir "$RUNS/${name}_tune" --rows $ROWS "${grid[@]}" --final_workdir "$RUNS/${name}_tuned" \
    --final_seeds "$SEEDS" --results_dir "$OUT/tune_$name" >>"$RUNS/${name}_tune.log" 2>&1
}

# The kd temperature and β chosen on dev, then run on test (dev only until the choice): over
# the dataset's shared stages (built first, `--upto filter`, where RUNS/NAME has no round-1
# teacher pass), the kd temperature grid for de_sent and md2pr (KD_GRID, default 1.0,2.0,4.0)
# in RUNS/NAME_tune_kd; then β for md2pr at its chosen temperature (BETA_GRID, default
# 0.01,0.1,1.0) in RUNS/NAME_tune_beta, whose point at the configs' β = 0.1 is the temperature
# grid's point, linked; then each row at its chosen point with every seed, test and dev, in
# RUNS/NAME_kd_tuned/ROW (not NAME_tuned, where `tune` puts its rows) on the dataset's stages
# (--reuse_from RUNS/NAME). tune.json and TUNE.md
# of each grid go to OUT/tune_NAME_kd and OUT/tune_NAME_beta. `de` has no kd knobs: the
# comparisons read its endpoint rows.
tune_kd() {
  local name=$1 args log t_sent t_md2pr beta
  [[ -n $name && -n $(dataset_args "$name") ]] || { echo "usage: $0 tune-kd scifact|nfcorpus" >&2; exit 2; }
  read -r -a args <<<"$(dataset_args "$name")"
  args+=("${CUTS[@]}")
  log=$RUNS/${name}_tune_kd.log
  mkdir -p "$RUNS"
  chosen() {  # chosen GRID_WORKDIR ROW KEY: the value dev chose
    "$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1] + "/tune.json"))["chosen"][sys.argv[2]]["settings"][sys.argv[3]])' "$@"
  }
  echo "== tune-kd $name: $RUNS/${name}_tune_kd, $RUNS/${name}_tune_beta, $RUNS/${name}_kd_tuned (log $log)"
  if [[ ! -f "$RUNS/$name/shared/rounds/r01/score/DONE" ]]; then
    "$PYTHON" -m md2pr_jax.ablation --config "${args[@]}" --workdir "$RUNS/$name" --seeds 0 --rows $ROWS \
      --multi_seed_rows $ROWS --upto filter >>"$log" 2>&1
  fi
  "$PYTHON" -m md2pr_jax.dev_tune --config "${args[@]}" --source "$RUNS/$name" --workdir "$RUNS/${name}_tune_kd" \
    --rows de_sent,md2pr --grid "loss.kd_temperature=${KD_GRID:-1.0,2.0,4.0}" --results_dir "$OUT/tune_${name}_kd" >>"$log" 2>&1
  t_sent=$(chosen "$RUNS/${name}_tune_kd" de_sent loss.kd_temperature)
  t_md2pr=$(chosen "$RUNS/${name}_tune_kd" md2pr loss.kd_temperature)
  "$PYTHON" -m md2pr_jax.dev_tune --config "${args[@]}" --config.loss.kd_temperature="$t_md2pr" \
    --source "$RUNS/${name}_tune_kd/loss.kd_temperature=$t_md2pr" --workdir "$RUNS/${name}_tune_beta" --rows md2pr \
    --grid "loss.beta=${BETA_GRID:-0.01,0.1,1.0}" --results_dir "$OUT/tune_${name}_beta" >>"$log" 2>&1
  beta=$(chosen "$RUNS/${name}_tune_beta" md2pr loss.beta)
  echo "chosen on dev: de_sent T=$t_sent; md2pr T=$t_md2pr beta=$beta" | tee -a "$log"
  "$PYTHON" -m md2pr_jax.ablation --config "${args[@]}" --config.loss.kd_temperature="$t_sent" \
    --workdir "$RUNS/${name}_kd_tuned/de_sent" --seeds "$SEEDS" --rows de_sent --multi_seed_rows de_sent \
    --reuse_from "$RUNS/$name" >>"$log" 2>&1
  "$PYTHON" -m md2pr_jax.ablation --config "${args[@]}" --config.loss.kd_temperature="$t_md2pr" --config.loss.beta="$beta" \
    --workdir "$RUNS/${name}_kd_tuned/md2pr" --seeds "$SEEDS" --rows md2pr --multi_seed_rows md2pr \
    --reuse_from "$RUNS/$name" >>"$log" 2>&1
}

# Each dataset from its finished ablation under RUNS, else from the per-query archive that an
# earlier comparison committed (OUT/per_query: the runs of an earlier session or machine); the
# files read are archived there again, so the comparison reruns from the repository alone.
compare() {
  local ds=()
  for name in scifact nfcorpus; do
    if [[ -f "$RUNS/$name/ablation.json" ]]; then
      ds+=(--dataset "$name=$RUNS/$name")
    elif compgen -G "$OUT/per_query/$name.de_s*.test.json" >/dev/null; then
      echo "$name: no finished ablation under $RUNS, reading its archive $OUT/per_query" >&2
      ds+=(--dataset "$name=$OUT/per_query")
    fi
  done
  if [[ ${#ds[@]} -eq 0 ]]; then echo "no finished rows under $RUNS yet (nor an archive in $OUT/per_query)" >&2; return 1; fi
  # Primary: soft labels against hard labels (and the full method against DE), Holm over the two.
  "$PYTHON" -m md2pr_jax.compare "${ds[@]}" --baseline de=de --row de_sent=de_sent --row md2pr=md2pr \
    --out "$OUT/vs_de" --archive "$OUT/per_query" >/dev/null
  # Secondary: the word level and the filter on top of soft labels.
  "$PYTHON" -m md2pr_jax.compare "${ds[@]}" --baseline de_sent=de_sent --row md2pr=md2pr \
    --out "$OUT/md2pr_vs_de_sent" >/dev/null
  echo "wrote $OUT/vs_de and $OUT/md2pr_vs_de_sent"
}

# Tuned rows of both datasets (a row NAME given again adds the other dataset's runs to it).
compare_tuned() {
  local name row found=0
  for name in scifact nfcorpus; do [[ -d "$RUNS/${name}_tuned/de/rows" ]] && found=1; done
  if [[ $found -eq 0 ]]; then echo "no tuned rows under $RUNS yet (run \`$0 tune NAME\`)" >&2; return 1; fi
  specs() {  # one flag or value per line: --baseline for the first dataset's $1, --row for the rest and for $2
    local flag=--baseline
    for name in scifact nfcorpus; do
      [[ -d "$RUNS/${name}_tuned/$1/rows" ]] && { printf '%s\n' "$flag" "$1=$RUNS/${name}_tuned/$1:$1"; flag=--row; }
    done
    for name in scifact nfcorpus; do
      for row in ${2//,/ }; do
        [[ -d "$RUNS/${name}_tuned/$row/rows" ]] && printf '%s\n' --row "$row=$RUNS/${name}_tuned/$row:$row"
      done
    done
  }
  local args=()
  mapfile -t args < <(specs de de_sent,md2pr)
  "$PYTHON" -m md2pr_jax.compare "${args[@]}" --out "$OUT/tuned_vs_de" >/dev/null
  mapfile -t args < <(specs de_sent md2pr)
  "$PYTHON" -m md2pr_jax.compare "${args[@]}" --out "$OUT/tuned_md2pr_vs_de_sent" >/dev/null
  echo "wrote $OUT/tuned_vs_de and $OUT/tuned_md2pr_vs_de_sent"
}

# Each dataset's de_sent and md2pr at the kd settings dev chose (`tune-kd NAME`) against its
# archived endpoint `de` (OUT/per_query), per dataset and pooled. A dataset's rows come from
# RUNS/NAME_kd_tuned/ROW where they ran on this machine, else from OUT/kd_tuned/per_query, where
# every run of this stage archives the files it read (NFCorpus's were run by hand and archived
# there), so the comparison reruns from the repository alone.
compare_kd_tuned() {
  local archive=$OUT/kd_tuned/per_query name row spec base=() rows=() sent=()
  for name in scifact nfcorpus; do
    local found=()
    for row in de_sent md2pr; do
      if [[ -d "$RUNS/${name}_kd_tuned/$row/rows" ]]; then found+=("$row=$RUNS/${name}_kd_tuned/$row:$row")
      elif compgen -G "$archive/$name.${row}_s*.test.json" >/dev/null; then found+=("$row=$name@$archive:$row")
      fi
    done
    if [[ ${#found[@]} -ne 2 ]]; then
      echo "skipped $name: its kd-tuned de_sent and md2pr are not both in $RUNS/${name}_kd_tuned or $archive" >&2
      continue
    fi
    base+=(--baseline "de=$name@$OUT/per_query:de")
    for spec in "${found[@]}"; do rows+=(--row "$spec"); done
    sent+=(--baseline "${found[0]}" --row "${found[1]}")
  done
  if [[ ${#base[@]} -eq 0 ]]; then echo "no dataset has its kd-tuned rows yet (run \`$0 tune-kd NAME\`)" >&2; return 1; fi
  "$PYTHON" -m md2pr_jax.compare "${base[@]}" "${rows[@]}" --out "$OUT/kd_tuned/vs_de" --archive "$archive" >/dev/null
  "$PYTHON" -m md2pr_jax.compare "${sent[@]}" --out "$OUT/kd_tuned/md2pr_vs_de_sent" --archive "$archive" >/dev/null
  echo "wrote $OUT/kd_tuned/vs_de and $OUT/kd_tuned/md2pr_vs_de_sent"
}

case "${1:-all}" in
  scifact|nfcorpus) run_dataset "$1" ;;
  compare) compare ;;
  all) run_dataset scifact; run_dataset nfcorpus; compare ;;
  tune) tune "${2:-}" ;;
  tune-kd) tune_kd "${2:-}" ;;
  pseudo) pseudo "${2:-}" ;;
  compare-pseudo) compare_pseudo ;;
  compare-tuned) compare_tuned ;;
  compare-kd-tuned) compare_kd_tuned ;;
  *) echo "usage: $0 [all|scifact|nfcorpus|compare|tune scifact|tune nfcorpus|tune-kd scifact|tune-kd nfcorpus|compare-tuned|compare-kd-tuned|pseudo scifact|pseudo nfcorpus|compare-pseudo]" >&2; exit 2 ;;
esac
