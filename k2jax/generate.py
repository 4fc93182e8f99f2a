"""`python -m k2jax.generate --checkpoint=WORKDIR_OR_STEP (--prompt=TEXT ... | --prompt_ids=1,2,3)`

Batched sampling from a checkpoint with a KV cache (model.init_cache): the prompts are
padded to one length (left by default; right works too, positions are per row), prefilled
in one call, then decoded a token at a time inside one jitted while loop that stops when
every row has produced a stop token or `max_new_tokens`. Greedy at temperature 0, else
temperature and nucleus (top-p) sampling from a seed. `--chat` renders each prompt as a user
turn with chat.render_prompt and also stops at `<|im_end|>`.

Also the checkpoint loading and mesh parsing that k2jax.evaluate and the lm-eval adapter share.
"""

import argparse
import dataclasses
import functools
import json
import math
import os
import sys

# Errors that mean "the flags or their inputs are wrong": one line, exit 2, no traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotImplementedError, KeyError)

DTYPES = ('bfloat16', 'float32')


EFFORTS = ('high', 'medium', 'low')  # chat.EFFORT_TAGS, without importing the data pipeline


def error_message(error: Exception) -> str:
  """The one-line text of a user error (str of a KeyError is its repr, quotes and all)."""
  if isinstance(error, KeyError) and error.args:
    return str(error.args[0])
  return str(error)


# --- checkpoints and meshes (shared with evaluate.py and lm_eval_adapter.py) -------------


def parse_mesh(spec: str) -> dict:
  """'data:1,tensor:2' -> {'data': 1, 'tensor': 2, 'sequence': 1}; -1 fills the devices."""
  from k2jax import run_config
  from k2jax.parallel import sharding

  return {**dict.fromkeys(sharding.AXES, 1), **run_config.parse_mesh(spec)}


def make_mesh(spec: str):
  """A mesh over as many devices as the spec names (all of them when an axis is -1)."""
  import jax
  import ml_collections

  from k2jax.parallel import sharding

  sizes = parse_mesh(spec)
  devices = jax.devices()
  if -1 not in sizes.values():
    wanted = math.prod(sizes.values())
    if wanted > len(devices):
      raise ValueError(f'--mesh={spec} needs {wanted} devices, {len(devices)} are available')
    devices = devices[:wanted]
  return sharding.make_mesh(ml_collections.ConfigDict(sizes), devices)


def read_run_config(step_dir: str) -> dict:
  """The run config saved with a checkpoint step (its `config/` item)."""
  import orbax.checkpoint as ocp

  path = os.path.join(step_dir, 'config')
  if not os.path.isdir(path):
    raise FileNotFoundError(f'checkpoint {step_dir} has no config/ item with the run config')
  return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(path)


@dataclasses.dataclass
class Loaded:
  """A checkpoint on a mesh: what generation and evaluation need."""

  params: dict
  model_cfg: object  # ModelConfig
  run_cfg: object  # ml_collections.ConfigDict of the run that saved it
  step_dir: str
  mesh: object
  fsdp: bool = False


def load(
  checkpoint: str,
  *,
  mesh_spec: str = 'data:1,tensor:1',
  dtype: str | None = None,
  param_dtype: str | None = None,
  fsdp: bool = False,
) -> Loaded:
  """Restores a checkpoint's parameters straight onto `mesh_spec`'s shardings.

  `checkpoint` is a workdir (its newest step), a checkpoints directory or a step directory.
  `dtype` is the compute dtype (default: the run's), `param_dtype` the dtype the weights are
  restored in (default: as saved, float32); remat is off since nothing is differentiated.
  """
  import flax.linen as nn
  import jax
  import ml_collections
  import orbax.checkpoint as ocp

  from k2jax.model import config as model_config
  from k2jax.model.transformer import Transformer
  from k2jax.parallel import sharding
  from k2jax.training import checkpoint as ckpt
  from k2jax.training import train_step

  for name, value in (('dtype', dtype), ('param_dtype', param_dtype)):
    if value is not None and value not in DTYPES:
      raise ValueError(f'--{name}={value} is not one of {"|".join(DTYPES)}')
  try:
    step_dir = ckpt.resolve_step_dir(checkpoint)
  except FileNotFoundError:
    raise FileNotFoundError(
      f'checkpoint {checkpoint} is neither a step directory (with '
      'params/) nor a workdir or checkpoints directory with a committed '
      'step'
    ) from None
  run_cfg = ml_collections.ConfigDict(read_run_config(step_dir))
  model_cfg = model_config.from_config(run_cfg.model)
  model_cfg = dataclasses.replace(
    model_cfg,
    remat='none',
    dtype=dtype or model_cfg.dtype,
    param_dtype=param_dtype or model_cfg.param_dtype,
  )
  mesh = make_mesh(mesh_spec)
  boxed = train_step.abstract_params(Transformer(model_cfg), 1)
  shardings = sharding.param_shardings(mesh, boxed, fsdp)  # checks the dims divide
  abstract = nn.unbox(boxed)
  try:
    ckpt.check_params_fit(step_dir, abstract)
  except ValueError as error:  # its messages speak of init_from
    raise ValueError(str(error).replace('init_from ', 'checkpoint ', 1)) from None
  # Orbax casts to the target dtype while reading, so nothing is materialized twice.
  target = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(os.path.join(step_dir, 'params'), target)
  return Loaded(
    params=params, model_cfg=model_cfg, run_cfg=run_cfg, step_dir=step_dir, mesh=mesh, fsdp=fsdp
  )


def tokenizer_path(loaded: Loaded, override: str | None = None) -> str:
  """--tokenizer, else the run's data.tokenizer (a converted HF checkpoint may name none)."""
  path = override or loaded.run_cfg.get('data', {}).get('tokenizer', '')
  if not path:
    raise ValueError(
      f'the run config of {loaded.step_dir} names no data.tokenizer: pass --tokenizer=PATH'
    )
  return path


# --- sampling ------------------------------------------------------------------------------


def sample_logits(logits_BxV, key, temperature, top_p):
  """A draw from softmax(logits / temperature) cut to the top-p nucleus.

  The nucleus is the smallest set of most likely tokens whose mass reaches top_p (always at
  least the most likely token), as HF's TopPLogitsWarper keeps it. temperature and top_p
  may be traced, so one compiled loop serves every setting.
  """
  import jax
  import jax.numpy as jnp

  logits_BxV = logits_BxV.astype(jnp.float32) / temperature
  sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
  probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
  mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
  threshold_B = jnp.min(jnp.where(mass_before_BxV < top_p, sorted_BxV, jnp.inf), axis=-1)
  logits_BxV = jnp.where(logits_BxV >= threshold_B[:, None], logits_BxV, -jnp.inf)
  return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=16)
def _decode_fn(model_cfg, max_new_tokens: int, mesh, fsdp: bool):
  """The jitted prefill + decode loop for one model, output length and mesh.

  Temperature, top-p, stop and pad ids are traced, so every setting shares one compilation
  (the nucleus sort per step is small next to a forward pass). The mesh is part of the key
  because the logical sharding rules, which jit does not see, shape what is traced.
  """
  import jax
  import jax.numpy as jnp

  from k2jax.model.transformer import Transformer, init_cache

  model = Transformer(model_cfg)

  def run(
    params,
    tokens_BxP,
    positions_BxP,
    segments_BxP,
    last_B,
    next_position_B,
    key,
    temperature,
    top_p,
    stops_S,
    pad_id,
  ):
    def next_token(logits_BxV, step):
      greedy_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
      drawn_B = sample_logits(
        logits_BxV, jax.random.fold_in(key, step), jnp.maximum(temperature, 1e-6), top_p
      )
      return jnp.where(temperature > 0, drawn_B, greedy_B)

    batch, length = tokens_BxP.shape
    cache = init_cache(model_cfg, batch, length + max_new_tokens)
    logits, cache = model.apply(
      {'params': params}, tokens_BxP, positions_BxP, segments_BxP, cache=cache, logits_at=last_B
    )
    token_B = next_token(logits[:, 0], 0)
    out_BxN = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token_B)
    done_B = jnp.isin(token_B, stops_S)

    def more(state):
      step, _, _, _, done_B = state
      return (step < max_new_tokens) & ~jnp.all(done_B)

    def decode(state):
      step, token_B, cache, out_BxN, done_B = state
      # The token produced at step - 1 sits at position prompt length + step - 1.
      logits, cache = model.apply(
        {'params': params},
        token_B[:, None],
        (next_position_B + step - 1)[:, None],
        jnp.ones((batch, 1), jnp.int32),
        cache=cache,
      )
      token_B = jnp.where(done_B, pad_id, next_token(logits[:, 0], step))  # done rows pad
      out_BxN = jax.lax.dynamic_update_slice(out_BxN, token_B[:, None], (0, step))
      return step + 1, token_B, cache, out_BxN, done_B | jnp.isin(token_B, stops_S)

    state = (jnp.ones((), jnp.int32), token_B, cache, out_BxN, done_B)
    return jax.lax.while_loop(more, decode, state)[3]

  return jax.jit(run)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def generate(
  params,
  model_cfg,
  prompts,
  *,
  max_new_tokens: int,
  temperature: float = 0.0,
  top_p: float = 1.0,
  seed: int = 0,
  stop_ids=(),
  pad_id: int = 0,
  padding: str = 'left',
  pad_multiple: int = 8,
  mesh=None,
  fsdp: bool = False,
) -> list[list[int]]:
  """Continues each prompt (a list of token ids); returns the new ids of each.

  A row ends after its first token in `stop_ids` (included in its result) or after
  `max_new_tokens`. Prompts are padded to a multiple of `pad_multiple` (fewer compiles for
  varied lengths) on the `padding` side, and the batch to a multiple of the mesh's data axis.
  On a mesh the call runs under its logical sharding rules; `params` should already lie on
  it (see `load`).
  """
  import jax
  import numpy as np

  from k2jax.parallel import sharding

  if not prompts:
    return []
  if any(len(p) == 0 for p in prompts):
    raise ValueError('every prompt needs at least one token')
  if padding not in ('left', 'right'):
    raise ValueError(f'padding must be left or right, got {padding!r}')
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f'max_new_tokens must be a positive integer, got {max_new_tokens!r}')
  if temperature < 0 or not 0 < top_p <= 1:
    raise ValueError(f'need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}')
  if mesh is not None and mesh.shape['sequence'] != 1:
    raise ValueError('decoding does not split sequences: use a mesh with sequence 1')
  for p in prompts:
    bad = [t for t in p if not 0 <= t < model_cfg.vocab_size]
    if bad:
      raise ValueError(
        f'prompt token id {bad[0]} is outside the vocabulary '
        f'(model.vocab_size={model_cfg.vocab_size})'
      )

  rows = _round_up(len(prompts), mesh.shape['data'] if mesh is not None else 1)
  length = _round_up(max(len(p) for p in prompts), pad_multiple)
  tokens = np.full((rows, length), pad_id, np.int32)
  segments = np.zeros((rows, length), np.int32)
  positions = np.zeros((rows, length), np.int32)
  last = np.zeros(rows, np.int32)
  lengths = np.ones(rows, np.int32)
  for i in range(rows):
    prompt = prompts[i] if i < len(prompts) else prompts[0]  # filler rows, dropped below
    n = len(prompt)
    start = length - n if padding == 'left' else 0
    tokens[i, start : start + n] = prompt
    segments[i, start : start + n] = 1
    positions[i, start : start + n] = np.arange(n)
    last[i], lengths[i] = start + n - 1, n

  fn = _decode_fn(model_cfg, max_new_tokens, mesh, fsdp)
  # Stop ids padded with -1 (never a token) to a multiple of 8: one shape for most settings.
  stops = np.full(_round_up(max(len(stop_ids), 1), 8), -1, np.int32)
  stops[: len(stop_ids)] = list(stop_ids)
  settings = (
    jax.random.key(seed),
    np.float32(temperature),
    np.float32(top_p),
    stops,
    np.int32(pad_id),
  )
  args = (tokens, positions, segments, last, lengths, *settings)
  if mesh is None:
    out = fn(params, *args)
  else:
    with sharding.activate(mesh, fsdp):
      rows_sharding = jax.sharding.NamedSharding(
        mesh,
        sharding.partition_spec(('activation_batch',), sharding.logical_rules(fsdp), 'prompts'),
      )
      batch_sharding = sharding.batch_sharding(mesh, (rows, length), fsdp)
      args = (
        tuple(jax.device_put(a, batch_sharding) for a in args[:3])
        + tuple(jax.device_put(a, rows_sharding) for a in args[3:5])
        + args[5:]
      )  # settings: as is
      out = fn(params, *args)
  out = np.asarray(jax.device_get(out))[: len(prompts)]
  stop_set = set(int(s) for s in stop_ids)
  results = []
  for row in out.tolist():
    end = next((i + 1 for i, t in enumerate(row) if t in stop_set), len(row))
    results.append(row[:end])
  return results


# --- the command line ----------------------------------------------------------------------


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose errors are one line and exit 2, like the other k2jax commands."""

  def error(self, message):
    from k2jax import run_config

    run_config.fail(message)


def parse_args(argv):
  parser = ArgumentParser(prog='python -m k2jax.generate', description=__doc__.split('\n')[0])
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
    default='high',
    help='Chat: the reasoning effort whose opening tag ends the prompt.',
  )
  parser.add_argument('--system_prompt', help='Chat: a system turn before the prompt.')
  parser.add_argument('--max_new_tokens', type=int, default=256)
  parser.add_argument('--temperature', type=float, default=0.0, help='0: greedy.')
  parser.add_argument('--top_p', type=float, default=1.0, help='Nucleus mass (1: off).')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--output', choices=('text', 'json'), default='text')
  parser.add_argument(
    '--dtype', choices=DTYPES, help="Compute and weight dtype (default: the run's compute dtype)."
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
  return args


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
  for spec in args.prompt_ids:
    try:
      ids = [int(t) for t in spec.split(',') if t.strip()]
    except ValueError:
      raise ValueError(f'--prompt_ids={spec}: expected comma-separated integers') from None
    prompts.append((None, ids))
  return prompts


def main(argv=None):
  from k2jax import run_config

  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    from data_pipeline import chat
    from data_pipeline.tokenizer import load_tokenizer

    loaded = load(args.checkpoint, mesh_spec=args.mesh, dtype=args.dtype, param_dtype=args.dtype)
    tokenizer = load_tokenizer(tokenizer_path(loaded, args.tokenizer))
    if tokenizer.vocab_size > loaded.model_cfg.vocab_size:
      raise ValueError(
        f"tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
        f'{loaded.model_cfg.vocab_size}'
      )
    prompts = _prompt_ids(args, tokenizer)
    stop_ids = [tokenizer.eos_id]
    if args.chat:
      stop_ids.append(tokenizer.special_token_id(chat.IM_END))
    pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id
    outputs = generate(
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
  except USER_ERRORS as error:
    run_config.fail(error_message(error))
  results = []
  for (text, prompt), ids in zip(prompts, outputs):
    stopped = bool(ids) and ids[-1] in stop_ids
    results.append(
      {
        'prompt': text,
        'prompt_ids': prompt,
        'ids': ids,
        'text': tokenizer.decode(ids[:-1] if stopped else ids),
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
