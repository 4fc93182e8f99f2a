"""The Hugging Face `LlamaForCausalLM` form of a k2jax model: where each parameter lives.

Owns the one map both conversion directions read (`TENSORS`: HF name, axis permutation and
grouping, the (1+w) norm offset), the arithmetic that places a box of a k2jax parameter in its
HF tensor, and config.json in both directions. Nothing here reads or writes weights: that is
k2jax.hf.safetensors_io (files) and k2jax.hf.convert (Orbax checkpoints), so the map can change in
one place and be tested without either.
"""

import dataclasses
import json
import math
import os
import re

import numpy as np

from k2jax.model import config as model_config

# --- where each parameter lives in HF's LlamaForCausalLM ---------------------------------


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One k2jax parameter (one layer's slice if stacked) as an HF tensor:
  hf = transpose(param, perm).reshape(products of `groups` consecutive permuted axes)."""

  hf: str  # HF name; '{}' is the layer index
  perm: tuple[int, ...]
  groups: tuple[int, ...]
  norm: bool = False  # a (1+w) RMSNorm scale: HF stores w + 1


TENSORS = {
  'embedding': Tensor('model.embed_tokens.weight', (0, 1), (1, 1)),  # [V, E]
  'output': Tensor('lm_head.weight', (1, 0), (1, 1)),  # [E, V] -> [V, E]
  'final_norm/scale': Tensor('model.norm.weight', (0,), (1,), norm=True),
  # [E, H, D] -> [H, D, E] -> [H*D, E]
  'layers/attention/q': Tensor('model.layers.{}.self_attn.q_proj.weight', (1, 2, 0), (2, 1)),
  'layers/attention/k': Tensor('model.layers.{}.self_attn.k_proj.weight', (1, 2, 0), (2, 1)),
  'layers/attention/v': Tensor('model.layers.{}.self_attn.v_proj.weight', (1, 2, 0), (2, 1)),
  # [H, D, E] -> [E, H, D] -> [E, H*D]
  'layers/attention/o': Tensor('model.layers.{}.self_attn.o_proj.weight', (2, 0, 1), (1, 2)),
  'layers/mlp/gate': Tensor('model.layers.{}.mlp.gate_proj.weight', (1, 0), (1, 1)),
  'layers/mlp/up': Tensor('model.layers.{}.mlp.up_proj.weight', (1, 0), (1, 1)),
  'layers/mlp/down': Tensor('model.layers.{}.mlp.down_proj.weight', (1, 0), (1, 1)),
  'layers/attention_norm/scale': Tensor(
    'model.layers.{}.input_layernorm.weight', (0,), (1,), norm=True
  ),
  'layers/mlp_norm/scale': Tensor(
    'model.layers.{}.post_attention_layernorm.weight', (0,), (1,), norm=True
  ),
}
LAYER_PREFIX = 'layers/'
IGNORED_HF = re.compile(r'.*\.rotary_emb\.inv_freq$')  # a recomputed buffer in old exports


def hf_shape(spec: Tensor, shape) -> tuple[int, ...]:
  permuted = [shape[p] for p in spec.perm]
  bounds = np.cumsum((0,) + spec.groups)
  return tuple(math.prod(permuted[a:b]) for a, b in zip(bounds[:-1], bounds[1:]))


def hf_index(spec: Tensor, box, shape):
  """The HF positions of a box (slices over the un-stacked parameter), one per HF axis: a
  slice when contiguous (the usual case), else an index array."""
  permuted = [(box[p], shape[p]) for p in spec.perm]
  index, axis = [], 0
  for size in spec.groups:
    flat = np.zeros(1, np.int64)
    for part, length in permuted[axis : axis + size]:
      flat = (flat[:, None] * length + np.arange(part.start, part.stop)[None, :]).ravel()
    axis += size
    contiguous = flat[-1] - flat[0] + 1 == flat.size
    index.append(slice(int(flat[0]), int(flat[-1]) + 1) if contiguous else flat)
  return tuple(index)


def numpy_index(index):
  """An HF position from hf_index as numpy indexes it: the slices as they are, or an open mesh
  (np.ix_) when any axis is an index array."""
  if all(isinstance(i, slice) for i in index):
    return index
  return np.ix_(*[np.arange(i.start, i.stop) if isinstance(i, slice) else i for i in index])


def hf_entries(cfg: model_config.ModelConfig, params) -> list[tuple[str, str]]:
  """(HF name, k2jax path) in HF's usual order: embeddings, layer by layer, norm, head."""
  if set(params) != set(TENSORS):
    raise NotImplementedError(
      f'k2jax parameters {sorted(set(params) ^ set(TENSORS))} are not '
      'both in the model and in k2jax.hf.schema.TENSORS: update the map'
    )
  layered = [path for path in TENSORS if path.startswith(LAYER_PREFIX)]
  return (
    [(TENSORS['embedding'].hf, 'embedding')]
    + [(TENSORS[path].hf.format(i), path) for i in range(cfg.num_layers) for path in layered]
    + [(TENSORS[path].hf, path) for path in ('final_norm/scale', 'output')]
  )


def param_shapes(cfg: model_config.ModelConfig):
  """({path: ShapeDtypeStruct}, boxed abstract tree) of the k2jax parameters, unallocated."""
  import flax.linen as nn
  import jax

  from k2jax.model.transformer import Transformer
  from k2jax.parallel import sharding
  from k2jax.training import train_step

  boxed = train_step.abstract_params(Transformer(cfg), seq_len=1)
  flat = jax.tree_util.tree_flatten_with_path(nn.unbox(boxed))[0]
  return {sharding.path_name(p): a for p, a in flat}, boxed


def layer_shape(path: str, shape) -> tuple[int, ...]:
  """One layer's shape of a stacked parameter (the shape itself otherwise)."""
  return tuple(shape[1:] if path.startswith(LAYER_PREFIX) else shape)


# --- HF config.json -----------------------------------------------------------------------


def hf_config(cfg: model_config.ModelConfig, seq_len: int, dtype: str, ids: dict) -> dict:
  rope = {'rope_type': 'default', 'rope_theta': float(cfg.rope_base)}
  config = {
    'architectures': ['LlamaForCausalLM'],
    'model_type': 'llama',
    'vocab_size': cfg.vocab_size,
    'hidden_size': cfg.hidden_size,
    'intermediate_size': cfg.ffn_size,
    'num_hidden_layers': cfg.num_layers,
    'num_attention_heads': cfg.num_heads,
    'num_key_value_heads': cfg.num_kv_heads,
    'head_dim': cfg.head_dim,
    'hidden_act': 'silu',
    'max_position_embeddings': seq_len,
    'rms_norm_eps': cfg.norm_eps,
    # transformers 4 reads rope_theta / rope_scaling, transformers 5 rope_parameters.
    'rope_theta': float(cfg.rope_base),
    'rope_scaling': None,
    'rope_parameters': rope,
    'attention_bias': False,
    'attention_dropout': 0.0,
    'mlp_bias': False,
    'pretraining_tp': 1,
    'tie_word_embeddings': False,
    'initializer_range': cfg.init_std,
    'use_cache': True,
    'torch_dtype': dtype,
  }
  return {**config, **ids}


def _field(hf: dict, key: str, where: str, default=None):
  if key not in hf or hf[key] is None:
    if default is None:
      raise ValueError(f'{where}: field {key!r} is missing')
    return default
  return hf[key]


def model_config_from_hf(hf: dict, where: str) -> tuple[model_config.ModelConfig, int]:
  """(ModelConfig, max_position_embeddings); ValueError naming the first field k2jax lacks."""

  def unsupported(key, value, need):
    raise ValueError(f'{where}: {key}={value!r} is not supported by k2jax (needs {need})')

  if hf.get('model_type') != 'llama':
    unsupported('model_type', hf.get('model_type'), "'llama'")
  if hf.get('architectures') not in (None, ['LlamaForCausalLM']):
    unsupported('architectures', hf['architectures'], "['LlamaForCausalLM']")
  checks = (
    ('hidden_act', 'silu'),
    ('attention_bias', False),
    ('mlp_bias', False),
    ('tie_word_embeddings', False),
    ('pretraining_tp', 1),
    ('rope_scaling', None),
    ('quantization_config', None),
  )
  for key, value in checks:
    if hf.get(key, value) != value:  # absent means Llama's default, which is k2jax's
      unsupported(key, hf[key], repr(value))
  rope = hf.get('rope_parameters') or {}
  if rope.get('rope_type', 'default') != 'default':
    unsupported('rope_parameters.rope_type', rope['rope_type'], "'default' (no scaling)")
  if rope.get('partial_rotary_factor', 1.0) != 1.0:
    unsupported('rope_parameters.partial_rotary_factor', rope['partial_rotary_factor'], '1.0')
  heads = _field(hf, 'num_attention_heads', where)
  hidden = _field(hf, 'hidden_size', where)
  if hf.get('head_dim') is None and hidden % heads:
    raise ValueError(
      f'{where}: no head_dim, and hidden_size={hidden} is not a multiple of '
      f'num_attention_heads={heads}'
    )
  fields = dict(
    vocab_size=_field(hf, 'vocab_size', where),
    hidden_size=hidden,
    ffn_size=_field(hf, 'intermediate_size', where),
    num_layers=_field(hf, 'num_hidden_layers', where),
    num_heads=heads,
    num_kv_heads=_field(hf, 'num_key_value_heads', where, heads),
    head_dim=_field(hf, 'head_dim', where, hidden // heads),
    rope_base=float(rope.get('rope_theta') or _field(hf, 'rope_theta', where, 1e4)),
    norm_eps=float(_field(hf, 'rms_norm_eps', where, 1e-6)),
  )
  try:
    cfg = model_config.ModelConfig(**fields)
  except ValueError as error:
    raise ValueError(f'{where}: {error}') from None
  return cfg, int(_field(hf, 'max_position_embeddings', where, 4096))


def preset_of(cfg: model_config.ModelConfig) -> str:
  """The name of the preset with `cfg`'s shape ('debug' when none has it)."""
  shape = {f: getattr(cfg, f) for f in model_config.SHAPE_FIELDS}
  return next((name for name, p in model_config.PRESETS.items() if p == shape), 'debug')


# --- the JSON files of an HF folder --------------------------------------------------------


def read_json(path: str):
  """A JSON file's value; FileNotFoundError or ValueError (`path: not valid JSON`) naming it."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} is missing')
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as error:
    raise ValueError(f'{path}: not valid JSON ({error})') from None


def write_json(path: str, value):
  """`value` as indented UTF-8 JSON with a final newline."""
  with open(path, 'w', encoding='utf-8') as f:
    f.write(json.dumps(value, indent=2, ensure_ascii=False) + '\n')
