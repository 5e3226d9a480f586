"""The experiment report: WORKDIR/REPORT.md with the results table and per-round figures, and
PNG plots of the losses, the threshold and the metrics by round."""

from __future__ import annotations

import math
import os

ROW_ORDER = ("bm25", "zero_shot", "teacher_rerank", "de", "de_sent", "de_sent_word", "md2pr", "static_filter")
ROW_NAMES = {
    "bm25": "BM25",
    "zero_shot": "zero-shot student",
    "teacher_rerank": "teacher rerank (BM25 top-k)",
    "de": "DE (L_ce, mined negatives)",
    "de_sent": "DE + sentence",
    "de_sent_word": "DE + sentence + word",
    "md2pr": "MD2PR (+ dynamic filter)",
    "static_filter": "static filter (tau = 0.9)",
}
METRICS = ("ndcg@10", "mrr@10", "recall@100")


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, dict) and "mean" in value:
        return f"{value['mean']:.4f} ± {value['std']:.4f} (n={value['n']})"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def rows_table(rows: dict) -> str:
    """Markdown table: one row per system (known order first), one column per metric."""
    names = [k for k in ROW_ORDER if k in rows] + [k for k in rows if k not in ROW_ORDER]
    lines = ["| row | " + " | ".join(METRICS) + " |", "| --- |" + " --- |" * len(METRICS)]
    for k in names:
        lines.append(f"| {ROW_NAMES.get(k, k)} (`{k}`) | " + " | ".join(_fmt(rows[k].get(m)) for m in METRICS) + " |")
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


def _save(fig, ax, title: str, path: str) -> str:
    """Legend, title and layout, then writes the PNG and closes the figure."""
    import matplotlib.pyplot as plt

    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plots(workdir: str, rounds: list[dict], histories: dict[int, list[dict]], split: str) -> list[str]:
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
    files.append(_save(fig, ax, "training losses", os.path.join(workdir, "losses.png")))

    xs = [r["round"] for r in rounds]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(xs, [r.get("tau") for r in rounds], "o-", label="tau_r")
    ax.plot(xs, [r.get("tau_hat") for r in rounds], "s--", label="tau_hat_r")
    ax.set_xlabel("round")
    ax.set_ylabel("threshold")
    ax.set_xticks(xs)
    files.append(_save(fig, ax, "false-negative threshold", os.path.join(workdir, "threshold.png")))

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for k in METRICS:
        ax.plot(xs, [r["metrics"].get(split, {}).get(k) for r in rounds], "o-", label=k)
    ax.set_xlabel("round")
    ax.set_xticks(xs)
    files.append(_save(fig, ax, f"student on {split}", os.path.join(workdir, "metrics.png")))
    return files


def write(workdir: str, results: dict, histories: dict[int, list[dict]], title: str | None = None) -> str:
    """Writes REPORT.md (and the plots) into `workdir`; returns its path."""
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
        files = plots(workdir, rounds, histories, split)
        parts += ["## Plots", ""] + [f"![{os.path.basename(f)}]({os.path.basename(f)})" for f in files] + [""]
    path = os.path.join(workdir, "REPORT.md")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(parts))
    os.replace(path + ".tmp", path)
    return path
