"""Shared fixtures: tiny configs, the data dir, and the skip rule for real-data tests."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The subprocess runs (main, ablation, dev_tune) compile the same tiny programs again and again,
# each in well under the 1 s that the compilation cache asks by default: store them all.
os.environ.setdefault("MD2PR_COMPILATION_CACHE_MIN_S", "0")
if os.environ.get("MD2PR_DATA_DIR") and "://" not in os.environ["MD2PR_DATA_DIR"]:
    # Absolute, so that subprocesses started in other folders (launch tests) find the data.
    os.environ["MD2PR_DATA_DIR"] = os.path.abspath(os.environ["MD2PR_DATA_DIR"])

import pytest  # noqa: E402

from md2pr_jax.config import MINILM_ID, base_config, bert_shape  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_collection_modifyitems(config, items):
    if os.environ.get("MD2PR_DATA_DIR"):
        return
    skip = pytest.mark.skip(reason="MD2PR_DATA_DIR is not set")
    for item in items:
        if "data" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def data_dir():
    return os.environ["MD2PR_DATA_DIR"]


def make_tiny_config(**overrides):
    """A tiny random BERT student and teacher (hidden 32, 2 layers) with the MiniLM vocabulary."""
    c = base_config()
    tiny = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=64)
    c.student.bert = bert_shape(**tiny)
    c.teacher.bert = bert_shape(**tiny)
    c.student.tokenizer = MINILM_ID
    c.data.max_query_len = 8
    c.data.max_passage_len = 16
    c.data.num_negatives = 2
    c.loss.layer_pairs = ((1, 1), (2, 2))
    c.train.batch_size = 4
    c.mesh.data = -1
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


@pytest.fixture
def tiny_config():
    return make_tiny_config()
