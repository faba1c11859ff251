"""Retrieval with o1jax models and the baselines', apart from any evaluation: loading a model for inference,
embedding, exact and ScaNN search, the `Retriever`, BM25 and sentence-transformers encoders.

Submodules are imported by name (`from o1jax.retrieval.retriever import Retriever`), so that BM25 users such as
data_tools do not load the model stack.
"""
