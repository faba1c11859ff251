"""Expert behind any OpenAI-compatible `/chat/completions` endpoint (vLLM, TGI, llama.cpp server, ...).

Bounded concurrency (a thread pool) over `o1jax.http_json`'s client: a timeout per request, retries with
exponential backoff on timeouts, connection errors, 429 and 5xx, then `ExpertUnavailable`; other 4xx fail at once
(retrying a bad request cannot help). The API key is read from the environment variable the config names and is
never logged: its value is redacted from every text a server sends back before that text goes into an error
message (a proxy that echoes the request headers in its error page would otherwise put the key into logs and
manifests).
"""
from __future__ import annotations

from collections.abc import Sequence
import concurrent.futures
import dataclasses
import json

from data_tools.explore import ExpertError, ExpertUnavailable, RequestKey, ThoughtRequest
from o1jax.http_json import JsonClient, RequestError, RetryPolicy, ServerUnavailable


@dataclasses.dataclass(frozen=True)
class HttpExpertConfig:
  base_url: str  # e.g. http://127.0.0.1:8000/v1 ; "/chat/completions" is appended
  model: str
  api_key_env: str | None = None  # name of the env var holding the key, e.g. OPENAI_API_KEY
  max_new_tokens: int = 512
  temperature: float = 0.7
  top_p: float = 1.0
  concurrency: int = 8
  timeout_s: float = 120.0
  max_attempts: int = 5
  backoff_s: float = 1.0  # first retry delay; doubles each attempt
  max_backoff_s: float = 30.0


class HttpExpert:
  """Sends each ThoughtRequest as its own chat completion; answers are keyed by (query id, candidate)."""

  def __init__(self, config: HttpExpertConfig):
    self.config = config
    policy = RetryPolicy(config.timeout_s, config.max_attempts, config.backoff_s, config.max_backoff_s)
    try:
      self.client = JsonClient(config.base_url.rstrip("/") + "/chat/completions", config.api_key_env, policy)
    except RequestError as e:
      raise ExpertError(str(e)) from None
    self.url = self.client.url

  def _post_with_retries(self, request: ThoughtRequest) -> str:
    c = self.config
    where = f"query {request.query_id!r} candidate {request.candidate}"
    body = {"model": c.model, "messages": list(request.messages), "max_tokens": c.max_new_tokens,
            "temperature": c.temperature, "top_p": c.top_p, "seed": request.seed, "n": 1}
    try:
      payload = self.client.post(body)
    except ServerUnavailable as e:
      raise ExpertUnavailable(f"{where}: {e}") from None
    except RequestError as e:
      raise ExpertError(f"{where}: {e}") from None
    try:
      content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
      raise ExpertError(f"{where}: {self.url} returned no choices[0].message.content: "
                        f"{self.client.redact(json.dumps(payload))[:200]}") from None
    if content is None:  # what OpenAI-style servers send for an answer with no text
      return ""
    if not isinstance(content, str):
      raise ExpertError(f"{where}: {self.url} returned non-text content {self.client.redact(repr(content))[:200]}")
    return content

  def generate(self, requests: Sequence[ThoughtRequest]) -> dict[RequestKey, str]:
    with concurrent.futures.ThreadPoolExecutor(self.config.concurrency) as pool:
      futures = {r.key: pool.submit(self._post_with_retries, r) for r in requests}
      try:
        return {key: future.result() for key, future in futures.items()}
      except ExpertError:
        for future in futures.values():
          future.cancel()
        raise
