"""Thoughts from an inference server: any OpenAI-compatible `/completions` endpoint (vLLM, SGLang, llama.cpp server).

Thinking costs up to 3 x 128 generated tokens per query with a 7B model, which is what those servers are for;
the retriever still embeds locally. Prompts travel as token ids (`[BOS] <query> q </query> <thought>`), and the
answer's token ids (`return_token_ids`, which vLLM honours) are appended to the query as they are, never
decoded and re-tokenized (METHOD §2). A server that answers with text only gets its text tokenized once, with a
warning, since that can shift whitespace at the boundary.
"""
from __future__ import annotations

from collections.abc import Sequence
import concurrent.futures
import logging
from typing import Any

import jax
import numpy as np

from o1jax.http_json import JsonClient, RequestError, RetryPolicy


class CompletionsGenerator:
  """`generate` with the signature of `o1jax.generate.Generator.generate`, served over HTTP."""

  def __init__(self, base_url: str, model: str, *, tokenizer: Any = None, api_key_env: str | None = None,
               policy: RetryPolicy = RetryPolicy(), concurrency: int = 8):
    """`base_url` e.g. http://127.0.0.1:8000/v1 ("/completions" is appended); `model` the server's model name;
    `tokenizer` tokenizes answers of servers that return no token ids (None: such answers are an error)."""
    self.client = JsonClient(base_url.rstrip("/") + "/completions", api_key_env, policy)
    self.model, self.tokenizer, self.concurrency = model, tokenizer, concurrency
    self._warned = False

  def _complete(self, prompt: Sequence[int], max_new_tokens: int, temperature: float, top_p: float,
                repetition_penalty: float, seed: int | None) -> list[int]:
    body = {"model": self.model, "prompt": [int(t) for t in prompt], "max_tokens": max_new_tokens,
            "temperature": temperature, "top_p": top_p, "n": 1, "return_token_ids": True}
    if seed is not None:
      body["seed"] = seed
    # vLLM's and SGLang's name for transformers' penalty; sent only when set, since OpenAI's own API refuses it.
    if repetition_penalty != 1.0:
      body["repetition_penalty"] = repetition_penalty
    answer = self.client.post(body)
    try:
      choice = answer["choices"][0]
    except (KeyError, IndexError, TypeError):
      raise RequestError(f"{self.client.url} returned no choices[0]: {self.client.redact(str(answer)[:200])}") from None
    if isinstance(choice.get("token_ids"), list):
      return [int(t) for t in choice["token_ids"]]
    if not isinstance(choice.get("text"), str) or self.tokenizer is None:
      raise RequestError(f"{self.client.url} returned neither token_ids nor text to tokenize in choices[0]")
    if not self._warned:
      logging.warning("%s returns no token ids: thoughts are re-tokenized from text", self.client.url)
      self._warned = True
    return self.tokenizer(choice["text"], add_special_tokens=False)["input_ids"]

  def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
               top_p: float = 1.0, rng: jax.Array | None = None, repetition_penalty: float = 1.0
               ) -> list[list[int]]:
    """New token ids for each prompt. Sampled requests carry a seed drawn from `rng`, so the same key asks the
    server for the same thoughts."""
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature > 0 and rng is None:
      raise ValueError("sampling (temperature > 0) needs an explicit PRNG key: rng=jax.random.key(seed)")
    seeds: list[int | None] = [None] * len(prompts)
    if temperature > 0:
      seeds = [int(s) for s in np.asarray(jax.random.randint(rng, (len(prompts),), 0, 2**31 - 1))]
    with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
      futures = [pool.submit(self._complete, p, max_new_tokens, temperature, top_p, repetition_penalty, s)
                 for p, s in zip(prompts, seeds)]
      try:
        return [future.result() for future in futures]
      except RequestError:
        for future in futures:
          future.cancel()
        raise
