"""Retrieval: corpus encoding, ScaNN and exact search, hard-negative mining, BM25, metrics."""
