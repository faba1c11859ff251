"""Retrieval evaluation: trec_eval metrics, run files, any encoder or the o1jax `Retriever` scored on a BEIR split,
BM25 and sentence-encoder baselines, evaluation during training, and the paired comparison of two runs (`compare`)."""
