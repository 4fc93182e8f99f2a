"""lm-evaluation-harness on k2jax checkpoints: the library behind
`python -m k2jax.lm_eval_adapter` (k2jax/lm_eval_adapter.py, the command line).

The three request types are plain functions over (params, model_cfg, tokenizer), usable and
tested without lm_eval installed:

  loglikelihood          [(context, continuation)] -> [(log p(continuation | context), greedy?)]
  loglikelihood_rolling  [text] -> [log p(text)], over windows of at most max_length tokens
  generate_until         [(context, gen_kwargs)] -> [completion cut at the `until` strings]

When lm_eval is importable, `K2JaxLM` wraps them as an `lm_eval.api.model.LM` registered as
`k2jax` (importing this module registers it).

Conventions follow lm-eval's causal models: trailing spaces of a context move to the
continuation; the continuation's tokens are those of encode(context + continuation) past
encode(context); an empty context is the prefix token (K2-V2's EOD, which precedes every
document in the packed pre-training stream); contexts are truncated on the left.
"""

import functools
import json
import sys

import numpy as np

from k2jax.infer import generation, load

# --- scoring token sequences ---------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _score_fn(model_cfg, mesh, fsdp: bool | str):
  """jit: (params, inputs, targets, segment ids) [B, L] -> (log p(target), target is argmax)."""
  import jax
  import jax.numpy as jnp

  from k2jax.model.transformer import Transformer

  model = Transformer(model_cfg)

  def score(params, inputs_BxL, targets_BxL, segments_BxL):
    logits_BxLxV = model.apply({'params': params}, inputs_BxL, None, segments_BxL)
    logp_BxLxV = jax.nn.log_softmax(logits_BxLxV, axis=-1)
    target_logp_BxL = jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    return target_logp_BxL, jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL

  return jax.jit(score)


def _bucket(n: int, cap: int) -> int:
  """A power of two >= n (at least 16), at most cap: few distinct shapes, few compiles."""
  return min(cap, max(16, 1 << (n - 1).bit_length()))


def score_pairs(
  params,
  model_cfg,
  pairs,
  *,
  max_length: int,
  batch_size: int = 8,
  mesh=None,
  fsdp: bool | str = False,
) -> list[tuple[float, bool]]:
  """(sum of log p(continuation tokens), all of them greedy) for each (context, continuation)
  pair of token-id lists; the input is cut on the left to `max_length` tokens."""
  import jax

  from k2jax.parallel import sharding

  if not pairs:
    return []
  rows = []
  for context, continuation in pairs:
    if not context or not continuation:
      raise ValueError('every pair needs a non-empty context and continuation')
    if len(continuation) > max_length:
      raise ValueError(
        f'a continuation of {len(continuation)} tokens does not fit max_length={max_length}'
      )
    whole = list(context) + list(continuation)
    rows.append((whole[:-1][-max_length:], whole[1:][-max_length:], len(continuation)))
  # Longest first, so a batch's rows are close in length (lm-eval orders its requests so too).
  order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
  if mesh is not None:
    batch_size = generation.round_up(batch_size, sharding.batch_shards(mesh))
  fn = _score_fn(model_cfg, mesh, fsdp)
  results = [None] * len(rows)
  for start in range(0, len(order), batch_size):
    chosen = order[start : start + batch_size]
    length = _bucket(len(rows[chosen[0]][0]), max_length)
    inputs, targets, segments = (np.zeros((batch_size, length), np.int32) for _ in range(3))
    for row, i in enumerate(chosen):  # right padding, segment 0: invisible to real tokens
      n = len(rows[i][0])
      inputs[row, :n], targets[row, :n], segments[row, :n] = rows[i][0], rows[i][1], 1
    if mesh is None:
      logp, greedy = fn(params, inputs, targets, segments)
    else:
      with sharding.activate(mesh, fsdp):
        placed = [
          jax.device_put(a, sharding.batch_sharding(mesh, a.shape, fsdp))
          for a in (inputs, targets, segments)
        ]
        logp, greedy = fn(params, *placed)
    logp, greedy = np.asarray(jax.device_get(logp)), np.asarray(jax.device_get(greedy))
    for row, i in enumerate(chosen):
      n, scored = len(rows[i][0]), rows[i][2]
      results[i] = (
        float(np.sum(logp[row, n - scored : n], dtype=np.float64)),
        bool(np.all(greedy[row, n - scored : n])),
      )
  return results


# --- the three request types ---------------------------------------------------------------


def prefix_id(tokenizer) -> int:
  return tokenizer.eos_id


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """(context ids, continuation ids) the way lm-eval's causal models split them."""
  stripped = context.rstrip()
  continuation = context[len(stripped) :] + continuation
  if not stripped:
    return [prefix_id(tokenizer)], tokenizer.encode(continuation)
  context_ids = tokenizer.encode(stripped)
  whole = tokenizer.encode(stripped + continuation)
  return context_ids, whole[len(context_ids) :]


def loglikelihood(
  params,
  model_cfg,
  tokenizer,
  requests,
  *,
  max_length: int,
  batch_size: int = 8,
  mesh=None,
  fsdp: bool | str = False,
):
  """[(context, continuation)] -> [(log-likelihood of the continuation, is greedy)]."""
  pairs = [encode_pair(tokenizer, context, continuation) for context, continuation in requests]
  return score_pairs(
    params, model_cfg, pairs, max_length=max_length, batch_size=batch_size, mesh=mesh, fsdp=fsdp
  )


def rolling_windows(tokens: list[int], prefix: int, max_length: int):
  """(context, continuation) pairs that predict every token once, each input <= max_length.

  The first window predicts tokens[:max_length] after the prefix token; each later one
  predicts the next max_length tokens (fewer at the end) after whatever precedes them in
  its max_length-token input. This is lm-eval's disjoint rolling window with context 1.
  """
  if not tokens:
    return []
  pairs = [([prefix], tokens[:max_length])]
  start = max_length
  while start < len(tokens):
    end = min(start + max_length, len(tokens))
    pairs.append((tokens[end - 1 - max_length : start], tokens[start:end]))
    start = end
  return pairs


def loglikelihood_rolling(
  params,
  model_cfg,
  tokenizer,
  texts,
  *,
  max_length: int,
  batch_size: int = 8,
  mesh=None,
  fsdp: bool | str = False,
) -> list[float]:
  """[text] -> [log p(text)] (perplexity tasks); long texts are scored window by window."""
  windows, owner = [], []
  for i, text in enumerate(texts):
    for pair in rolling_windows(tokenizer.encode(text), prefix_id(tokenizer), max_length):
      windows.append(pair)
      owner.append(i)
  totals = [0.0] * len(texts)
  for i, (logp, _) in zip(
    owner,
    score_pairs(
      params, model_cfg, windows, max_length=max_length, batch_size=batch_size, mesh=mesh, fsdp=fsdp
    ),
  ):
    totals[i] += logp
  return totals


def _until(kwargs) -> list[str]:
  until = kwargs.get('until') or []
  return [until] if isinstance(until, str) else list(until)


def cut_at(text: str, until) -> str:
  """`text` up to the first occurrence of any of the `until` strings."""
  cut = len(text)
  for stop in until:
    if stop:
      at = text.find(stop)
      if at != -1:
        cut = min(cut, at)
  return text[:cut]


def generate_until(
  params,
  model_cfg,
  tokenizer,
  requests,
  *,
  max_length: int,
  max_gen_toks: int = 256,
  batch_size: int = 8,
  mesh=None,
  fsdp: bool | str = False,
) -> list[str]:
  """[(context, gen_kwargs)] -> [completion]: greedy unless gen_kwargs ask to sample.

  gen_kwargs: until (str or list), max_gen_toks, do_sample, temperature, top_p. A row stops
  at eos or at an `until` string that is a single token; otherwise it runs to max_gen_toks
  and the text is cut at the first `until` string afterwards.
  """
  results = [None] * len(requests)
  groups = {}  # requests with the same settings are batched together
  for i, (_, kwargs) in enumerate(requests):
    groups.setdefault(json.dumps(kwargs or {}, sort_keys=True, default=str), []).append(i)
  for key, members in groups.items():
    kwargs = json.loads(key)
    unknown = set(kwargs) - {'until', 'max_gen_toks', 'do_sample', 'temperature', 'top_p'}
    if unknown:
      print(f'k2jax: ignoring generation arguments {sorted(unknown)}', file=sys.stderr)
    until = _until(kwargs)
    new_tokens = int(kwargs.get('max_gen_toks', max_gen_toks))
    temperature = float(kwargs.get('temperature', 0.0)) if kwargs.get('do_sample') else 0.0
    stop_ids = {tokenizer.eos_id}
    stop_ids.update(ids[0] for ids in map(tokenizer.encode, until) if len(ids) == 1)
    budget = max_length - new_tokens
    if budget < 1:
      raise ValueError(
        f'max_gen_toks={new_tokens} leaves no room for a context in max_length={max_length}'
      )
    prompts = [
      (tokenizer.encode(requests[i][0]) or [prefix_id(tokenizer)])[-budget:] for i in members
    ]
    for start in range(0, len(members), batch_size):
      chunk = prompts[start : start + batch_size]
      filled = chunk + [chunk[0]] * (batch_size - len(chunk))  # one shape per bucket
      outputs = generation.generate(
        params,
        model_cfg,
        filled,
        max_new_tokens=new_tokens,
        temperature=temperature,
        top_p=float(kwargs.get('top_p', 1.0)),
        stop_ids=sorted(stop_ids),
        pad_id=prefix_id(tokenizer),
        pad_multiple=_bucket(max(map(len, chunk)), budget),
        mesh=mesh,
        fsdp=fsdp,
      )
      for i, ids in zip(members[start : start + batch_size], outputs):
        if ids and ids[-1] in stop_ids:
          ids = ids[:-1]
        results[i] = cut_at(tokenizer.decode(ids), until)
  return results


# --- lm_eval's model interface, when it is installed ---------------------------------------

try:
  from lm_eval.api.model import LM
  from lm_eval.api.registry import register_model
except ImportError:  # the functions above work without it
  LM = None

if LM is not None:

  @register_model('k2jax')
  class K2JaxLM(LM):
    """`--model k2jax --model_args checkpoint=DIR[,tokenizer=..,max_length=..,mesh=..]`.

    Or built from loaded objects: K2JaxLM(params=..., model_cfg=..., tokenizer=...).
    """

    def __init__(
      self,
      checkpoint=None,
      *,
      params=None,
      model_cfg=None,
      tokenizer=None,
      batch_size=8,
      max_length=None,
      max_gen_toks=256,
      dtype=None,
      mesh='data:1,tensor:1',
      **unused,
    ):
      super().__init__()
      from data_pipeline.tokenizer import load_tokenizer, tokenizer_file

      self._mesh = None
      if checkpoint is not None:
        loaded = load.load(checkpoint, mesh_spec=mesh, dtype=dtype, param_dtype=dtype)
        params, model_cfg, self._mesh = loaded.params, loaded.model_cfg, loaded.mesh
        if tokenizer is None or isinstance(tokenizer, str):
          tokenizer = load.load_tokenizer(loaded, tokenizer, needed_by='lm-eval')
        max_length = max_length or loaded.run_cfg.get('data', {}).get('seq_len')
      if params is None or model_cfg is None or tokenizer is None or not max_length:
        raise ValueError(
          'K2JaxLM needs checkpoint=DIR, or params, model_cfg, tokenizer and max_length'
        )
      self.params, self.model_cfg = params, model_cfg
      if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer_file(tokenizer))
      self.tokenizer = tokenizer
      self._name = getattr(self.tokenizer, 'path', type(self.tokenizer).__name__)
      self.max_length = int(max_length)
      self.max_gen_toks = int(max_gen_toks)
      # lm-eval passes batch_size as given on its command line, 'auto' included.
      self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8

    def _settings(self):
      return dict(max_length=self.max_length, batch_size=self.batch_size, mesh=self._mesh)

    def _record(self, kind, requests, results):
      for request, result in zip(requests, results):
        self.cache_hook.add_partial(kind, request.args, result)
      return results

    def loglikelihood(self, requests, disable_tqdm: bool = False):
      results = loglikelihood(
        self.params, self.model_cfg, self.tokenizer, [r.args for r in requests], **self._settings()
      )
      return self._record('loglikelihood', requests, results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
      results = loglikelihood_rolling(
        self.params,
        self.model_cfg,
        self.tokenizer,
        [r.args[0] for r in requests],
        **self._settings(),
      )
      return self._record('loglikelihood_rolling', requests, results)

    def generate_until(self, requests, disable_tqdm: bool = False):
      results = generate_until(
        self.params,
        self.model_cfg,
        self.tokenizer,
        [r.args for r in requests],
        max_gen_toks=self.max_gen_toks,
        **self._settings(),
      )
      return self._record('generate_until', requests, results)

    @property
    def tokenizer_name(self) -> str:
      return self._name
