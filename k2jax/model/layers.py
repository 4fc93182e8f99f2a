"""The building blocks of a K2-V2 block: RMSNorm (1+w), rotary embeddings, SwiGLU MLP.

Parameters carry logical axis names (`embed`, `mlp`, `vocab`, ...); `k2jax/parallel/sharding.py`
maps them onto the mesh. Shape suffixes name dims: B batch, L length, E embed, F mlp,
H heads, K kv heads, D head dim, V vocab.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from k2jax.model.config import ModelConfig


def weight(module: nn.Module, name: str, shape, axes, std: float, dtype):
  """A normal(0, std) weight with logical axis names."""
  init = nn.with_logical_partitioning(nn.initializers.normal(stddev=std), axes)
  return module.param(name, init, shape, dtype)


def constrain(x, axes):
  """Names an activation's axes; a no-op outside a mesh context (see sharding.activate)."""
  return nn.with_logical_constraint(x, axes)


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
    x = x_BxLxE.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + cfg.norm_eps)
    scale = scale_E.astype(jnp.float32) + (1.0 if cfg.norm_one_plus else 0.0)
    return (x * scale).astype(cfg.compute_dtype)


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
    shape, dtype = (cfg.hidden_size, cfg.ffn_size), cfg.weight_dtype
    gate_ExF = weight(self, 'gate', shape, ('embed', 'mlp'), cfg.init_std, dtype)
    up_ExF = weight(self, 'up', shape, ('embed', 'mlp'), cfg.init_std, dtype)
    down_FxE = weight(self, 'down', shape[::-1], ('mlp', 'embed'), cfg.output_init_std, dtype)
    x = x_BxLxE.astype(cfg.compute_dtype)
    gate_BxLxF = jnp.einsum('ble,ef->blf', x, gate_ExF.astype(cfg.compute_dtype))
    up_BxLxF = jnp.einsum('ble,ef->blf', x, up_ExF.astype(cfg.compute_dtype))
    hidden_BxLxF = constrain(
      nn.silu(gate_BxLxF) * up_BxLxF, ('activation_batch', 'activation_length', 'activation_mlp')
    )
    return jnp.einsum('blf,fe->ble', hidden_BxLxF, down_FxE.astype(cfg.compute_dtype))
