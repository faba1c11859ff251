"""Thinking through an OpenAI-compatible `/v1/completions` server: a real HTTP server on 127.0.0.1 serves the
exported model with transformers; the Retriever sends token-id prompts to it and embeds locally. Greedy thoughts,
query vectors and retrieval metrics equal the local generator's; the API key travels only as a header and never
reaches an error text; 5xx answers are retried.
"""
import http.server
import json
import threading

import numpy as np
import pytest
import torch
import transformers

from o1jax import templates
from o1jax.data.readers import BeirDataset, Doc
from o1jax.eval import retriever_eval
from o1jax.eval.__main__ import main as eval_main
from o1jax.http_json import RequestError, RetryPolicy
from o1jax.retrieval.remote_generator import CompletionsGenerator
from o1jax.retrieval.retriever import Retriever, Sampling
from o1jax.tokenizer import load_tokenizer
from test_retriever import DOCS, QUERIES, tiny_model_dir

KEY = "sk-test-5f3a9"
GREEDY = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=8)
FAST_RETRY = RetryPolicy(timeout_s=30.0, max_attempts=3, backoff_s=0.01)


class CompletionsServer:
  """transformers' `generate` behind `POST /v1/completions` (token-id prompts, `return_token_ids` answers), with
  vLLM's `--api-key` check; `fail_next` makes the next requests answer HTTP 500."""

  def __init__(self, model_dir):
    self.model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    self.fail_next, self.requests, self.lock = 0, [], threading.Lock()
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *args):
        pass

      def _reply(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

      def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.headers.get("Authorization") != f"Bearer {KEY}":
          # Echoes the request's header, as some servers' error pages do.
          self._reply(401, {"error": f"bad key in {self.headers.get('Authorization')}"})
          return
        with server.lock:
          server.requests.append(body)
          if server.fail_next:
            server.fail_next -= 1
            self._reply(500, {"error": "overloaded"})
            return
          self._reply(200, {"choices": [{"index": 0, "token_ids": server.complete(body)}]})

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

  @property
  def base_url(self):
    return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

  def complete(self, body):
    prompt = torch.tensor([body["prompt"]])
    greedy = body["temperature"] == 0
    with torch.no_grad():
      out = self.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=body["max_tokens"],
                                do_sample=not greedy, temperature=None if greedy else body["temperature"],
                                top_p=None if greedy else body["top_p"], top_k=None,
                                repetition_penalty=body.get("repetition_penalty", 1.0))
    return out[0, prompt.shape[1]:].tolist()


@pytest.fixture(scope="module")
def served(smollm2_gguf, tmp_path_factory):
  model_dir = tiny_model_dir(load_tokenizer(smollm2_gguf), tmp_path_factory.mktemp("served") / "hf", seed=3)
  server = CompletionsServer(model_dir)
  server.thread.start()
  yield model_dir, server
  server.httpd.shutdown()
  server.httpd.server_close()


@pytest.fixture
def remote(served, monkeypatch):
  model_dir, server = served
  monkeypatch.setenv("O1JAX_TEST_KEY", KEY)
  generator = CompletionsGenerator(server.base_url, "o1jax-tiny", api_key_env="O1JAX_TEST_KEY", policy=FAST_RETRY)
  return Retriever.from_pretrained(model_dir, generator=generator, tokens_per_batch=512), server


def test_greedy_thoughts_vectors_and_metrics_equal_the_local_generator(served, remote):
  model_dir, _ = served
  local = Retriever.from_pretrained(model_dir, tokens_per_batch=512)
  via_server, server = remote
  thoughts = local.think(QUERIES, k=1, temperature=0.0, max_new_tokens=GREEDY.max_new_tokens)
  assert via_server.think(QUERIES, k=1, temperature=0.0, max_new_tokens=GREEDY.max_new_tokens) == thoughts
  assert all(thought for (thought,) in thoughts)
  assert all("repetition_penalty" not in r for r in server.requests[-len(QUERIES):])  # not set: not sent
  # A repetition penalty travels to the server and is applied there as transformers applies it, here as ours.
  penalized = local.think(QUERIES, k=1, temperature=0.0, max_new_tokens=GREEDY.max_new_tokens, repetition_penalty=3.0)
  assert via_server.think(QUERIES, k=1, temperature=0.0, max_new_tokens=GREEDY.max_new_tokens,
                          repetition_penalty=3.0) == penalized
  assert {r["repetition_penalty"] for r in server.requests[-len(QUERIES):]} == {3.0} and penalized != thoughts
  # The prompts went out as the template's token ids, not as text.
  prefixes = [templates.query_prefix(q, local.special, local.lengths) for q in local.tokenize(QUERIES, "query")]
  assert sorted(r["prompt"] for r in server.requests[-len(QUERIES):]) == sorted(prefixes)
  np.testing.assert_array_equal(via_server.encode_queries(QUERIES, think=1, sampling=GREEDY),
                                local.encode_queries(QUERIES, think=1, sampling=GREEDY))

  dataset = BeirDataset(corpus={f"d{i}": Doc(title="", text=t) for i, t in enumerate(DOCS[:4])},
                        queries={f"q{i}": q for i, q in enumerate(QUERIES)},
                        qrels={"q0": {"d0": 1}, "q1": {"d1": 1}, "q2": {"d3": 1}})
  results = []
  for retriever in (local, via_server):
    retriever_eval.index_corpus(retriever, dataset, backend="exact")
    results.append(retriever_eval.evaluate(retriever, dataset, think=1, sampling=GREEDY))
  assert results[0].metrics == results[1].metrics and results[0].run == results[1].run


def test_eval_cli_thinks_through_the_server(served, remote, tmp_path, capsys):
  model_dir, server = served
  dataset = tmp_path / "beir"
  (dataset / "qrels").mkdir(parents=True)
  (dataset / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n"
                                                for i, t in enumerate(DOCS[:4])))
  (dataset / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": q}) + "\n"
                                                 for i, q in enumerate(QUERIES)))
  (dataset / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\nq1\td1\t1\nq2\td3\t1\n")
  common = [f"--checkpoint={model_dir}", f"--dataset={dataset}", "--think=1", "--temperature=0", "--baselines=",
            "--max_new_tokens=8", "--search=exact", f"--cache_dir={tmp_path / 'cache'}"]
  before = len(server.requests)
  remote_results = eval_main([*common, f"--think_url={server.base_url}", "--think_model=o1jax-tiny",
                              "--api_key_env=O1JAX_TEST_KEY"])
  assert len(server.requests) - before == len(QUERIES)
  local_results = eval_main(common)
  assert remote_results["beir"]["o1jax think=1"].metrics == local_results["beir"]["o1jax think=1"].metrics
  with pytest.raises(ValueError, match="--think_url and --think_model go together"):
    eval_main([*common, f"--think_url={server.base_url}"])
  assert KEY not in capsys.readouterr().out


def test_sampled_requests_carry_seeds_from_the_key(remote):
  via_server, server = remote
  via_server.think(QUERIES[:2], k=2, temperature=1.0, top_p=0.9, max_new_tokens=4, rng=7)
  first = sorted(r["seed"] for r in server.requests[-4:])  # requests arrive in any order: 4 threads
  via_server.think(QUERIES[:2], k=2, temperature=1.0, top_p=0.9, max_new_tokens=4, rng=7)
  assert sorted(r["seed"] for r in server.requests[-4:]) == first and len(set(first)) == 4
  assert {(r["temperature"], r["top_p"], r["max_tokens"]) for r in server.requests[-4:]} == {(1.0, 0.9, 4)}


def test_server_errors_are_retried(remote):
  via_server, server = remote
  server.fail_next = 2  # two 500s, then answers: within the 3 attempts
  assert len(via_server.think(QUERIES[:1], k=1, temperature=0.0, max_new_tokens=4)[0]) == 1
  server.fail_next = 3
  with pytest.raises(RequestError, match="failed after 3 attempts; last error: HTTP 500"):
    via_server.think(QUERIES[:1], k=1, temperature=0.0, max_new_tokens=4)
  server.fail_next = 0


def test_the_key_comes_from_the_environment_and_never_into_errors(served, monkeypatch):
  _, server = served
  with pytest.raises(RequestError, match="O1JAX_MISSING_KEY"):
    CompletionsGenerator(server.base_url, "m", api_key_env="O1JAX_MISSING_KEY")
  monkeypatch.setenv("O1JAX_TEST_KEY", "sk-wrong-key-771")
  generator = CompletionsGenerator(server.base_url, "m", api_key_env="O1JAX_TEST_KEY", policy=FAST_RETRY)
  with pytest.raises(RequestError, match="HTTP 401") as error:
    generator.generate([[1, 2, 3]], max_new_tokens=2)
  assert "sk-wrong-key-771" not in str(error.value) and "<redacted>" in str(error.value)
