"""The model's shape as a frozen dataclass, its presets, and parameter / FLOP counts.

Every K2-V2 stage uses the same architecture (docs/recipe.md): only the RoPE base and the
sequence length change between stages, and those come from the stage config.
"""

import dataclasses
import math

import jax.numpy as jnp

K2V2_VOCAB = 250112  # K2-V2's released vocabulary (Megatron pads it during training)


# The fields that decide parameter shapes: a checkpoint saved with other values cannot load.
SHAPE_FIELDS = (
  'vocab_size',
  'hidden_size',
  'ffn_size',
  'num_layers',
  'num_heads',
  'num_kv_heads',
  'head_dim',
)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  hidden_size: int  # the residual stream width ("embed")
  ffn_size: int  # SwiGLU inner width ("mlp")
  num_layers: int
  num_heads: int
  num_kv_heads: (
    int  # grouped-query attention: each KV head serves num_heads // num_kv_heads queries
  )
  head_dim: int
  rope_base: float = 5e5
  norm_eps: float = 1e-5
  norm_one_plus: bool = True  # Megatron's "layernorm-1p": weight stored as w, applied as (1 + w)
  init_std: float = 0.01
  dtype: str = 'bfloat16'  # compute dtype
  param_dtype: str = 'float32'  # master weights
  remat: str = 'full'  # one of REMAT_POLICIES (below): what a block keeps for its backward
  loss_chunk: int | None = 4096  # positions of each row per cross-entropy chunk (0/None: whole)
  attention: str = 'auto'  # auto | xla | blockwise | pallas | cudnn (model/kernels/select.py)
  attention_block_q: int | None = None  # query block of blockwise / pallas (None: its default)
  attention_block_kv: int | None = None  # key/value block of blockwise / pallas
  documents: bool = True  # rows may pack documents (segment ids vary); set from data.packing

  def __post_init__(self):
    for name in SHAPE_FIELDS:
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f'model.{name} must be a positive integer, got {value!r}')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f'model.num_heads={self.num_heads} is not a multiple of '
        f'model.num_kv_heads={self.num_kv_heads}'
      )
    if self.head_dim % 2:
      raise ValueError(f'model.head_dim={self.head_dim} must be even for rotary embeddings')
    if self.attention not in ATTENTION_CHOICES:
      raise ValueError(
        f'model.attention={self.attention!r} is not one of {"|".join(ATTENTION_CHOICES)}'
      )
    for name in ('attention_block_q', 'attention_block_kv'):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or value < 8 or value & (value - 1)):
        raise ValueError(f'model.{name} must be a power of two >= 8, got {value!r}')
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f'model.remat={self.remat!r} is not one of {"|".join(REMAT_POLICIES)}')
    chunk = self.loss_chunk
    if chunk is not None and (not isinstance(chunk, int) or chunk < 0):
      raise ValueError(f'model.loss_chunk must be an integer >= 0 (0: whole), got {chunk!r}')
    for name in ('dtype', 'param_dtype'):
      if getattr(self, name) not in ('float32', 'bfloat16', 'float16'):
        raise ValueError(
          f'model.{name}={getattr(self, name)!r} is not one of float32|bfloat16|float16'
        )

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)

  @property
  def output_init_std(self) -> float:
    """K2-V2 scales the residual-branch output projections by 1/sqrt(2 * layers)."""
    return self.init_std / math.sqrt(2 * self.num_layers)

  def layer_param_count(self) -> int:
    attention = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
    mlp = 3 * self.hidden_size * self.ffn_size
    norms = 2 * self.hidden_size
    return attention + mlp + norms

  def param_count(self, include_embeddings: bool = True) -> int:
    """Exact count of the model's parameters (untied input embedding and output head)."""
    body = self.num_layers * self.layer_param_count() + self.hidden_size  # + final norm
    if not include_embeddings:
      return body
    return body + 2 * self.vocab_size * self.hidden_size

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), as docs/recipe.md counts them.

    6 x (non-embedding parameters + output head) for the matmuls, plus causal attention:
    QK^T and AV each cost 2 * (seq_len / 2) * heads * head_dim per token and layer forward,
    times 3 for forward + backward.
    """
    matmul_params = self.param_count(include_embeddings=False) + self.vocab_size * self.hidden_size
    attention = 6 * self.num_layers * seq_len * self.num_heads * self.head_dim
    return 6 * matmul_params + attention


# What a block keeps for its backward pass (model/transformer.py REMAT_POLICY): 'none' keeps
# everything, 'full' only its input; the others keep named activations too, 'offload_*' in
# host memory.
REMAT_POLICIES = (
  'none',
  'full',
  'save_dots',
  'save_qkv_attn',
  'save_attn',
  'offload_block_input',
)
ATTENTION_CHOICES = ('auto', 'xla', 'blockwise', 'pallas', 'cudnn')  # kernels/select.py

PRESETS = {
  # Trains on a CPU in seconds; every dim divisible by 8 so all test meshes apply.
  'debug': dict(
    vocab_size=2048,
    hidden_size=256,
    ffn_size=768,
    num_layers=4,
    num_heads=8,
    num_kv_heads=4,
    head_dim=32,
  ),
  # ~0.9B non-embedding parameters, K2-V2's proportions (FFN 3.5x, head dim 128, 8 KV heads).
  '1b': dict(
    vocab_size=K2V2_VOCAB,
    hidden_size=2048,
    ffn_size=7168,
    num_layers=16,
    num_heads=16,
    num_kv_heads=8,
    head_dim=128,
  ),
  # ~7B non-embedding parameters.
  '7b': dict(
    vocab_size=K2V2_VOCAB,
    hidden_size=4096,
    ffn_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
  ),
  # K2-V2 70B (docs/recipe.md, "Model").
  'k2v2_70b': dict(
    vocab_size=K2V2_VOCAB,
    hidden_size=8192,
    ffn_size=28672,
    num_layers=80,
    num_heads=64,
    num_kv_heads=8,
    head_dim=128,
  ),
}


def from_config(model_cfg) -> ModelConfig:
  """Builds a ModelConfig from the `model` section of a run config.

  `model.preset` names the shape; any other field of the section set to a value other than
  None overrides the preset's (e.g. `--config.model.num_layers=2`).
  """
  preset = model_cfg.preset
  if preset not in PRESETS:
    raise ValueError(f'model.preset={preset!r} is not one of {"|".join(PRESETS)}')
  fields = dict(PRESETS[preset])
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  for key, value in model_cfg.items():
    if key == 'preset' or value is None:
      continue
    if key not in known:
      raise ValueError(f'model.{key} is not a model field; known: {", ".join(sorted(known))}')
    fields[key] = value
  return ModelConfig(**fields)
