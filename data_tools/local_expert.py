"""Expert that writes thoughts with o1jax's own decoder from an imported checkpoint (GGUF file or HF directory).

Prompts are the model's chat template applied to the exploration messages. Requests are processed in
(query id, candidate) order, in batches whose PRNG key is a hash of the batch's request keys and the base
seed: the same queries in the same shard always get the same thoughts, whether run at once or resumed.
"""
from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import pathlib
from typing import Any

import jax

from data_tools.explore import ExpertError, RequestKey, ThoughtRequest
from data_tools.inputs import stable_hash


@dataclasses.dataclass(frozen=True)
class LocalExpertConfig:
  max_new_tokens: int = 512
  temperature: float = 0.7
  top_p: float = 1.0
  batch_size: int = 8
  seed: int = 0


class LocalExpert:
  """Batched chat generation with `o1jax.generate.Generator`; answers keyed by (query id, candidate)."""

  def __init__(self, generator: Any, tokenizer: Any, config: LocalExpertConfig):
    self.generator, self.tokenizer, self.config = generator, tokenizer, config

  @classmethod
  def from_checkpoint(cls, path: str, config: LocalExpertConfig) -> LocalExpert:
    """Loads a `.gguf` file (tokenizer inside) or a Hugging Face safetensors directory."""
    from o1jax.convert.gguf import load_gguf  # pylint: disable=g-import-not-at-top (jax-heavy, only when used)
    from o1jax.convert.hf import load_hf  # pylint: disable=g-import-not-at-top
    from o1jax.generate import Generator  # pylint: disable=g-import-not-at-top
    from o1jax.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top
    model_cfg, params = load_gguf(path) if pathlib.Path(path).suffix == ".gguf" else load_hf(path)
    tokenizer = load_tokenizer(path)
    # Chat models end a turn with their own token (e.g. <|im_end|>), which may differ from the config's EOS.
    eos_ids = tuple(dict.fromkeys([*model_cfg.eos_token_ids, tokenizer.eos_token_id]))
    return cls(Generator(model_cfg, params, eos_ids=[i for i in eos_ids if i is not None]), tokenizer, config)

  def prompt_ids(self, request: ThoughtRequest) -> list[int]:
    encoded = self.tokenizer.apply_chat_template(list(request.messages), add_generation_prompt=True, tokenize=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)

  def generate(self, requests: Sequence[ThoughtRequest]) -> dict[RequestKey, str]:
    c = self.config
    ordered = sorted(requests, key=lambda r: r.key)
    answers: dict[RequestKey, str] = {}
    for start in range(0, len(ordered), c.batch_size):
      batch = ordered[start:start + c.batch_size]
      rng = jax.random.key(stable_hash(c.seed, *(r.key for r in batch)) % 2**31)
      prompts = [self.prompt_ids(r) for r in batch]
      # A short last batch is filled with copies of its last prompt so every batch has one shape (one compile);
      # filler outputs are dropped by the zip below.
      prompts += [prompts[-1]] * (c.batch_size - len(prompts))
      try:
        outputs = self.generator.generate(prompts, max_new_tokens=c.max_new_tokens, temperature=c.temperature,
                                          top_p=c.top_p, rng=rng)
      except ValueError as e:
        raise ExpertError(f"local generation failed for queries {sorted({r.query_id for r in batch})}: {e}") from e
      for request, ids in zip(batch, outputs):
        answers[request.key] = self.tokenizer.decode(ids, skip_special_tokens=True)
    return answers
