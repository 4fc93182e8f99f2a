"""`python -m k2jax.generate --checkpoint=WORKDIR_OR_STEP (--prompt=TEXT ... | --prompt_ids=1,2,3)`

Batched sampling from a checkpoint with a KV cache. `--chat` renders each prompt as a user turn
with chat.render_prompt and also stops at `<|im_end|>`. Token ids in and out (`--prompt_ids`
with `--output=json`) need no tokenizer; text in or out does. The command line only: the
decoding is k2jax.infer.generation's, the checkpoint and tokenizer loading k2jax.infer.load's.
"""

import json
import sys

from k2jax import errors
from k2jax.infer import generation, load
from k2jax.observe import logs

EFFORTS = ('high', 'medium', 'low')  # chat.EFFORT_TAGS, without importing the data pipeline
DEFAULT_EFFORT = 'high'


def parse_args(argv):
  parser = errors.ArgumentParser(
    prog='python -m k2jax.generate', description=__doc__.split('\n')[0]
  )
  parser.add_argument(
    '--checkpoint', required=True, help='Workdir (newest step), checkpoints dir or step dir.'
  )
  parser.add_argument('--tokenizer', help="Tokenizer (default: the run's data.tokenizer).")
  parser.add_argument(
    '--prompt', action='append', default=[], help='Prompt text; repeat for a batch.'
  )
  parser.add_argument(
    '--prompt_ids',
    action='append',
    default=[],
    help='Prompt as comma-separated token ids; repeatable.',
  )
  parser.add_argument(
    '--chat',
    action='store_true',
    help='Render each prompt as a user turn (ChatML); stop at <|im_end|> too.',
  )
  parser.add_argument(
    '--reasoning_effort',
    choices=sorted(EFFORTS),
    help=f'Chat: the reasoning effort whose opening tag ends the prompt (default {DEFAULT_EFFORT}).',
  )
  parser.add_argument('--system_prompt', help='Chat: a system turn before the prompt.')
  parser.add_argument('--max_new_tokens', type=int, default=256)
  parser.add_argument('--temperature', type=float, default=0.0, help='0: greedy.')
  parser.add_argument('--top_p', type=float, default=1.0, help='Nucleus mass (1: off).')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--output', choices=('text', 'json'), default='text')
  parser.add_argument(
    '--dtype',
    choices=load.DTYPES,
    help="Compute and weight dtype (default: the run's compute dtype).",
  )
  parser.add_argument(
    '--mesh',
    default='data:1,tensor:1',
    help='Mesh axes, e.g. data:1,tensor:8 (-1: the remaining devices).',
  )
  args = parser.parse_args(argv)
  if not (args.prompt or args.prompt_ids):
    parser.error('give at least one --prompt=TEXT or --prompt_ids=1,2,3')
  if args.chat and args.prompt_ids:
    parser.error('--chat renders --prompt text; it does not apply to --prompt_ids')
  for flag in ('reasoning_effort', 'system_prompt'):
    if getattr(args, flag) is not None and not args.chat:
      parser.error(f'--{flag} applies to --chat prompts only: add --chat, or drop --{flag}')
  args.reasoning_effort = args.reasoning_effort or DEFAULT_EFFORT
  args.prompt_ids = [_parse_ids(parser, spec) for spec in args.prompt_ids]
  return args


def _parse_ids(parser, spec: str) -> list[int]:
  try:
    return [int(t) for t in spec.split(',') if t.strip()]
  except ValueError:
    parser.error(f'--prompt_ids={spec}: expected comma-separated integers')


def needs_tokenizer(args) -> tuple[str, str] | None:
  """(the option that needs a tokenizer, a hint for the message), or None: token ids in and
  out (--prompt_ids with --output=json) need none."""
  if args.prompt:
    return ('--chat' if args.chat else '--prompt', '')
  if args.output == 'text':
    return ('--output=text (the default)', ', or --output=json for the generated ids alone')
  return None


def _prompt_ids(args, tokenizer) -> list[tuple[str | None, list[int]]]:
  """(text or None, ids) of every --prompt and --prompt_ids, in that order."""
  from data_pipeline import chat

  prompts = []
  for text in args.prompt:
    if args.chat:
      ids = chat.render_prompt(
        [{'role': 'user', 'content': text}],
        tokenizer,
        args.reasoning_effort,
        system_prompt=args.system_prompt,
      )
    else:
      ids = tokenizer.encode(text)
    prompts.append((text, ids))
  prompts.extend((None, ids) for ids in args.prompt_ids)
  return prompts


def _load_tokenizer(args, loaded):
  """The tokenizer, or None when the run names none and ids in, ids out needs none."""
  needed_by, hint = needs_tokenizer(args) or (None, '')
  return load.load_tokenizer(loaded, args.tokenizer, needed_by=needed_by, hint=hint)


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  with errors.one_line_errors():
    logs.quiet_libraries()
    from data_pipeline import chat
    from data_pipeline import tokenizer as tokenizers

    loaded = load.load(
      args.checkpoint, mesh_spec=args.mesh, dtype=args.dtype, param_dtype=args.dtype
    )
    tokenizer = _load_tokenizer(args, loaded)
    prompts = _prompt_ids(args, tokenizer)
    # Without a tokenizer (ids in, ids out): K2-V2's eos, which is every k2jax tokenizer's.
    eos_id = tokenizers.EOS_ID if tokenizer is None else tokenizer.eos_id
    stop_ids = [eos_id]
    if args.chat:
      stop_ids.append(tokenizer.special_token_id(chat.IM_END))
    pad_id = tokenizer.pad_id if tokenizer is not None and tokenizer.pad_id >= 0 else eos_id
    outputs = generation.generate(
      loaded.params,
      loaded.model_cfg,
      [ids for _, ids in prompts],
      max_new_tokens=args.max_new_tokens,
      temperature=args.temperature,
      top_p=args.top_p,
      seed=args.seed,
      stop_ids=stop_ids,
      pad_id=pad_id,
      mesh=loaded.mesh,
    )
  results = []
  for (text, prompt), ids in zip(prompts, outputs):
    stopped = bool(ids) and ids[-1] in stop_ids
    results.append(
      {
        'prompt': text,
        'prompt_ids': prompt,
        'ids': ids,
        'text': None if tokenizer is None else tokenizer.decode(ids[:-1] if stopped else ids),
        'finish_reason': 'stop' if stopped else 'length',
      }
    )
  if args.output == 'json':
    print(json.dumps(results, ensure_ascii=False))
  else:
    for i, result in enumerate(results):
      if len(results) > 1:
        print(f'--- [{i}] ---')
      print(result['text'])
  sys.stdout.flush()


if __name__ == '__main__':
  main()
