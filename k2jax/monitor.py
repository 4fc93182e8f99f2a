"""`python -m k2jax.monitor WORKDIR [--out=PNG] [--output=text|json]`: a run's summary and curves.

Works on a live run as well as a finished one; the work is in k2jax/observe/run_summary.py.
"""

import argparse
import json
import os
import sys

from k2jax.observe.run_summary import describe, plot, summarize


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog='python -m k2jax.monitor', description=__doc__.splitlines()[0]
  )
  parser.add_argument('workdir')
  parser.add_argument('--out', default=None, help='PNG to write (default: WORKDIR/summary.png)')
  parser.add_argument('--output', choices=('text', 'json'), default='text')
  args = parser.parse_args(argv)
  try:
    summary = summarize(args.workdir)
  except FileNotFoundError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  out = args.out or os.path.join(args.workdir, 'summary.png')
  plot(args.workdir, out)
  summary['plot'] = out
  print(json.dumps(summary) if args.output == 'json' else describe(summary) + f'\n  curves: {out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
