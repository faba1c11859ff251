"""Retrieval evaluation: trec_eval metrics, run files, any encoder or the o1jax `Retriever` scored on a BEIR split,
BM25 and sentence-encoder baselines, and evaluation during training."""
