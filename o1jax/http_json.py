"""JSON over HTTP to an inference server, as a client that survives a busy or restarting server.

A timeout per request; retries with exponential backoff on timeouts, connection errors, 429 and 5xx; other 4xx
fail at once (retrying a bad request cannot help). The API key comes from an environment variable, is sent
only as the `Authorization` header and is cut out of every error text, since servers may echo request headers.
"""
from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import http.client
import json
import os
import socket
import time
from typing import Any
import urllib.error
import urllib.request


class RequestError(RuntimeError):
  """A request that failed for good: a 4xx answer, or every retry used up (`ServerUnavailable`)."""


class ServerUnavailable(RequestError):
  """Every attempt met a timeout, a broken connection, 429 or 5xx: the server, not the request, is at fault."""


class _Retryable(Exception):
  pass


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
  timeout_s: float = 120.0
  max_attempts: int = 5
  backoff_s: float = 1.0  # first retry delay; doubles each attempt
  max_backoff_s: float = 30.0


class JsonClient:
  """POSTs JSON bodies to one URL with the policy above."""

  def __init__(self, url: str, api_key_env: str | None = None, policy: RetryPolicy = RetryPolicy()):
    self.url, self.policy = url, policy
    self._headers = {"Content-Type": "application/json"}
    self._secret = None
    if api_key_env:
      key = os.environ.get(api_key_env)
      if not key:
        raise RequestError(f"environment variable {api_key_env} (API key for {url}) is not set")
      self._headers["Authorization"] = f"Bearer {key}"
      self._secret = key

  def redact(self, text: str) -> str:
    """`text` without the API key (an error body may echo the request's headers)."""
    return text.replace(self._secret, "<redacted>") if self._secret else text

  def _post_once(self, body: Mapping[str, Any]) -> Any:
    request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=self._headers, method="POST")
    try:
      with urllib.request.urlopen(request, timeout=self.policy.timeout_s) as response:
        return json.loads(response.read())
    except urllib.error.HTTPError as e:
      try:
        # Redacted before it is cut short, so no prefix of the key survives the cut.
        detail = self.redact(e.read(65536).decode("utf-8", "replace"))[:200]
      except (OSError, http.client.HTTPException):  # the connection broke while the error page was sent
        detail = "(no readable body)"
      if e.code == 429 or e.code >= 500:
        raise _Retryable(f"HTTP {e.code}: {detail}") from None
      # Not chained: the HTTPError's own text is the server's reason phrase, unredacted.
      raise RequestError(f"{self.url} answered HTTP {e.code}: {detail}") from None
    except (urllib.error.URLError, http.client.HTTPException, socket.timeout, TimeoutError, ConnectionError) as e:
      raise _Retryable(self.redact(f"{type(e).__name__}: {getattr(e, 'reason', e)}")) from None
    except json.JSONDecodeError as e:
      raise _Retryable(f"response is not JSON ({e})") from None

  def post(self, body: Mapping[str, Any]) -> Any:
    """The decoded JSON answer; RequestError when the request fails for good."""
    p = self.policy
    for attempt in range(p.max_attempts):
      try:
        return self._post_once(body)
      except _Retryable as e:
        last = e
        if attempt + 1 < p.max_attempts:
          time.sleep(min(p.backoff_s * 2**attempt, p.max_backoff_s))
    raise ServerUnavailable(f"{self.url} failed after {p.max_attempts} attempts; last error: {last}")
