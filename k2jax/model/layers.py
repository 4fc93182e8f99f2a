"""The building blocks of a K2-V2 block: RMSNorm (1+w), rotary embeddings, SwiGLU MLP.

Parameters carry logical axis names (`embed`, `mlp`, `vocab`, ...); `k2jax/parallel/sharding.py`
maps them onto the mesh. Shape suffixes name dims: B batch, L length, E embed, F mlp,
H heads, K kv heads, D head dim, V vocab.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from k2jax.model.config import ModelConfig
from k2jax.parallel import sharding


def weight(module: nn.Module, name: str, shape, axes, std: float, dtype, compute=None):
  """A normal(0, std) weight with logical axis names; with `compute`, as a matmul reads it."""
  init = nn.with_logical_partitioning(nn.initializers.normal(stddev=std), axes)
  param = module.param(name, init, shape, dtype)
  return param if compute is None else for_compute(param, axes, compute)


def for_compute(w, axes, dtype):
  """A weight as its matmul reads it: in the compute dtype and whole along `embed`.

  Under FSDP the weights are sharded along `embed`; constraining the cast copy to be whole
  there all-gathers it (in the compute dtype, half the bytes of the fp32 master) right before
  use, as FSDP intends. Left to itself, XLA may instead reshard the activations to meet the
  weight, which at long context gathers whole rows onto every device.
  """
  return constrain(w.astype(dtype), tuple(None if a == 'embed' else a for a in axes))


def constrain(x, axes):
  """Names an activation's axes; a no-op outside a mesh context (see sharding.activate)."""
  return nn.with_logical_constraint(x, axes)


def dense(x, *weights):
  """[B, L, *I] x each of `weights` [*I, *O] -> a [B, L, *O] product per weight.

  Where no mesh axis splits the length, each is one 2-D matmul [B*L, prod I] x [prod I, prod O]: its
  weight gradient is then a plain 2-D product too, which XLA:CPU otherwise runs after copying
  the activation gradient transposed (a contraction over both B and L). The weights share
  one flattened x, which the backward pass keeps once.
  """
  contract = x.ndim - 2
  if sharding.splits_length():  # keep [B, L] for the partitioner
    return [jnp.tensordot(x, w, contract) for w in weights]
  x_NxI = x.reshape(x.shape[0] * x.shape[1], -1)
  return [
    (x_NxI @ w.reshape(x_NxI.shape[1], -1)).reshape(*x.shape[:2], *w.shape[contract:])
    for w in weights
  ]


@jax.checkpoint
def swiglu(gate_BxLxF, up_BxLxF):
  """silu(gate) * up. Its backward pass recomputes silu from the saved gate and up instead of
  keeping the sigmoid and the products: 2 saved [B, L, F] activations instead of 5."""
  return nn.silu(gate_BxLxF) * up_BxLxF


class RMSNorm(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxE):
    cfg = self.cfg
    # (1+w) form starts at w = 0 so the initial scale is exactly one.
    init = nn.initializers.zeros if cfg.norm_one_plus else nn.initializers.ones
    scale_E = self.param(
      'scale', nn.with_logical_partitioning(init, ('norm',)), (x_BxLxE.shape[-1],), cfg.weight_dtype
    )
    offset = 1.0 if cfg.norm_one_plus else 0.0
    return rms_norm(x_BxLxE, scale_E, cfg.norm_eps, offset, cfg.compute_dtype)


@functools.partial(jax.checkpoint, static_argnums=(2, 3, 4))
def rms_norm(x_BxLxE, scale_E, eps: float, offset: float, dtype):
  """x / rms(x) * (offset + scale), in fp32. Its backward pass recomputes the statistics from
  the saved x instead of keeping fp32 intermediates (2x, the normalised x) of [B, L, E] each."""
  x = x_BxLxE.astype(jnp.float32)
  x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
  return (x * (scale_E.astype(jnp.float32) + offset)).astype(dtype)


def apply_rope(x_BxLxNxD, positions_BxL, base: float):
  """Rotary embeddings in the rotate-half (HF, non-interleaved) layout over the full head dim."""
  head_dim = x_BxLxNxD.shape[-1]
  inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles_BxLxD2 = positions_BxL.astype(jnp.float32)[..., None] * inv_freq
  cos = jnp.cos(angles_BxLxD2)[:, :, None, :]
  sin = jnp.sin(angles_BxLxD2)[:, :, None, :]
  x = x_BxLxNxD.astype(jnp.float32)
  first, second = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  return rotated.astype(x_BxLxNxD.dtype)


class MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxE):
    cfg = self.cfg
    shape, dtype, compute = (cfg.hidden_size, cfg.ffn_size), cfg.weight_dtype, cfg.compute_dtype
    gate_ExF = weight(self, 'gate', shape, ('embed', 'mlp'), cfg.init_std, dtype, compute)
    up_ExF = weight(self, 'up', shape, ('embed', 'mlp'), cfg.init_std, dtype, compute)
    down_FxE = weight(
      self, 'down', shape[::-1], ('mlp', 'embed'), cfg.output_init_std, dtype, compute
    )
    gate_BxLxF, up_BxLxF = dense(x_BxLxE.astype(compute), gate_ExF, up_ExF)
    hidden_BxLxF = constrain(
      swiglu(gate_BxLxF, up_BxLxF), ('activation_batch', 'activation_length', 'activation_mlp')
    )
    [out_BxLxE] = dense(hidden_BxLxF, down_FxE)
    return out_BxLxE
