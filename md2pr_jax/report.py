"""The experiment report: WORKDIR/REPORT.md with the results table and per-round figures, and
PNG plots of the losses, the threshold and the metrics by round."""

from __future__ import annotations

import dataclasses
import io
import math

from etils import epath

from md2pr_jax import artifacts
from md2pr_jax.layout import Layout

@dataclasses.dataclass(frozen=True)
class Row:
    """A row of the results table: its title, and for a student row the config switches that
    make it (the ablation runs each; `row_name` tells which row a config's student is)."""

    title: str
    switches: dict | None = None


# Student rows train on the labelled queries (and filter every list they train on), whatever the config says.
_LABELLED = {"train.pseudo": False, "filter.pseudo_only": False, "filter.random_flags": False}
ROWS = {
    "bm25": Row("BM25"),
    "zero_shot": Row("zero-shot student"),
    "teacher_rerank": Row("teacher rerank (BM25 top-k)"),
    "hybrid_rerank": Row("hybrid teacher rerank (teacher + w BM25, BM25 top-k)"),
    "de": Row("DE (L_ce, mined negatives)",
              {"loss.use_sent": False, "loss.use_word": False, "loss.use_margin_mse": False, "filter.enabled": False, **_LABELLED}),
    "de_sent": Row("DE + sentence", {"loss.use_sent": True, "loss.use_word": False, "filter.enabled": False, **_LABELLED}),
    "de_sent_word": Row("DE + sentence + word", {"loss.use_sent": True, "loss.use_word": True, "filter.enabled": False, **_LABELLED}),
    "md2pr": Row("MD2PR (+ dynamic filter)",
                 {"loss.use_sent": True, "loss.use_word": True, "filter.enabled": True, "filter.dynamic": True, **_LABELLED}),
    "static_filter": Row("static filter (tau = 0.9)",
                         {"loss.use_sent": True, "loss.use_word": True, "filter.enabled": True, "filter.dynamic": False, **_LABELLED}),
}
# Soft against hard labels on the same pseudo-queries (data.pseudo_queries > 0): DE trains on
# each pseudo-query's source passage as its positive, MD2PR on the teacher's scores as well;
# de_sent_word_pseudo splits md2pr_pseudo - de_sent_pseudo into the word level and the filter.
for _name in ("de", "de_sent", "de_sent_word", "md2pr"):
    ROWS[f"{_name}_pseudo"] = Row(f"{ROWS[_name].title} + pseudo-queries", {**ROWS[_name].switches, "train.pseudo": True})
# md2pr_pseudo with the filter on the pseudo-queries' lists only: whether its gain over
# de_sent_word_pseudo comes from the pseudo-queries' lists (their other relevant passages mined
# as negatives) or from the labelled ones.
ROWS["md2pr_pfilter_pseudo"] = Row("MD2PR + pseudo-queries, filter on the pseudo-queries' lists only",
                                   {**ROWS["md2pr_pseudo"].switches, "filter.pseudo_only": True})
# Its control: each list drops as many candidates as the filter flags there, drawn at random.
ROWS["md2pr_rfilter_pseudo"] = Row("MD2PR + pseudo-queries, random drops (as many per list as the filter flags)",
                                   {**ROWS["md2pr_pseudo"].switches, "filter.random_flags": True})
# How much the teacher's choice adds to the pseudo lists' filtering: every mined candidate of the
# pseudo-queries' lists dropped (a static filter at tau 0 on them; the teacher flags ~95% of them
# at tau 0.5 on NFCorpus), so that they train on their positive and the batch's other passages.
ROWS["md2pr_pdropall_pseudo"] = Row("MD2PR + pseudo-queries, every mined candidate of the pseudo-queries' lists dropped",
                                    {**ROWS["md2pr_pfilter_pseudo"].switches, "filter.dynamic": False, "filter.tau0": 0.0})
STUDENT_ROWS = {name: row.switches for name, row in ROWS.items() if row.switches is not None}


def row_name(config) -> str:
    """The student row a config belongs to (md2pr for the full method): the row with the most
    switches that the config holds every one of, else one named from its losses and filter."""
    held = [name for name, switches in STUDENT_ROWS.items()
            if all(config[key.split(".")[0]][key.split(".")[1]] == value for key, value in switches.items())]
    if held:
        return max(held, key=lambda name: len(STUDENT_ROWS[name]))
    lc, fc = config.loss, config.filter
    if fc.enabled and (fc.pseudo_only or fc.random_flags):
        name = ("md2pr" if fc.dynamic else "static") + ("_pfilter" if fc.pseudo_only else "") \
            + ("_rfilter" if fc.random_flags else "")
    elif fc.enabled:
        name = "md2pr" if fc.dynamic else "static_filter"
    elif lc.use_word:
        name = "de_sent_word"
    else:
        name = "de_sent" if lc.use_sent else "de"
    return f"{name}_pseudo" if config.train.pseudo and f"{name}_pseudo" in ROWS else name


METRICS = ("ndcg@10", "mrr@10", "recall@100")


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, dict) and "mean" in value:
        return f"{value['mean']:.4f} ± {value['std']:.4f} (n={value['n']})"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def rows_table(rows: dict) -> str:
    """Markdown table: one row per system (known order first), one column per metric."""
    names = [k for k in ROWS if k in rows] + [k for k in rows if k not in ROWS]
    lines = ["| row | " + " | ".join(METRICS) + " |", "| --- |" + " --- |" * len(METRICS)]
    for k in names:
        lines.append(f"| {ROWS[k].title if k in ROWS else k} (`{k}`) | " + " | ".join(_fmt(rows[k].get(m)) for m in METRICS) + " |")
    return "\n".join(lines)


def rounds_table(rounds: list[dict], split: str) -> str:
    head = "| round | tau | tau_hat | flagged | loss | loss_ce | loss_sent | loss_word | " + " | ".join(METRICS) + " |"
    lines = [head, "|" + " --- |" * (8 + len(METRICS))]
    for r in rounds:
        loss = r.get("loss", {})
        m = r.get("metrics", {}).get(split, {})
        lines.append(
            f"| {r['round']} | {_fmt(r.get('tau'))} | {_fmt(r.get('tau_hat'))} | {r.get('flagged')} | "
            + " | ".join(_fmt(loss.get(k)) for k in ("loss", "loss_ce", "loss_sent", "loss_word"))
            + " | " + " | ".join(_fmt(m.get(k)) for k in METRICS) + " |"
        )
    return "\n".join(lines)


def _save(fig, ax, title: str, path: epath.Path) -> epath.Path:
    """Legend, title and layout, then writes the PNG and closes the figure."""
    import matplotlib.pyplot as plt

    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    path.write_bytes(buf.getvalue())
    return path


def plots(layout: Layout, rounds: list[dict], histories: dict[int, list[dict]], split: str) -> list[epath.Path]:
    """losses.png (per step, rounds concatenated), threshold.png and metrics.png (per round)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(7, 4))
    offset = 0
    for r in sorted(histories):
        h = histories[r]
        if not h:
            continue
        steps = [offset + x["step"] for x in h]
        for key, color in (("loss", "k"), ("loss_ce", "C0"), ("loss_sent", "C1"), ("loss_word", "C2")):
            if key in h[0]:
                ax.plot(steps, [x[key] for x in h], color=color, lw=1, label=key if r == min(histories) else None)
        offset = steps[-1]
        ax.axvline(offset, color="0.8", lw=0.5)
    ax.set_xlabel("step (rounds concatenated)")
    ax.set_ylabel("loss")
    files.append(_save(fig, ax, "training losses", layout.plot("losses")))

    xs = [r["round"] for r in rounds]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(xs, [r.get("tau") for r in rounds], "o-", label="tau_r")
    ax.plot(xs, [r.get("tau_hat") for r in rounds], "s--", label="tau_hat_r")
    ax.set_xlabel("round")
    ax.set_ylabel("threshold")
    ax.set_xticks(xs)
    files.append(_save(fig, ax, "false-negative threshold", layout.plot("threshold")))

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for k in METRICS:
        ax.plot(xs, [r["metrics"].get(split, {}).get(k) for r in rounds], "o-", label=k)
    ax.set_xlabel("round")
    ax.set_xticks(xs)
    files.append(_save(fig, ax, f"student on {split}", layout.plot("metrics")))
    return files


def write(layout: Layout, results: dict, histories: dict[int, list[dict]], title: str | None = None) -> epath.Path:
    """Writes REPORT.md (and the plots) into the workdir of `layout`; returns its path."""
    split = results["split"]
    parts = [f"# {title or results.get('config', 'md2pr')}: {results.get('dataset', '')} {split}", ""]
    parts += ["## Results", "", rows_table(results["rows"]), ""]
    rounds = results.get("rounds", [])
    if rounds:
        parts += ["## Rounds", "", rounds_table(rounds, split), ""]
        planted = [(r["round"], r["planted"]) for r in rounds if r.get("planted")]
        if planted:
            parts += ["## Planted check of the false-negative filter", "",
                      "| round | tau | hidden in candidates | flagged | flagged hidden | recall | precision |",
                      "| --- | --- | --- | --- | --- | --- | --- |"]
            taus = {r["round"]: r.get("tau") for r in rounds}
            for rnd, p in planted:
                parts.append(f"| {rnd} | {_fmt(taus[rnd])} | {p['hidden_in_candidates']} | {p['flagged']} | "
                             f"{p['flagged_hidden']} | {_fmt(p['recall'])} | {_fmt(p['precision'])} |")
            parts.append("")
        files = plots(layout, rounds, histories, split)
        parts += ["## Plots", ""] + [f"![{f.name}]({f.name})" for f in files] + [""]
    artifacts.write_text(layout.report, "\n".join(parts))
    return layout.report
