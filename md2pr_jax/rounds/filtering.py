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


def _pass_layout(q_rows: np.ndarray, cand: np.ndarray, positives: dict[int, list[int]]):
    """(k [M] positives per query, start [M] index of each query's first pair in the flat pass)."""
    k = np.fromiter((len(positives[int(q)]) for q in q_rows), np.int64, count=len(q_rows))
    start = np.zeros(len(q_rows), np.int64)
    np.cumsum((k + cand.shape[1])[:-1], out=start[1:])
    return k, start


def _positive_slots(k: np.ndarray, start: np.ndarray) -> np.ndarray:
    """The flat-pass index of every positive, query by query: start[i] + 0 .. k[i] - 1."""
    first = np.cumsum(k) - k
    return np.repeat(start, k) + (np.arange(int(k.sum())) - np.repeat(first, k))


def scoring_pairs(q_rows: np.ndarray, cand: np.ndarray, positives: dict[int, list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """The teacher pass's pairs: per query its positives, then its candidates (int64 [N] each).
    Vectorised: at one pod host's share of MS MARCO (125k queries x 50 candidates) a loop over
    Python lists took 6.6 s and ~0.5 GB of list objects; this takes well under a second."""
    q_rows, cand = np.asarray(q_rows, np.int64), np.asarray(cand, np.int64)
    k, start = _pass_layout(q_rows, cand, positives)
    width = cand.shape[1]
    pairs_q = np.repeat(q_rows, k + width)
    pairs_d = np.empty(len(pairs_q), np.int64)
    pairs_d[_positive_slots(k, start)] = np.fromiter(
        (int(d) for q in q_rows for d in positives[int(q)]), np.int64, count=int(k.sum()))
    pairs_d[(start + k)[:, None] + np.arange(width)] = cand
    return pairs_q, pairs_d


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
    q_rows, logits = np.asarray(q_rows, np.int64), np.asarray(logits)
    k, start = _pass_layout(q_rows, cand, positives)
    cand_logits = logits[(start + k)[:, None] + np.arange(cand.shape[1])].astype(np.float32).reshape(cand.shape)
    pos_logits = np.split(logits[_positive_slots(k, start)], np.cumsum(k)[:-1]) if len(q_rows) else []
    return RoundScores(pos_logits, cand_logits, start.tolist())


def teacher_signal(scores: RoundScores, cand: np.ndarray) -> dict:
    """How much the teacher's scores on a round's lists say beyond the labels: over every
    labelled positive, its reciprocal rank among its query's mined candidates (1.0: the teacher
    agrees with the label everywhere) and the softmax mass the teacher puts on it against those
    candidates at T = 1 (near 1: the soft labels are the hard labels)."""
    k = np.fromiter((len(p) for p in scores.pos_logits), np.int64, count=len(scores.pos_logits))
    if not k.sum():
        return {"positive_rr": float("nan"), "positive_mass": float("nan")}
    pos = np.concatenate(scores.pos_logits).astype(np.float64)
    owner = np.repeat(np.arange(len(k)), k)
    rr, mass = np.zeros(len(pos)), np.zeros(len(pos))
    for a in range(0, len(pos), 65536):  # [positives, K] blocks: bounded memory at any size
        sl = slice(a, a + 65536)
        p, rows = pos[sl, None], owner[sl]
        valid = cand[rows] >= 0
        neg = np.where(valid, scores.cand_logits[rows].astype(np.float64), -np.inf)
        rr[sl] = 1.0 / (1 + ((neg > p) & valid).sum(1))
        top = np.maximum(p[:, 0], neg.max(1, initial=-np.inf))
        e_pos = np.exp(p[:, 0] - top)
        mass[sl] = e_pos / (e_pos + np.exp(neg - top[:, None]).sum(1))
    return {"positive_rr": float(np.mean(rr)), "positive_mass": float(np.mean(mass))}


def flag(filter_cfg, cand: np.ndarray, cand_probs: np.ndarray, tau: float,
         lists: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(flagged, promoted) bool [M, K]: presumed false negatives, and those joining the positives.
    `lists` (bool [M], None = all) selects the queries whose candidates may be flagged."""
    valid = cand >= 0 if lists is None else (cand >= 0) & np.asarray(lists, bool)[:, None]
    flagged = (cand_probs >= tau) & valid if filter_cfg.enabled else np.zeros(cand.shape, bool)
    promoted = (cand_probs >= filter_cfg.promote_tau) & flagged if filter_cfg.promote else np.zeros(cand.shape, bool)
    return flagged, promoted


def random_flags(flagged: np.ndarray, cand: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """bool [M, K]: per list as many flags as `flagged` holds, on candidates drawn uniformly
    at random among its valid ones (filter.random_flags, a control for which ones are flagged)."""
    keys = np.where(cand >= 0, rng.random(cand.shape), np.inf)
    rank = np.argsort(np.argsort(keys, axis=1, kind="stable"), axis=1, kind="stable")
    return rank < flagged.sum(1, keepdims=True)


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
    n, width = int(num_negatives), cand.shape[1]
    valid = cand >= 0
    start = np.asarray(scores.start, np.int64).reshape(-1)
    k = np.fromiter((len(positives[int(q)]) for q in q_rows), np.int64, count=len(q_rows))
    # The entries (one list each): per query its positives, then its promoted candidates.
    pos_owner = np.repeat(np.arange(len(q_rows)), k)
    pos_docs = np.fromiter((int(d) for q in q_rows for d in positives[int(q)]), np.int64, count=int(k.sum()))
    pos_t = (np.concatenate(scores.pos_logits) if len(pos_owner) else np.zeros(0)).astype(np.float32)
    pi, pj = np.nonzero(promoted)
    owner = np.concatenate([pos_owner, pi])
    order = np.argsort(owner, kind="stable")  # query order; within a query positives first
    owner = owner[order]
    first_doc = np.concatenate([pos_docs, cand[pi, pj]])[order]
    first_t = np.concatenate([pos_t, scores.cand_logits[pi, pj]])[order]
    first_src = np.concatenate([_positive_slots(k, start), start[pi] + k[pi] + pj])[order]
    if queries is not None:
        keep = np.fromiter((int(q) in queries for q in q_rows), bool, count=len(q_rows))[owner]
        owner, first_doc, first_t, first_src = owner[keep], first_doc[keep], first_t[keep], first_src[keep]
    e = len(owner)
    docs, src = np.zeros((e, 1 + n), np.int64), np.full((e, 1 + n), -1, np.int64)
    teacher, kd_mask, mask = (np.zeros((e, 1 + n), np.float32) for _ in range(3))
    docs[:, 0], teacher[:, 0], src[:, 0], kd_mask[:, 0], mask[:, 0] = first_doc, first_t, first_src, 1.0, 1.0
    # n negatives per list drawn uniformly without replacement from its query's usable
    # candidates: the n smallest of one uniform key per candidate (unusable ones keyed +inf),
    # then (teacher_order) by teacher logit, hardest first. Vectorised in blocks of lists: the
    # per-list loop took 32 s at one pod host's share of MS MARCO (137k lists).
    usable_all = valid & (~flagged | keep_flagged) & ~promoted
    take = min(n, width)
    for a in range(0, e, 65536):
        rows = owner[a : a + 65536]
        usable = usable_all[rows]
        keys = np.where(usable, rng.random(usable.shape), np.inf)
        chosen = np.argsort(keys, axis=1, kind="stable")[:, :take]
        real = np.take_along_axis(usable, chosen, 1)
        if teacher_order:
            t = np.take_along_axis(scores.cand_logits[rows], chosen, 1)
            chosen = np.take_along_axis(chosen, np.lexsort((-t, ~real), axis=1), 1)
            real = np.take_along_axis(usable, chosen, 1)
        sl = slice(a, a + len(rows))
        r = rows[:, None]
        docs[sl, 1 : 1 + take] = np.where(real, cand[r, chosen], 0)
        teacher[sl, 1 : 1 + take] = np.where(real, scores.cand_logits[r, chosen], 0.0)
        src[sl, 1 : 1 + take] = np.where(real, start[r] + k[r] + chosen, -1)
        kd_mask[sl, 1 : 1 + take] = real
        mask[sl, 1 : 1 + take] = real & ~flagged[r, chosen]
    return TrainLists(q_rows.astype(np.int64)[owner] if e else np.zeros(0, np.int64), docs, mask, teacher, src, kd_mask)


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
