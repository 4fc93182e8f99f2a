"""`python -m k2jax.lm_eval_adapter --checkpoint=DIR --tasks=a,b`: lm-evaluation-harness tasks
on a k2jax checkpoint.

The command line only. The request types and the `K2JaxLM` model class (registered with
lm_eval as `k2jax`) are k2jax.infer.lm_eval's; docs/generation.md has the conventions.
"""

import json
import sys

from k2jax import errors
from k2jax.infer import lm_eval as adapter
from k2jax.infer.load import DTYPES
from k2jax.observe import logs


def parse_args(argv):
  parser = errors.ArgumentParser(
    prog='python -m k2jax.lm_eval_adapter', description='Runs lm-eval tasks on a k2jax checkpoint.'
  )
  parser.add_argument('--checkpoint', required=True)
  parser.add_argument('--tasks', required=True, help='Comma-separated lm-eval task names.')
  parser.add_argument('--num_fewshot', type=int)
  parser.add_argument('--limit', type=float, help='Examples per task (or a fraction).')
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--max_length', type=int, help="Default: the run's data.seq_len.")
  parser.add_argument('--tokenizer', help="Default: the run's data.tokenizer.")
  parser.add_argument('--dtype', choices=DTYPES)
  parser.add_argument('--mesh', default='data:1,tensor:1')
  parser.add_argument('--include_path', help='A folder of extra task YAML files (local tasks).')
  parser.add_argument('--output', help='Write the results as JSON to this file.')
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if adapter.LM is None:
    errors.fail('lm_eval is not installed: pip install lm-eval')
  import lm_eval
  from lm_eval.tasks import TaskManager
  from lm_eval.utils import make_table

  with errors.one_line_errors():
    logs.quiet_libraries()
    model = adapter.K2JaxLM(
      args.checkpoint,
      tokenizer=args.tokenizer,
      batch_size=args.batch_size,
      max_length=args.max_length,
      dtype=args.dtype,
      mesh=args.mesh,
    )
  results = lm_eval.simple_evaluate(
    model=model,
    tasks=args.tasks.split(','),
    num_fewshot=args.num_fewshot,
    limit=args.limit,
    task_manager=TaskManager(include_path=args.include_path),
  )
  print(make_table(results))
  if args.output:
    with open(args.output, 'w') as f:
      json.dump(
        {'results': results['results'], 'config': results.get('config')}, f, indent=1, default=str
      )


if __name__ == '__main__':
  main()
