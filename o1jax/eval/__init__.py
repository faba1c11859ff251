"""Retrieval evaluation: exact and ScaNN search, trec_eval metrics, run files, BM25 and sentence-encoder baselines."""
