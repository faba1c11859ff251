"""SmolLM2-135M fine-tuned into a thinking retriever on SciFact's train queries; trained here in 16.5 minutes.

The README's results come from `launch/scifact.sh` (`launch/recipe.sh --preset=scifact`; the cosqa preset trains
with this config too), which synthesizes the thoughts and then runs

  python -m o1jax.train --config=configs/smollm2_135m_scifact.py --config.model.path=SmolLM2-135M-Instruct.Q4_1.gguf \
      --config.data.train_files="('runs/scifact/thoughts/train-*.tfrecord',)"

Budget choices for a 2-core CPU (about 180 trained tokens/s for this model, a median 19 s a step in the committed
run, launch/results/scifact/train_metrics.jsonl, on a shared machine), against METHOD §4's
reference:
- one epoch of the 809 SciFact train queries: 16 queries x (1 positive + 1 mined hard negative) per step, so
  each query still meets 31 negatives in the batch;
- documents cut to 64 tokens (evaluation uses the same cut), query + thought to 80 (thoughts were written with
  at most 40 new tokens);
- full fine-tuning (the model is small; LoRA would save only the weight gradients) with a learning rate for a
  short run, the four special-token rows trained, other embeddings and the LM head frozen.
"""
from o1jax import config as o1config


def get_config(arg=None):
  if arg:
    raise ValueError(f"unknown variant {arg!r}: this config has none")
  c = o1config.base_config()
  c.model.source = "gguf"
  c.model.path = ""  # the SmolLM2-135M-Instruct GGUF file
  c.model.unroll_layers = True  # straight-line layers: faster CPU steps (see o1jax.model.ModelConfig)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  c.train.update(steps=50, batch_queries=16, group_size=2, finetune="full", train_special_tokens=True,
                 train_embeddings=False)
  c.train.lengths.update(query=32, query_thought=80, doc=64)
  c.optim.update(lr=5e-5, warmup_frac=0.1, warmup="linear", decay="linear")
  c.data.kind = "tfrecord"
  c.checkpoint.update(dir="runs/scifact/train", every=10, keep=2)
  c.log.update(every=1)
  return c
