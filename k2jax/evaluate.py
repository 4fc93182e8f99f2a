"""`python -m k2jax.evaluate --checkpoint=WORKDIR_OR_STEP --data=PATH_OR_GLOB [--batches=N]`

Held-out loss and perplexity of a checkpoint, through the training pipeline with the run's
data settings. The command line only: the evaluation is k2jax.infer.evaluation's, the
checkpoint loading k2jax.infer.load's.
"""

import json
import sys

from k2jax import errors
from k2jax.infer import evaluation, load
from k2jax.observe import logs


def parse_args(argv):
  parser = errors.ArgumentParser(
    prog='python -m k2jax.evaluate', description=__doc__.split('\n')[0]
  )
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
    '--dtype',
    choices=load.DTYPES,
    help="Compute dtype (default: the run's); weights stay as saved.",
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
  args = parse_args(sys.argv[1:] if argv is None else argv)
  with errors.one_line_errors():
    logs.quiet_libraries()
    loaded = load.load(args.checkpoint, mesh_spec=args.mesh, dtype=args.dtype)
    data_cfg = evaluation.eval_data_config(
      loaded, args.data, seq_len=args.seq_len, batch_size=args.batch_size, tokenizer=args.tokenizer
    )
    result = evaluation.evaluate(
      loaded, data_cfg, args.batches or loaded.run_cfg.get('eval_batches', 8)
    )
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
