"""`python -m k2jax.evaluate --checkpoint=WORKDIR_OR_STEP --data=PATH_OR_GLOB [--batches=N]`

Held-out loss and perplexity of a checkpoint. The data goes through the training pipeline
(data_pipeline.pipeline.build, split 'eval') with the run's data settings (tokenizer, format,
packing), so rows, masks and the loss are exactly what the run's own evals compute; only the
files, and optionally seq_len and batch size, change. The eval stream starts at the first
document in file order and wraps around at the end, so `--batches` past the end repeats data.
"""

import json
import math
import sys

from k2jax.generate import DTYPES, USER_ERRORS, ArgumentParser, error_message, load, tokenizer_path


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
  data_cfg.tokenizer = tokenizer_path(loaded, tokenizer)
  data_cfg.worker_count = 0  # a few batches: worker processes would cost more than they save
  return data_cfg


def evaluate(loaded, data_cfg, batches: int) -> dict:
  """Token-mean loss over `batches` eval batches: {batches, tokens, loss, perplexity}."""
  import jax

  from data_pipeline import pipeline
  from k2jax.model.transformer import Transformer
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
  process = dict(process_index=jax.process_index(), process_count=jax.process_count())
  stream = pipeline.build(data_cfg, seed=0, split='eval', **process)
  params_sharding = jax.tree.map(lambda p: p.sharding, loaded.params)
  eval_fn = jax.jit(
    train_step.make_eval_step(Transformer(loaded.model_cfg)),
    in_shardings=(params_sharding, batch_sharding),
    out_shardings=sharding.replicated(mesh),
  )
  loss_sum = tokens = 0.0
  with sharding.activate(mesh, fsdp):
    for _, local in zip(range(batches), stream):
      batch = {
        key: sharding.host_array(batch_sharding, local[key]) for key in train_step.BATCH_KEYS
      }
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


def parse_args(argv):
  parser = ArgumentParser(prog='python -m k2jax.evaluate', description=__doc__.split('\n')[0])
  parser.add_argument(
    '--checkpoint', required=True, help='Workdir (newest step), checkpoints dir or step dir.'
  )
  parser.add_argument(
    '--data', required=True, help='Held-out data: file, glob, folder or prepared directory.'
  )
  parser.add_argument('--batches', type=int, help="Batches (default: the run's eval_batches).")
  parser.add_argument('--seq_len', type=int, help="Tokens per row (default: the run's).")
  parser.add_argument(
    '--batch_size',
    type=int,
    help="Rows per batch over all hosts (default: the run's global batch).",
  )
  parser.add_argument('--tokenizer', help="Tokenizer (default: the run's data.tokenizer).")
  parser.add_argument('--output', choices=('text', 'json'), default='text')
  parser.add_argument(
    '--dtype', choices=DTYPES, help="Compute dtype (default: the run's); weights stay as saved."
  )
  parser.add_argument(
    '--mesh',
    default='data:-1,tensor:1',
    help='Mesh axes, e.g. data:-1,tensor:8 (-1: the remaining devices).',
  )
  args = parser.parse_args(argv)
  for name in ('batches', 'seq_len', 'batch_size'):
    value = getattr(args, name)
    if value is not None and value < 1:
      parser.error(f'--{name} must be >= 1, got {value}')
  return args


def main(argv=None):
  from k2jax import run_config

  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    loaded = load(args.checkpoint, mesh_spec=args.mesh, dtype=args.dtype)
    data_cfg = eval_data_config(
      loaded, args.data, seq_len=args.seq_len, batch_size=args.batch_size, tokenizer=args.tokenizer
    )
    result = evaluate(loaded, data_cfg, args.batches or loaded.run_cfg.get('eval_batches', 8))
  except USER_ERRORS as error:
    run_config.fail(error_message(error))
  result = {
    'checkpoint': loaded.step_dir,
    'data': args.data,
    'seq_len': data_cfg.seq_len,
    'batch_size': data_cfg.global_batch_size,
    **result,
  }
  if args.output == 'json':
    print(json.dumps(result))
  else:
    print(
      f'{result["checkpoint"]}: {result["tokens"]:,} tokens evaluated '
      f'({result["batches"]} batches of {result["batch_size"]} x {result["seq_len"]}); '
      f'loss {result["loss"]:.4f}, perplexity {result["perplexity"]:.3f}'
    )
  sys.stdout.flush()


if __name__ == '__main__':
  main()
