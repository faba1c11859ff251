"""Exploration prompts and the experts: HTTP against a real server on 127.0.0.1, local o1jax generation."""
import collections
import random
import threading
import time

import pytest

from data_tools import explore
from data_tools.chat_server import ChatServer, ServerFault
from data_tools.http_expert import HttpExpert, HttpExpertConfig
from data_tools.inputs import TrainQuery

POOL = [TrainQuery(f"q{i}", f"question number {i}?", (f"passage {i} " + "word " * 100,)) for i in range(12)]


def _asked(messages) -> str:
  """The query a prompt asks about: the text after the last 'Query: '."""
  return messages[-1]["content"].rsplit("Query: ", 1)[1].split("\n")[0]


def _echo(messages, body) -> str:
  time.sleep(random.random() * 0.01)  # reorder completions across the thread pool
  return f"thought about {_asked(messages)} (seed {body['seed']})"


def _config(server, **kw):
  return HttpExpertConfig(**{"base_url": server.base_url, "model": "test", "concurrency": 4, "timeout_s": 5.0,
                             "backoff_s": 0.01, **kw})


def test_prompts_follow_method_and_are_reproducible():
  builder = explore.PromptBuilder(POOL, seed=7, example_max_words=5)
  requests = builder.requests(POOL[3], k=3)
  assert [r.key for r in requests] == [("q3", 0), ("q3", 1), ("q3", 2)]
  drawn = []
  for r in requests:
    (message,) = r.messages
    text = message["content"]
    assert message["role"] == "user" and text.startswith(explore.TASK_LINE + "\n\n")
    assert text.endswith("Query: question number 3?\nResponse:")
    shots = text.split("\n\n")[1:-1]
    assert len(shots) == 3 and all(s.startswith("Query: question number ") for s in shots)
    assert "question number 3?" not in "\n".join(shots)  # examples come from OTHER queries
    assert all(s.endswith("word word word ...") for s in shots)  # 5 words then a clip mark
    drawn.append(tuple(shots))
  assert len(set(drawn)) > 1  # re-drawn per candidate
  assert len({r.seed for r in requests}) == 3
  same = explore.PromptBuilder(POOL, seed=7, example_max_words=5).requests(POOL[3], k=3)
  assert same == requests
  other_seed = explore.PromptBuilder(POOL, seed=8, example_max_words=5).requests(POOL[3], k=3)
  assert [r.messages for r in other_seed] != [r.messages for r in requests]
  # Zero-shot (the CPU recipe): the task line, then the query, with nothing between.
  (zero_shot,) = explore.PromptBuilder(POOL, seed=7, num_examples=0).requests(POOL[3], k=1)[0].messages
  assert zero_shot["content"] == f"{explore.TASK_LINE}\n\nQuery: question number 3?\nResponse:"
  # Zero-shot needs no pool to draw from (the diagnosis of test queries has none), and writes the same prompts.
  (no_pool,) = explore.PromptBuilder([], seed=7, num_examples=0).requests(POOL[3], k=1)[0].messages
  assert no_pool == zero_shot


def test_http_expert_keys_answers_by_query_id():
  builder = explore.PromptBuilder(POOL, seed=0)
  with ChatServer(_echo) as server:
    thoughts = explore.explore(HttpExpert(_config(server)), builder, POOL, k=3)
  assert sorted(thoughts) == sorted(q.query_id for q in POOL)
  for q in POOL:
    seeds = [r.seed for r in builder.requests(q, 3)]
    assert thoughts[q.query_id] == [f"thought about {q.query} (seed {s})" for s in seeds]


def test_http_expert_retries_then_recovers():
  calls = collections.Counter()
  lock = threading.Lock()

  def flaky(messages, body):
    with lock:
      calls[body["seed"]] += 1
      n = calls[body["seed"]]
    if n == 1:
      raise ServerFault(503)
    if n == 2:
      time.sleep(1.0)  # longer than the client timeout: a timeout is retried too
    return _echo(messages, body)

  builder = explore.PromptBuilder(POOL, seed=0)
  with ChatServer(flaky) as server:
    thoughts = explore.explore(HttpExpert(_config(server, timeout_s=0.5, max_attempts=3)), builder, POOL[:4], k=2)
  assert all(t.startswith("thought about question number") for ts in thoughts.values() for t in ts)
  assert sorted(calls.values()) == [3] * 8


def test_http_expert_gives_up_naming_query_and_endpoint():
  def broken(messages, body):
    raise ServerFault(500, "model crashed")

  with ChatServer(broken) as server:
    expert = HttpExpert(_config(server, max_attempts=2))
    with pytest.raises(explore.ExpertUnavailable) as err:  # not the query's fault: synthesis never skips it
      explore.explore(expert, explore.PromptBuilder(POOL, seed=0), POOL[5:6], k=1)
  message = str(err.value)
  assert "query 'q5' candidate 0" in message and f"{server.base_url}/chat/completions" in message
  assert "failed after 2 attempts" in message and "HTTP 500" in message


def test_http_expert_does_not_retry_bad_requests():
  calls = []

  def rejecting(messages, body):
    calls.append(1)
    raise ServerFault(400, "max_tokens too large")

  with ChatServer(rejecting) as server:
    with pytest.raises(explore.ExpertError, match=r"query 'q0' candidate 0: .* answered HTTP 400") as err:
      explore.explore(HttpExpert(_config(server, max_attempts=4)), explore.PromptBuilder(POOL, seed=0), POOL[:1], 1)
  assert len(calls) == 1 and not isinstance(err.value, explore.ExpertUnavailable)


def test_http_expert_unreachable_endpoint():
  with ChatServer(_echo) as server:
    url = server.base_url  # a port that was free and is closed again
  expert = HttpExpert(HttpExpertConfig(base_url=url, model="m", max_attempts=2, backoff_s=0.01, timeout_s=2))
  with pytest.raises(explore.ExpertUnavailable, match=rf"query 'q1' candidate 0: {url}/chat/completions failed after 2"):
    explore.explore(expert, explore.PromptBuilder(POOL, seed=0), POOL[1:2], k=1)


def test_api_key_from_env_is_sent_and_never_shown(monkeypatch):
  requests = explore.PromptBuilder(POOL, seed=0).requests(POOL[0], 1)
  with ChatServer(lambda messages, body: "ok", api_key="sk-secret-123") as server:
    monkeypatch.delenv("O1JAX_TEST_KEY", raising=False)
    with pytest.raises(explore.ExpertError, match="environment variable O1JAX_TEST_KEY"):
      HttpExpert(_config(server, api_key_env="O1JAX_TEST_KEY"))
    monkeypatch.setenv("O1JAX_TEST_KEY", "sk-wrong")
    with pytest.raises(explore.ExpertError, match="HTTP 401") as err:
      HttpExpert(_config(server, api_key_env="O1JAX_TEST_KEY")).generate(requests)
    assert "sk-wrong" not in str(err.value)
    monkeypatch.setenv("O1JAX_TEST_KEY", "sk-secret-123")
    assert HttpExpert(_config(server, api_key_env="O1JAX_TEST_KEY")).generate(requests) == {("q0", 0): "ok"}


def test_api_key_echoed_by_the_server_is_redacted_before_the_message_is_cut(monkeypatch):
  """Each message keeps 200 characters of the error body: cutting before redacting would keep part of the key."""
  key = "sk-secret-123"
  lengths = range(140, 160)  # the key straddles the cut for some of these message lengths
  requests = [r for n in lengths for r in explore.PromptBuilder(POOL, seed=0).requests(TrainQuery(
      f"q{n}", "x" * n, ("passage",)), 1)]

  def rejecting(messages, body):
    raise ServerFault(400, _asked(messages), quote_authorization=True)

  monkeypatch.setenv("O1JAX_TEST_KEY", key)
  messages = []
  with ChatServer(rejecting, api_key=key) as server:
    expert = HttpExpert(_config(server, api_key_env="O1JAX_TEST_KEY"))
    for request in requests:
      with pytest.raises(explore.ExpertError) as err:
        expert.generate([request])
      messages.append(str(err.value))
  assert any("Bearer <redacted>" in m for m in messages) and any(m.endswith("Bearer <red") for m in messages)
  assert not any("sk-" in m for m in messages)
