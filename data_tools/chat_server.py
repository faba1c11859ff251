"""A minimal OpenAI-compatible chat/completions server around any completion function.

`POST /v1/chat/completions` answers `{"choices": [{"message": {"role": "assistant", "content": ...}}]}`.
It lets an expert that runs in-process (o1jax's own decoder) be shared by several synthesis workers,
and gives tests a real HTTP peer. With `api_key` set, requests must carry `Authorization: Bearer <key>`
(as vLLM's `--api-key`). A completion function raises `ServerFault(status)` to answer an error; with
`quote_authorization=True` the error message quotes the request's Authorization header, as some gateways' error
pages do.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
import http.server
import json
import threading
import time
from typing import Any

CompleteFn = Callable[[list[Mapping[str, str]], Mapping[str, Any]], str]  # (messages, request body) -> text


class ServerFault(Exception):
  def __init__(self, status: int, message: str = "injected fault", quote_authorization: bool = False):
    super().__init__(message)
    self.status = status
    self.quote_authorization = quote_authorization


class ChatServer:
  """Serves `complete` on host:port (port 0 picks a free one) from a background thread."""

  def __init__(self, complete: CompleteFn, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None):
    handler = _handler_for(complete, api_key)
    self._server = http.server.ThreadingHTTPServer((host, port), handler)
    self._server.daemon_threads = True
    self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

  @property
  def base_url(self) -> str:
    host, port = self._server.server_address[:2]
    return f"http://{host}:{port}/v1"

  def start(self) -> ChatServer:
    self._thread.start()
    return self

  def stop(self) -> None:
    self._server.shutdown()
    self._server.server_close()

  def __enter__(self) -> ChatServer:
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()


def _handler_for(complete: CompleteFn, api_key: str | None) -> type[http.server.BaseHTTPRequestHandler]:

  class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # request lines would flood synthesis logs
      pass

    def _reply(self, status: int, payload: Mapping[str, Any]) -> None:
      data = json.dumps(payload).encode()
      self.send_response(status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802 (http.server naming)
      if self.path.rstrip("/") != "/v1/chat/completions":
        self._reply(404, {"error": {"message": f"no route {self.path}"}})
        return
      if api_key is not None and self.headers.get("Authorization") != f"Bearer {api_key}":
        self._reply(401, {"error": {"message": "invalid or missing API key"}})
        return
      try:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        messages = body["messages"]
      except (ValueError, KeyError, TypeError) as e:
        self._reply(400, {"error": {"message": f"bad request: {e}"}})
        return
      try:
        text = complete(messages, body)
      except ServerFault as e:
        quote = f" (Authorization: {self.headers.get('Authorization')})" if e.quote_authorization else ""
        self._reply(e.status, {"error": {"message": f"{e}{quote}"}})
        return
      self._reply(200, {"id": "chatcmpl-o1jax", "object": "chat.completion", "created": int(time.time()),
                        "model": body.get("model", ""), "choices": [
                            {"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": text}}]})

  return Handler
