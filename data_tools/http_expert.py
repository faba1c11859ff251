"""Expert behind any OpenAI-compatible `/chat/completions` endpoint (vLLM, TGI, llama.cpp server, ...).

Bounded concurrency (a thread pool), a timeout per request, retries with exponential backoff on timeouts,
connection errors, 429 and 5xx; other 4xx fail at once (retrying a bad request cannot help). The API key is
read from the environment variable the config names and is never logged or put in an error message.
"""
from __future__ import annotations

from collections.abc import Sequence
import concurrent.futures
import dataclasses
import http.client
import json
import os
import socket
import time
import urllib.error
import urllib.request

from data_tools.explore import ExpertError, RequestKey, ThoughtRequest


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


class _Retryable(Exception):
  pass


class HttpExpert:
  """Sends each ThoughtRequest as its own chat completion; answers are keyed by (query id, candidate)."""

  def __init__(self, config: HttpExpertConfig):
    self.config = config
    self.url = config.base_url.rstrip("/") + "/chat/completions"
    self._headers = {"Content-Type": "application/json"}
    if config.api_key_env:
      key = os.environ.get(config.api_key_env)
      if not key:
        raise ExpertError(f"environment variable {config.api_key_env} (API key for {self.url}) is not set")
      self._headers["Authorization"] = f"Bearer {key}"

  def _post(self, request: ThoughtRequest) -> str:
    c = self.config
    body = json.dumps({"model": c.model, "messages": list(request.messages), "max_tokens": c.max_new_tokens,
                       "temperature": c.temperature, "top_p": c.top_p, "seed": request.seed, "n": 1}).encode()
    http_request = urllib.request.Request(self.url, data=body, headers=self._headers, method="POST")
    try:
      with urllib.request.urlopen(http_request, timeout=c.timeout_s) as response:
        payload = json.loads(response.read())
    except urllib.error.HTTPError as e:
      detail = e.read()[:200].decode("utf-8", "replace")
      if e.code == 429 or e.code >= 500:
        raise _Retryable(f"HTTP {e.code}: {detail}") from e
      raise ExpertError(f"query {request.query_id!r} candidate {request.candidate}: {self.url} answered "
                        f"HTTP {e.code}: {detail}") from e
    except (urllib.error.URLError, http.client.HTTPException, socket.timeout, TimeoutError, ConnectionError) as e:
      raise _Retryable(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from e
    except json.JSONDecodeError as e:
      raise _Retryable(f"response is not JSON ({e})") from e
    try:
      content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as e:
      raise ExpertError(f"query {request.query_id!r} candidate {request.candidate}: {self.url} returned no "
                        f"choices[0].message.content: {json.dumps(payload)[:200]}") from e
    if not isinstance(content, str):
      raise ExpertError(f"query {request.query_id!r} candidate {request.candidate}: {self.url} returned "
                        f"non-text content {content!r}")
    return content

  def _post_with_retries(self, request: ThoughtRequest) -> str:
    c = self.config
    for attempt in range(c.max_attempts):
      try:
        return self._post(request)
      except _Retryable as e:
        last = e
        if attempt + 1 < c.max_attempts:
          time.sleep(min(c.backoff_s * 2**attempt, c.max_backoff_s))
    raise ExpertError(f"query {request.query_id!r} candidate {request.candidate}: {self.url} failed after "
                      f"{c.max_attempts} attempts; last error: {last}")

  def generate(self, requests: Sequence[ThoughtRequest]) -> dict[RequestKey, str]:
    with concurrent.futures.ThreadPoolExecutor(self.config.concurrency) as pool:
      futures = {r.key: pool.submit(self._post_with_retries, r) for r in requests}
      try:
        return {key: future.result() for key, future in futures.items()}
      except ExpertError:
        for future in futures.values():
          future.cancel()
        raise
