"""k2jax checkpoints <-> Hugging Face `LlamaForCausalLM` folders (safetensors only).

    python -m k2jax.convert to-hf --checkpoint=WORKDIR_OR_STEP --out=DIR \
        [--dtype=bfloat16|float32] [--tokenizer=PATH] [--shard_size=5GB]
    python -m k2jax.convert from-hf --hf=DIR --out=CKPT [--config=configs/sft.py] [--mesh=data:8]

The command line only: flags, one-line errors and progress on stdout. The conversion itself
is k2jax.hf.convert (`to_hf`, `from_hf`); docs/hf.md has the HF form and the memory each
direction needs for 70B.
"""

import re
import sys

from k2jax import errors
from k2jax.hf import convert
from k2jax.observe import logs

# --- the command line ----------------------------------------------------------------------


def parse_size(text: str) -> float:
  """'5GB', '500MB', '2e9' -> bytes."""
  match = re.fullmatch(r'\s*(\d+(?:\.\d*)?(?:e\d+)?)\s*([kmg]i?b)?\s*', text, re.IGNORECASE)
  units = {None: 1, 'kb': 1e3, 'mb': 1e6, 'gb': 1e9, 'kib': 2**10, 'mib': 2**20, 'gib': 2**30}
  try:
    value = float(match.group(1)) * units[(match.group(2) or '').lower() or None]
  except (AttributeError, ValueError):
    value = 0
  if value <= 0:
    raise ValueError(f'--shard_size={text}: expected a positive size such as 5GB or 500MB')
  return value


def main(argv=None):
  parser = errors.ArgumentParser(
    prog='python -m k2jax.convert', description=__doc__.splitlines()[0]
  )
  commands = parser.add_subparsers(dest='command', required=True)
  to = commands.add_parser('to-hf', help='a k2jax checkpoint -> an HF LlamaForCausalLM folder')
  to.add_argument('--checkpoint', required=True, help='workdir, checkpoints dir or step dir')
  to.add_argument('--out', required=True, help='HF folder to write (new or empty)')
  to.add_argument('--dtype', default='bfloat16', choices=convert.DTYPES)
  to.add_argument(
    '--tokenizer',
    help='SentencePiece .model, tokenizer.json or a folder with '
    "one (default: the run config's data.tokenizer)",
  )
  to.add_argument('--shard_size', default='5GB', help='largest safetensors file')
  back = commands.add_parser(
    'from-hf', help='an HF LlamaForCausalLM folder -> params/ + config/ (+ tokenizer/)'
  )
  back.add_argument('--hf', required=True, help='HF folder: config.json + *.safetensors')
  back.add_argument('--out', required=True, help='directory to create (use as init_from)')
  back.add_argument('--config', help='stage config file[:args] the model must match')
  back.add_argument(
    '--mesh',
    default='data:-1',
    help='device mesh to shard the parameters '
    'over while converting, e.g. data:8 or data:4,tensor:2',
  )
  args = parser.parse_args(argv)
  log = lambda message: print(message, flush=True)  # noqa: E731
  with errors.one_line_errors():
    logs.quiet_libraries()  # Orbax's notes would drown the progress lines
    if args.command == 'to-hf':
      convert.to_hf(
        args.checkpoint,
        args.out,
        dtype=args.dtype,
        tokenizer=args.tokenizer,
        shard_size=parse_size(args.shard_size),
        log=log,
      )
    else:
      convert.from_hf(args.hf, args.out, config=args.config, mesh=args.mesh, log=log)


if __name__ == '__main__':
  main(sys.argv[1:])
