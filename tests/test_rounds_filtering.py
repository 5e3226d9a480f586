"""The false-negative filter's numerics (md2pr_jax.rounds.filtering), on small hand-made arrays."""

import numpy as np
import pytest

from md2pr_jax.config import base_config
from md2pr_jax.rounds import filtering


def test_threshold_rule_moves_towards_the_positive_quantile():
    fc = base_config().filter
    fc.momentum, fc.quantile, fc.tau_min, fc.tau_max = 0.5, 0.1, 0.5, 0.99
    probs = np.linspace(0.0, 1.0, 101)  # 10% quantile = 0.1
    tau, tau_hat = filtering.update_threshold(fc, 0.9, probs)
    assert tau_hat == pytest.approx(0.1)
    assert tau == pytest.approx(0.5)  # 0.5*0.9 + 0.5*0.1 = 0.5, inside the clip
    tau, _ = filtering.update_threshold(fc, 0.9, np.full(10, 0.05))
    assert tau == pytest.approx(0.5)  # 0.475 clipped to tau_min
    tau, _ = filtering.update_threshold(fc, 0.98, np.full(10, 1.0))
    assert tau == pytest.approx(0.99)  # clipped to tau_max
    fc.dynamic = False
    assert filtering.update_threshold(fc, 0.6, probs)[0] == pytest.approx(fc.tau0)


def test_planted_check_counts():
    cand = np.array([[5, 6, 7], [8, 9, 10]])
    flagged = np.array([[True, False, True], [False, False, True]])
    hidden = {0: {5, 6}, 1: {11}}
    out = filtering.planted_check(flagged, cand, np.array([0, 1]), hidden)
    assert out["hidden_in_candidates"] == 2  # 5 and 6; 11 was not mined
    assert out["flagged_hidden"] == 1  # 5
    assert out["recall"] == pytest.approx(0.5)
    assert out["precision"] == pytest.approx(1 / 3)


def test_plant_hides_a_seeded_share_and_the_student_never_sees_it():
    positives = {0: [1, 2], 1: [3], 2: [4, 5, 6], 3: [7]}  # 7 pairs
    hidden = filtering.plant(positives, 0.3, seed=7)
    assert sum(len(v) for v in hidden.values()) == 2  # round(0.3 * 7)
    assert hidden == filtering.plant(positives, 0.3, seed=7)
    assert filtering.plant(positives, 0.0, seed=7) == {}
    visible = filtering.visible_positives(positives, {q: set(v) for q, v in hidden.items()})
    for q, docs in positives.items():
        assert sorted(visible[q] + hidden.get(q, [])) == docs


def test_scoring_pairs_and_split_scores_are_inverse():
    q_rows = np.array([3, 5])
    cand = np.array([[10, 11, -1], [12, 13, 14]])
    positives = {3: [1], 5: [2, 4]}
    pq, pd = filtering.scoring_pairs(q_rows, cand, positives)
    assert pq.tolist() == [3, 3, 3, 3, 5, 5, 5, 5, 5]
    assert pd.tolist() == [1, 10, 11, -1, 2, 4, 12, 13, 14]
    logits = np.arange(len(pq), dtype=np.float32)  # logit = index in the pass
    s = filtering.split_scores(logits, q_rows, cand, positives)
    assert s.start == [0, 4]
    assert [x.tolist() for x in s.pos_logits] == [[0.0], [4.0, 5.0]]
    assert s.cand_logits.tolist() == [[1, 2, 3], [6, 7, 8]]
    np.testing.assert_allclose(s.positive_probs(), filtering.sigmoid([0.0, 4.0, 5.0]))


def test_flags_and_promotion_respect_switches_and_padding():
    fc = base_config().filter
    cand = np.array([[1, 2, -1]])
    probs = np.array([[0.95, 0.5, 0.99]])
    flagged, promoted = filtering.flag(fc, cand, probs, 0.9)
    assert flagged.tolist() == [[True, False, False]]  # padding (-1) is never flagged
    assert not promoted.any()
    fc.promote, fc.promote_tau = True, 0.94
    assert filtering.flag(fc, cand, probs, 0.9)[1].tolist() == [[True, False, False]]
    fc.enabled = False
    flagged, promoted = filtering.flag(fc, cand, probs, 0.9)
    assert not flagged.any() and not promoted.any()


def test_flags_only_the_selected_queries_lists():
    """filter.pseudo_only: `lists` leaves the other queries' candidates unflagged and unpromoted."""
    fc = base_config().filter
    fc.promote, fc.promote_tau = True, 0.94
    cand = np.array([[1, 2, -1], [3, 4, 5], [6, 7, 8]])
    probs = np.array([[0.95, 0.5, 0.99], [0.97, 0.92, 0.1], [0.99, 0.2, 0.91]])
    flagged, promoted = filtering.flag(fc, cand, probs, 0.9, np.array([True, False, True]))
    assert flagged.tolist() == [[True, False, False], [False, False, False], [True, False, True]]
    assert promoted.tolist() == [[True, False, False], [False, False, False], [True, False, False]]
    everywhere = filtering.flag(fc, cand, probs, 0.9)[0]
    assert everywhere[1].tolist() == [True, True, False]


def test_random_flags_keep_each_lists_count_on_valid_candidates():
    """filter.random_flags: per list as many flags as the teacher's, never on padding, drawn
    uniformly (each valid slot about equally often), the same for the same seed."""
    rng = np.random.default_rng(0)
    cand = np.where(rng.random((400, 10)) < 0.1, -1, rng.integers(0, 1000, (400, 10)))
    flagged = (rng.random((400, 10)) < 0.6) & (cand >= 0)
    out = filtering.random_flags(flagged, cand, np.random.default_rng(1))
    assert (out.sum(1) == flagged.sum(1)).all() and not (out & (cand < 0)).any()
    assert (out != flagged).any()
    np.testing.assert_array_equal(out, filtering.random_flags(flagged, cand, np.random.default_rng(1)))
    # Slot j is flagged at the rate the lists' counts imply, not favouring early or late slots.
    full = np.ones((4000, 5), np.int64)
    counts = np.repeat([[True, True, False, False, False]], 4000, 0)
    rate = filtering.random_flags(counts, full, np.random.default_rng(2)).mean(0)
    np.testing.assert_allclose(rate, 0.4, atol=0.03)


def test_build_lists_samples_unflagged_negatives_hardest_first():
    q_rows = np.array([0])
    cand = np.array([[10, 11, 12, 13]])
    positives = {0: [1, 2]}
    logits = np.array([5.0, 6.0, 0.1, 3.0, 9.0, 2.0], np.float32)  # pos 1, pos 2, then candidates
    scores = filtering.split_scores(logits, q_rows, cand, positives)
    flagged = np.array([[False, False, True, False]])  # 12 (logit 9) is a presumed false negative
    lists = filtering.build_lists(q_rows, cand, scores, positives, flagged, np.zeros_like(flagged), 3,
                                  np.random.default_rng(0), teacher_order=True)
    assert lists.query.tolist() == [0, 0]
    assert lists.docs[:, 0].tolist() == [1, 2]
    for row, teacher, src, mask in zip(lists.docs, lists.teacher, lists.src, lists.mask):
        assert sorted(row[1:].tolist()) == [10, 11, 13] and 12 not in row
        assert row[1:].tolist() == [11, 13, 10]  # by teacher logit 3.0, 2.0, 0.1
        np.testing.assert_allclose(teacher, logits[src])
        assert mask.tolist() == [1, 1, 1, 1]
    # Fewer usable candidates than negatives: padded, masked out, src -1.
    short = filtering.build_lists(q_rows, cand, scores, positives, np.array([[True, True, True, False]]),
                                  np.zeros_like(flagged), 3, np.random.default_rng(0), teacher_order=False)
    assert short.docs[0].tolist() == [1, 13, 0, 0] and short.mask[0].tolist() == [1, 1, 0, 0]
    assert short.src[0].tolist() == [0, 5, -1, -1]


def test_gather_attention_picks_each_entrys_map():
    flat = np.arange(6 * 1 * 2 * 3, dtype=np.float32).reshape(6, 1, 2, 3)  # [N, P, Lq, Lp]
    src = np.array([[4, 2], [0, -1]])
    out = filtering.gather_attention(flat, src)
    assert out.shape == (2, 1, 2, 2, 3)
    np.testing.assert_array_equal(out[0, :, 0], flat[4])
    np.testing.assert_array_equal(out[0, :, 1], flat[2])
    np.testing.assert_array_equal(out[1, :, 1], 0)


def test_histograms_count_valid_candidates_only():
    h = filtering.histograms(np.array([0.01, 0.99]), np.array([[0.5, 0.5]]), np.array([[True, False]]))
    assert len(h["hist_bins"]) == 21 and sum(h["hist_positive"]) == 2 and sum(h["hist_candidate"]) == 1


def test_assign_folds_is_a_balanced_seeded_partition():
    q_rows = np.arange(100, 203)
    folds = filtering.assign_folds(q_rows, 3, 5)
    assert set(folds) == set(q_rows.tolist())
    sizes = np.bincount(list(folds.values()))
    assert sizes.tolist() == [35, 34, 34]
    assert folds == filtering.assign_folds(q_rows, 3, 5)
    assert folds != filtering.assign_folds(q_rows, 3, 6)
    assert set(filtering.assign_folds(q_rows, 1, 5).values()) == {0}


def test_teacher_signal_ranks_each_positive_against_its_candidates():
    cand = np.array([[5, 6, -1], [7, 8, 9]])
    # query 0: positive logit 2 above both candidates; query 1: two positives, 1 and -1, candidates 0, 3, -2.
    scores = filtering.RoundScores([np.array([2.0]), np.array([1.0, -1.0])],
                                   np.array([[0.0, 1.0, 99.0], [0.0, 3.0, -2.0]], np.float32), [0, 3])
    got = filtering.teacher_signal(scores, cand)
    assert got["positive_rr"] == pytest.approx((1.0 + 1 / 2 + 1 / 3) / 3)  # the padded 99 is not a candidate
    m0 = np.exp(2) / (np.exp(2) + np.exp(0) + np.exp(1))
    m1 = np.exp(1) / (np.exp(1) + np.exp(0) + np.exp(3) + np.exp(-2))
    m2 = np.exp(-1) / (np.exp(-1) + np.exp(0) + np.exp(3) + np.exp(-2))
    assert got["positive_mass"] == pytest.approx((m0 + m1 + m2) / 3)


def test_build_lists_keeps_flagged_for_distillation_and_selects_queries():
    """keep_flagged: a flagged candidate may fill a slot, masked out of the contrastive `mask`
    but in `kd_mask` with its teacher score; `queries` gives lists to the chosen queries only."""
    q_rows = np.array([0, 5])
    cand = np.array([[10, 11, 12, 13], [20, 21, 22, 23]])
    positives = {0: [1], 5: [2]}
    logits = np.array([5.0, 0.1, 3.0, 9.0, 2.0, 4.0, 1.0, 1.5, 7.0, 0.5], np.float32)
    scores = filtering.split_scores(logits, q_rows, cand, positives)
    flagged = np.array([[False, False, True, False], [False, False, True, False]])
    none = np.zeros_like(flagged)
    lists = filtering.build_lists(q_rows, cand, scores, positives, flagged, none, 4, np.random.default_rng(0),
                                  teacher_order=True, keep_flagged=True)
    assert lists.docs[0].tolist() == [1, 12, 11, 13, 10]  # all four by teacher logit, 12 (9.0) first
    assert lists.kd_mask[0].tolist() == [1, 1, 1, 1, 1] and lists.mask[0].tolist() == [1, 0, 1, 1, 1]
    np.testing.assert_allclose(lists.teacher, logits[lists.src])
    dropped = filtering.build_lists(q_rows, cand, scores, positives, flagged, none, 4, np.random.default_rng(0),
                                    teacher_order=True)
    assert 12 not in dropped.docs[0] and (dropped.kd_mask == dropped.mask).all()
    only = filtering.build_lists(q_rows, cand, scores, positives, flagged, none, 4, np.random.default_rng(0),
                                 teacher_order=True, queries={5})
    assert only.query.tolist() == [5] and only.docs[0, 0] == 2
    real = only.src[0] >= 0  # 3 unflagged negatives, then padding
    assert real.tolist() == [True, True, True, True, False]
    np.testing.assert_allclose(only.teacher[0][real], logits[only.src[0][real]])  # the skipped query's offsets kept
    empty = filtering.build_lists(q_rows, cand, scores, positives, flagged, none, 4, np.random.default_rng(0),
                                  teacher_order=True, queries=set())
    assert empty.docs.shape == (0, 5) and len(empty.query) == 0


def test_cap_positives_keeps_the_highest_graded_then_a_seeded_draw():
    positives = {1: [10, 11, 12, 13, 14, 15], 2: [20], 3: [30, 31]}
    grades = {1: {12: 2, 10: 1}, 3: {30: 1, 31: 2}}
    got = filtering.cap_positives(positives, grades, 2, seed=0)
    assert got[1][0] == 12 and got[1][1] in (10, 11, 13, 14, 15) and got[2] == [20] and got[3] == [31, 30]
    assert filtering.cap_positives(positives, grades, 2, seed=0) == got  # seeded
    draws = {tuple(filtering.cap_positives(positives, {}, 1, seed=s)[1]) for s in range(20)}
    assert len(draws) > 2  # ties are drawn, not the first listed
    assert filtering.cap_positives(positives, grades, 0, seed=0) is positives  # 0 = all


def test_context_mines_around_every_known_positive_but_lists_the_capped_ones():
    from md2pr_jax.rounds.stages import Context

    ctx = Context(None, None, None, None, None, None, {}, {1: [10]}, [], True, {5: [50]}, {1: [10, 11, 12]})
    assert ctx.round_positives == {1: [10], 5: [50]}
    assert ctx.excluded_positives == {1: [10, 11, 12], 5: [50]}
    old = Context(None, None, None, None, None, None, {}, {1: [10]}, [], True)
    assert old.excluded_positives == old.round_positives == {1: [10]}


def _random_round(seed: int, m: int = 40, k: int = 6):
    """A random round: query rows, candidates (some padded -1), 1-3 positives per query, logits."""
    rng = np.random.default_rng(seed)
    q_rows = rng.choice(1000, m, replace=False)
    cand = rng.integers(0, 500, (m, k))
    cand[rng.random((m, k)) < 0.15] = -1
    positives = {int(q): rng.integers(500, 600, rng.integers(1, 4)).tolist() for q in q_rows}
    n_pairs = sum(len(v) for v in positives.values()) + m * k
    return q_rows, cand, positives, rng.normal(size=n_pairs).astype(np.float32)


def test_vectorised_pass_layout_matches_the_per_query_definition():
    """scoring_pairs / split_scores / teacher_signal (vectorised for 125k-query rounds) against
    the per-query definitions they replaced."""
    q_rows, cand, positives, logits = _random_round(3)
    pq, pd = filtering.scoring_pairs(q_rows, cand, positives)
    ref_q, ref_d = [], []
    for q, row in zip(q_rows, cand):
        docs = list(positives[int(q)]) + [int(d) for d in row]
        ref_q += [int(q)] * len(docs)
        ref_d += docs
    assert pq.tolist() == ref_q and pd.tolist() == ref_d and pq.dtype == pd.dtype == np.int64
    s = filtering.split_scores(logits, q_rows, cand, positives)
    off = 0
    rr, mass = [], []
    for i, q in enumerate(q_rows):
        kq = len(positives[int(q)])
        assert s.start[i] == off
        np.testing.assert_array_equal(s.pos_logits[i], logits[off : off + kq])
        np.testing.assert_array_equal(s.cand_logits[i], logits[off + kq : off + kq + cand.shape[1]])
        neg = s.cand_logits[i][cand[i] >= 0].astype(np.float64)
        for p in s.pos_logits[i]:
            rr.append(1.0 / (1 + int((neg > p).sum())))
            z = np.concatenate([[p], neg])
            mass.append(np.exp(z[0] - z.max()) / np.exp(z - z.max()).sum())
        off += kq + cand.shape[1]
    got = filtering.teacher_signal(s, cand)
    assert got["positive_rr"] == pytest.approx(np.mean(rr)) and got["positive_mass"] == pytest.approx(np.mean(mass))
    empty = filtering.scoring_pairs(np.zeros(0, np.int64), np.zeros((0, 6), np.int64), {})
    assert empty[0].shape == empty[1].shape == (0,)


def test_vectorised_build_lists_keeps_every_rule_on_a_random_round():
    q_rows, cand, positives, logits = _random_round(4)
    s = filtering.split_scores(logits, q_rows, cand, positives)
    rng = np.random.default_rng(0)
    flagged = (rng.random(cand.shape) < 0.2) & (cand >= 0)
    promoted = flagged & (rng.random(cand.shape) < 0.3)
    chosen_q = {int(q) for q in q_rows[::2]}
    n = 4
    lists = filtering.build_lists(q_rows, cand, s, positives, flagged, promoted, n, np.random.default_rng(1),
                                  teacher_order=True, queries=chosen_q)
    want = []  # (query, first doc) in order: per chosen query its positives, then its promoted candidates
    for i, q in enumerate(q_rows):
        if int(q) in chosen_q:
            want += [(int(q), d) for d in positives[int(q)]] + [(int(q), int(cand[i, j])) for j in np.flatnonzero(promoted[i])]
    assert list(zip(lists.query.tolist(), lists.docs[:, 0].tolist())) == want
    pass_logits = logits
    row_of = {int(q): i for i, q in enumerate(q_rows)}
    for q, docs, mask, teacher, src, kd in zip(lists.query, lists.docs, lists.mask, lists.teacher, lists.src, lists.kd_mask):
        i = row_of[int(q)]
        usable = {int(d) for d, f, p in zip(cand[i], flagged[i], promoted[i]) if d >= 0 and not f and not p}
        real = src[1:] >= 0
        m = int(real.sum())
        assert m == min(n, len(usable)) and real[:m].all()  # as many as there are, padding after
        negs = docs[1 : 1 + m].tolist()
        assert len(set(negs)) == m and set(negs) <= usable
        np.testing.assert_array_equal(teacher[src >= 0], pass_logits[src[src >= 0]])
        assert (np.diff(teacher[1 : 1 + m]) <= 0).all()  # hardest first
        assert mask.tolist() == kd.tolist() == [1.0] * (1 + m) + [0.0] * (n - m)
    # The draw is seeded and covers the usable candidates (not always the same n).
    again = filtering.build_lists(q_rows, cand, s, positives, flagged, promoted, n, np.random.default_rng(1),
                                  teacher_order=True, queries=chosen_q)
    np.testing.assert_array_equal(again.docs, lists.docs)
    draws = {tuple(filtering.build_lists(q_rows[:1], cand[:1], filtering.split_scores(
        logits[: len(positives[int(q_rows[0])]) + cand.shape[1]], q_rows[:1], cand[:1], positives),
        positives, np.zeros_like(cand[:1], bool), np.zeros_like(cand[:1], bool), 2, np.random.default_rng(r),
        teacher_order=False).docs[0, 1:]) for r in range(30)}
    assert len(draws) > 3


def test_teacher_lists_draw_from_each_querys_pool(tmp_path):
    """teacher_lists (vectorised): one list per (query, positive), the positive first, then
    num_negatives from the query's BM25 + dense pool (distinct when the pool holds enough, with
    repeats when not), queries with an empty pool skipped, a fold's queries left out, seeded."""
    import types

    from md2pr_jax import artifacts
    from md2pr_jax.layout import Layout
    from md2pr_jax.rounds import stages

    lay = Layout.at(str(tmp_path))
    bm25 = np.array([[10, 11, 12, 13, -1], [20, 21, -1, -1, -1], [-1, -1, -1, -1, -1], [40, 41, 42, 43, 44]])
    dense = np.array([[12, 14, 15, 16, 10], [21, -1, -1, -1, -1], [-1, -1, -1, -1, -1], [45, 46, 47, 40, 41]])
    lay.train_negatives.parent.mkdir(parents=True, exist_ok=True)
    artifacts.save_arrays(lay.train_negatives, q_rows=np.array([1, 2, 3, 4]), bm25=bm25, dense=dense)
    config = base_config()
    config.teacher_train.num_negatives = 4
    ctx = types.SimpleNamespace(layout=lay, config=config, train_positives={1: [100, 101], 2: [200], 3: [300], 4: [400]})
    qs, lists = stages.teacher_lists(ctx, 0)
    assert sorted(zip(qs.tolist(), lists[:, 0].tolist())) == [(1, 100), (1, 101), (2, 200), (4, 400)]  # 3: no pool
    pools = {1: {10, 11, 12, 13, 14, 15, 16}, 2: {20, 21}, 4: {40, 41, 42, 43, 44, 45, 46, 47}}
    for q, row in zip(qs.tolist(), lists):
        negs = row[1:].tolist()
        assert len(negs) == 4 and set(negs) <= pools[q]
        if len(pools[q]) >= 4:
            assert len(set(negs)) == 4  # without replacement
    again = stages.teacher_lists(ctx, 0)
    np.testing.assert_array_equal(again[1], lists)  # seeded by epoch
    draws = {tuple(stages.teacher_lists(ctx, e)[1][stages.teacher_lists(ctx, e)[0] == 4][0, 1:]) for e in range(10)}
    assert len(draws) > 3
    folds = stages.teacher_folds  # the fold filter: a fold's own queries get no lists
    stages.teacher_folds = lambda c: {1: 0, 2: 1, 3: 0, 4: 1}
    try:
        fq, _ = stages.teacher_lists(ctx, 0, fold=1)
    finally:
        stages.teacher_folds = folds
    assert sorted(fq.tolist()) == [1, 1]
