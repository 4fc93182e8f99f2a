"""Held-out loss and perplexity of a loaded checkpoint (k2jax.infer.load).

The data goes through the training pipeline (data_pipeline.pipeline.build, split 'eval') with
the run's data settings (tokenizer, format, packing), so rows, masks and the loss are exactly
what the run's own evals compute; only the files, and optionally seq_len and batch size,
change. The eval stream starts at the first document in file order and wraps around at the
end, so more batches than the data holds repeat it. The command line is k2jax/evaluate.py.
"""

import math

from k2jax.infer import load


def eval_data_config(loaded, data: str, *, seq_len=None, batch_size=None, tokenizer=None):
  """The run's data section with the eval files (and shape / tokenizer overrides) replaced.

  Keys the run config lacks (a checkpoint converted from HF names little more than the
  tokenizer and seq_len) take configs/base.py's defaults.
  """
  from configs import base

  data_cfg = base.get_config().data
  data_cfg.update(loaded.run_cfg.get('data', {}))
  data_cfg.eval_files = data
  if seq_len:
    data_cfg.seq_len = seq_len
  if batch_size:
    data_cfg.global_batch_size = batch_size
  data_cfg.tokenizer = load.require_tokenizer_path(loaded, tokenizer, 'encoding the data')
  data_cfg.worker_count = 0  # a few batches: worker processes would cost more than they save
  return data_cfg


def evaluate(loaded, data_cfg, batches: int) -> dict:
  """Token-mean loss over `batches` eval batches: {batches, tokens, loss, perplexity}."""
  import jax

  from data_pipeline import pipeline
  from k2jax.model.transformer import Transformer
  from k2jax.parallel import input as batch_input
  from k2jax.parallel import sharding
  from k2jax.training import train_step

  if batches < 1:
    raise ValueError(f'--batches must be >= 1, got {batches}')
  mesh, fsdp = loaded.mesh, loaded.fsdp
  shape = (data_cfg.global_batch_size, data_cfg.seq_len)
  batch_sharding = sharding.batch_sharding(mesh, shape, fsdp)
  sharding.check_activations(mesh, loaded.model_cfg, data_cfg.seq_len, fsdp)
  tokenizer = pipeline.tokenizer_for(data_cfg)
  if tokenizer.vocab_size > loaded.model_cfg.vocab_size:
    raise ValueError(
      f'tokenizer {data_cfg.tokenizer} has {tokenizer.vocab_size} tokens, more '
      f'than model.vocab_size={loaded.model_cfg.vocab_size}'
    )
  # Processes that hold the same rows of the batch load the same rows (parallel/input.py).
  shard = batch_input.shard_for(batch_sharding, *shape)
  stream = pipeline.build(
    data_cfg, seed=0, split='eval', process_index=shard.index, process_count=shard.count
  )
  params_sharding = jax.tree.map(lambda p: p.sharding, loaded.params)
  eval_fn = jax.jit(
    train_step.make_eval_step(Transformer(loaded.model_cfg)),
    in_shardings=(params_sharding, batch_sharding),
    out_shardings=sharding.replicated(mesh),
  )
  loss_sum = tokens = 0.0
  with sharding.activate(mesh, fsdp):
    for _, local in zip(range(batches), stream):
      batch = batch_input.global_batch(batch_sharding, shard, local, train_step.BATCH_KEYS)
      out = jax.device_get(eval_fn(loaded.params, batch))
      loss_sum += float(out['loss_sum'])  # summed on the host in float64
      tokens += float(out['loss_tokens'])
  if not tokens:
    raise ValueError('the evaluated batches hold no loss tokens')
  loss = loss_sum / tokens
  return {
    'batches': batches,
    'tokens': int(tokens),
    'loss': loss,
    'perplexity': math.exp(min(loss, 700.0)),
  }
