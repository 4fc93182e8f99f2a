"""Batched generation from token ids with a KV cache (model.init_cache).

The prompts are padded to one length (left by default; right works too, positions are per
row), prefilled in one call, then decoded a token at a time inside one jitted while loop that
stops when every row has produced a stop token or `max_new_tokens`. Greedy at temperature 0,
else temperature and nucleus (top-p) sampling from a seed. Tokenizers, chat rendering and the
command line are k2jax/generate.py's.
"""

import functools

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
def _decode_fn(model_cfg, max_new_tokens: int, mesh, fsdp: bool | str):
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


def round_up(n: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is >= n."""
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
  fsdp: bool | str = False,
) -> list[list[int]]:
  """Continues each prompt (a list of token ids); returns the new ids of each.

  A row ends after its first token in `stop_ids` (included in its result) or after
  `max_new_tokens`. Prompts are padded to a multiple of `pad_multiple` (fewer compiles for
  varied lengths) on the `padding` side, and the batch to a multiple of the mesh's data axis.
  On a mesh the call runs under its logical sharding rules; `params` should already lie on
  it (see k2jax.infer.load.load).
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

  rows = round_up(len(prompts), sharding.batch_shards(mesh) if mesh is not None else 1)
  length = round_up(max(len(p) for p in prompts), pad_multiple)
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
  stops = np.full(round_up(max(len(stop_ids), 1), 8), -1, np.int32)
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
        sharding.partition_spec(
          ('activation_batch',), sharding.logical_rules(fsdp, mesh), 'prompts'
        ),
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
