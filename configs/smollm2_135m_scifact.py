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

Variant ':gpu' (`launch/recipe.sh --preset=scifact-gpu`) is the same model and data at METHOD's lengths, meant for
one GPU: query + thought 256 tokens (thoughts of up to 128), documents 192 in training (512 in evaluation), each
query with its positive and 15 mined hard negatives, 32 queries a step (512 passages in one InfoNCE), lr 1e-4, bf16,
three epochs of the 809 queries (25 steps each).
"""
from o1jax import config as o1config


def get_config(arg=None):
  if arg not in (None, "", "gpu"):
    raise ValueError(f"unknown variant {arg!r}; expected none or 'gpu'")
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
  if arg == "gpu":
    # A scanned layer stack compiles once. 512 passages of 192 tokens need remat: per device, by the CPU compiler
    # (python -m o1jax.aot --config=configs/smollm2_135m_scifact.py:gpu --topology=cpu-1 --hbm_gib=80 with
    # SmolLM2's arch as --config.model.arch.* and --config.model.remat_policy=P): none 242 GiB, minimal 79.1,
    # dots_with_no_batch_dims 72.3, save_qkv_proj 27.6, full 15.9. The two near 80 leave no room for a GPU
    # allocator that differs from the CPU's; save_qkv_proj recomputes the least of the rest.
    c.model.update(dtype="bfloat16", unroll_layers=False, remat_policy="save_qkv_proj")
    c.train.update(steps=75, batch_queries=32, group_size=16)
    c.train.lengths.update(query=32, query_thought=256, doc=192)
    c.optim.update(lr=1e-4)
  return c
