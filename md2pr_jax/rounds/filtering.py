"""The false-negative filter's numerics, as pure numpy functions (DESIGN.md):

    tau_hat_r = quantile_rho { pi(q, p+) over the labelled positives }
    tau_r     = clip(m * tau_{r-1} + (1 - m) * tau_hat_r, tau_min, tau_max),  tau_0 = filter.tau0

with pi = sigmoid(teacher logit). A candidate with pi >= tau_r is a presumed false negative:
it leaves the negatives (and above filter.promote_tau may join the positives). The planted
check hides a seeded share of the training positives and measures which of them get flagged.

The teacher's scoring pass sees, per training query in order, its positives then its mined
candidates, flattened into one list of pairs (`scoring_pairs`); `split_scores` undoes that.
"""

from __future__ import annotations

import dataclasses

import numpy as np

HIST_BINS = np.linspace(0, 1, 21)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def update_threshold(filter_cfg, tau_prev: float, positive_probs: np.ndarray) -> tuple[float, float]:
    """(tau_r, tau_hat_r) from the previous threshold and this round's pi(q, p+)."""
    if not filter_cfg.dynamic or len(positive_probs) == 0:
        return float(filter_cfg.tau0), float("nan")
    tau_hat = float(np.quantile(positive_probs, filter_cfg.quantile))
    m = float(filter_cfg.momentum)
    tau = float(np.clip(m * tau_prev + (1 - m) * tau_hat, filter_cfg.tau_min, filter_cfg.tau_max))
    return tau, tau_hat


def plant(positives: dict[int, list[int]], fraction: float, seed) -> dict[int, list[int]]:
    """The planted check's hidden positives: a `fraction` of all (query, positive) pairs,
    chosen by `seed`. A query may lose its only positive: it is still mined, so its hidden
    positive can turn up among the candidates, which is what the check measures."""
    if fraction <= 0:
        return {}
    rng = np.random.default_rng(seed)
    pairs = [(q, d) for q, docs in sorted(positives.items()) for d in docs]
    order = rng.permutation(len(pairs))[: int(round(fraction * len(pairs)))]
    hidden: dict[int, list[int]] = {}
    for i in sorted(order):
        q, d = pairs[i]
        hidden.setdefault(int(q), []).append(int(d))
    return hidden


def assign_folds(q_rows: np.ndarray, folds: int, seed) -> dict[int, int]:
    """query row -> fold in 0 .. folds - 1: a seeded permutation cut into near-equal parts."""
    order = np.random.default_rng(seed).permutation(len(q_rows))
    return {int(q_rows[i]): int(pos % max(folds, 1)) for pos, i in enumerate(order)}


def cap_positives(positives: dict[int, list[int]], grades: dict[int, dict[int, int]], cap: int,
                  seed) -> dict[int, list[int]]:
    """query row -> at most `cap` of its positives (0 = all): the highest graded first
    (`grades`: query row -> {doc row: relevance}), ties in an order drawn by `seed`. A query with
    many relevant documents (NFCorpus: ~43) then gives `cap` training lists, not one per positive."""
    if cap <= 0:
        return positives
    rng = np.random.default_rng(seed)
    out = {}
    for q in sorted(positives):
        docs = list(positives[q])
        tie = rng.permutation(len(docs))
        g = grades.get(q, {})
        order = sorted(range(len(docs)), key=lambda i: (-g.get(docs[i], 1), tie[i]))
        out[q] = [docs[i] for i in order[:cap]]
    return out


def visible_positives(positives: dict[int, list[int]], hidden: dict[int, set]) -> dict[int, list[int]]:
    """query row -> the labelled positives the student sees (the hidden ones removed)."""
    return {q: [d for d in docs if d not in hidden.get(q, set())] for q, docs in positives.items()}


def planted_check(flagged: np.ndarray, cand: np.ndarray, q_rows: np.ndarray, hidden: dict[int, set]) -> dict:
    """The filter measured on hidden positives: recall = hidden positives (among the mined
    candidates) that were flagged, precision = flags that are hidden positives."""
    is_hidden = np.array([[d in hidden.get(int(q), ()) for d in row] for q, row in zip(q_rows, cand)], bool)
    mined = int(is_hidden.sum())
    hits = int((is_hidden & flagged).sum())
    n_flags = int(flagged.sum())
    return {
        "hidden_positives": int(sum(len(v) for v in hidden.values())),
        "hidden_in_candidates": mined,
        "flagged": n_flags,
        "flagged_hidden": hits,
        "recall": hits / mined if mined else float("nan"),
        "precision": hits / n_flags if n_flags else float("nan"),
    }


def scoring_pairs(q_rows: np.ndarray, cand: np.ndarray, positives: dict[int, list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """The teacher pass's pairs: per query its positives, then its candidates (int64 [N] each)."""
    pairs_q, pairs_d = [], []
    for q, row in zip(q_rows, cand):
        docs = list(positives[int(q)]) + [int(d) for d in row]
        pairs_q += [int(q)] * len(docs)
        pairs_d += docs
    return np.asarray(pairs_q, np.int64), np.asarray(pairs_d, np.int64)


@dataclasses.dataclass
class RoundScores:
    """The scoring pass per query: pos_logits[i] [k_i], cand_logits [M, K], and start[i], the
    index of query i's first pair in the flat pass (positives at start, candidates after)."""

    pos_logits: list[np.ndarray]
    cand_logits: np.ndarray
    start: list[int]

    def positive_probs(self) -> np.ndarray:
        return sigmoid(np.concatenate(self.pos_logits)) if self.pos_logits else np.zeros(0)


def split_scores(logits: np.ndarray, q_rows: np.ndarray, cand: np.ndarray, positives: dict[int, list[int]]) -> RoundScores:
    """The inverse of `scoring_pairs` for the pass's logits [N]."""
    offset, pos_logits, cand_logits, start = 0, [], np.zeros(cand.shape, np.float32), []
    for i, q in enumerate(q_rows):
        k = len(positives[int(q)])
        start.append(offset)
        pos_logits.append(logits[offset : offset + k])
        cand_logits[i] = logits[offset + k : offset + k + cand.shape[1]]
        offset += k + cand.shape[1]
    return RoundScores(pos_logits, cand_logits, start)


def teacher_signal(scores: RoundScores, cand: np.ndarray) -> dict:
    """How much the teacher's scores on a round's lists say beyond the labels: over every
    labelled positive, its reciprocal rank among its query's mined candidates (1.0: the teacher
    agrees with the label everywhere) and the softmax mass the teacher puts on it against those
    candidates at T = 1 (near 1: the soft labels are the hard labels)."""
    rr, mass = [], []
    for i, pos in enumerate(scores.pos_logits):
        neg = scores.cand_logits[i][cand[i] >= 0]
        for p in pos:
            rr.append(1.0 / (1 + int((neg > p).sum())))
            z = np.concatenate([[p], neg]).astype(np.float64)
            e = np.exp(z - z.max())
            mass.append(e[0] / e.sum())
    if not rr:
        return {"positive_rr": float("nan"), "positive_mass": float("nan")}
    return {"positive_rr": float(np.mean(rr)), "positive_mass": float(np.mean(mass))}


def flag(filter_cfg, cand: np.ndarray, cand_probs: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """(flagged, promoted) bool [M, K]: presumed false negatives, and those joining the positives."""
    valid = cand >= 0
    flagged = (cand_probs >= tau) & valid if filter_cfg.enabled else np.zeros(cand.shape, bool)
    promoted = (cand_probs >= filter_cfg.promote_tau) & flagged if filter_cfg.promote else np.zeros(cand.shape, bool)
    return flagged, promoted


@dataclasses.dataclass
class TrainLists:
    """A round's training lists: query [E], docs/mask/teacher logits [E, 1 + n] (positive first),
    src [E, 1 + n], each entry's index in the flat scoring pass (-1: padding), and kd_mask
    [E, 1 + n], the entries the distillation losses read: `mask` plus any flagged candidates
    kept for them (`keep_flagged`), which are no contrastive negatives."""

    query: np.ndarray
    docs: np.ndarray
    mask: np.ndarray
    teacher: np.ndarray
    src: np.ndarray
    kd_mask: np.ndarray


def build_lists(q_rows: np.ndarray, cand: np.ndarray, scores: RoundScores, positives: dict[int, list[int]],
                flagged: np.ndarray, promoted: np.ndarray, num_negatives: int, rng: np.random.Generator,
                teacher_order: bool, keep_flagged: bool = False, queries=None) -> TrainLists:
    """For every (query, positive) pair, `num_negatives` negatives sampled from the unflagged
    candidates (with `keep_flagged`, from every candidate, the flagged ones masked out of the
    contrastive `mask` but kept in `kd_mask`), then (with `teacher_order`) ordered by teacher
    score, hardest first. Promoted candidates are extra positives. `queries` (a set of query
    rows; None = all) selects the queries that get lists; the others are skipped."""
    n = int(num_negatives)
    valid = cand >= 0
    out = {k: [] for k in ("query", "docs", "mask", "teacher", "src", "kd_mask")}
    for i, q in enumerate(q_rows):
        if queries is not None and int(q) not in queries:
            continue
        usable = np.nonzero(valid[i] & (~flagged[i] | keep_flagged) & ~promoted[i])[0]
        k_pos, s0 = len(positives[int(q)]), scores.start[i]
        pairs = [(d, scores.pos_logits[i][j], s0 + j) for j, d in enumerate(positives[int(q)])]
        pairs += [(int(cand[i, j]), scores.cand_logits[i, j], s0 + k_pos + j) for j in np.nonzero(promoted[i])[0]]
        for d, t_pos, src_pos in pairs:
            chosen = rng.choice(usable, size=min(n, len(usable)), replace=False) if len(usable) else np.zeros(0, int)
            if teacher_order:
                chosen = chosen[np.argsort(-scores.cand_logits[i, chosen], kind="stable")]
            m = len(chosen)
            docs, kd_mask = np.zeros(1 + n, np.int64), np.zeros(1 + n, np.float32)
            teacher, src = np.zeros(1 + n, np.float32), np.full(1 + n, -1, np.int64)
            docs[0], kd_mask[0], teacher[0], src[0] = d, 1.0, t_pos, src_pos
            docs[1 : 1 + m], kd_mask[1 : 1 + m] = cand[i, chosen], 1.0
            teacher[1 : 1 + m], src[1 : 1 + m] = scores.cand_logits[i, chosen], s0 + k_pos + chosen
            mask = kd_mask.copy()
            mask[1 : 1 + m] = np.where(flagged[i, chosen], 0.0, 1.0)
            for key, value in zip(out, (int(q), docs, mask, teacher, src, kd_mask)):
                out[key].append(value)
    if not out["query"]:
        width = 1 + n
        return TrainLists(np.zeros(0, np.int64), *(np.zeros((0, width), t) for t in (np.int64, np.float32, np.float32)),
                          np.zeros((0, width), np.int64), np.zeros((0, width), np.float32))
    return TrainLists(*(np.asarray(out[k]) for k in out))


def gather_attention(flat: np.ndarray, src: np.ndarray) -> np.ndarray:
    """The cached attention maps of each list's first K entries: flat [N, P, Lq, Lp] (the pass's
    maps), src [E, K] -> [E, P, K, Lq, Lp] (zeros where src < 0), in flat's dtype."""
    e, k = src.shape
    out = np.zeros((e, flat.shape[1], k, flat.shape[2], flat.shape[3]), flat.dtype)
    for i in range(e):
        for j in range(k):
            if src[i, j] >= 0:
                out[i, :, j] = flat[src[i, j]]
    return out


def histograms(pos_probs: np.ndarray, cand_probs: np.ndarray, valid: np.ndarray) -> dict:
    """Histograms of pi over the positives and the valid candidates (20 bins on [0, 1])."""
    return {
        "hist_bins": HIST_BINS.tolist(),
        "hist_positive": np.histogram(pos_probs, HIST_BINS)[0].tolist(),
        "hist_candidate": np.histogram(cand_probs[valid], HIST_BINS)[0].tolist(),
    }
