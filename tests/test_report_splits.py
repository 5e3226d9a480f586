"""Which splits the baselines, reranks and rounds evaluate (rounds/stages.py evaluated_splits)."""

from types import SimpleNamespace

from md2pr_jax.rounds import stages


def _dataset(**qrels):
    """A stand-in with the two fields evaluated_splits reads: split -> queries, split -> qrels."""
    return SimpleNamespace(split_queries={s: [0, 1] for s in qrels}, qrels=qrels)


def test_each_split_is_evaluated_once():
    both = _dataset(train={0: {1: 1}}, dev={0: {2: 1}}, test={1: {3: 1}})
    assert stages.evaluated_splits("test", both) == ["test", "dev"]
    # MS MARCO and NQ evaluate on dev: once, not ['dev', 'dev'] (every evaluation twice).
    assert stages.evaluated_splits("dev", both) == ["dev"]
    # A split without queries or without qrels is left out.
    assert stages.evaluated_splits("test", _dataset(test={1: {3: 1}}, dev={})) == ["test"]
    assert stages.evaluated_splits("dev", _dataset(test={1: {3: 1}})) == []
