"""Grouped-query attention and its backends.

A backend is a function (q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL) -> out_BxLxHxD
computing causal attention in which a token sees only earlier tokens of its own segment
(document). `xla` is the reference every faster backend (cuDNN, Pallas flash) is tested
against; they register themselves in BACKENDS.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from k2jax.layers import apply_rope, constrain, weight
from k2jax.model_config import ModelConfig


def attention_mask(segment_ids_BxL):
  """Causal and same-segment mask, [B, 1, 1, L_query, L_key]."""
  length = segment_ids_BxL.shape[1]
  causal_LxL = jnp.tril(jnp.ones((length, length), dtype=jnp.bool_))
  same_segment_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  return (causal_LxL & same_segment_BxLxL)[:, None, None, :, :]


def xla_attention(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL):
  """Plain einsum attention, softmax in fp32. O(L^2) memory: the reference, not the fast path."""
  batch, length, num_heads, head_dim = q_BxLxHxD.shape
  num_kv = k_BxLxKxD.shape[2]
  group = num_heads // num_kv
  # Query heads h = kv * group + g share KV head kv (the HF / Megatron GQA layout).
  q_BxLxKxGxD = q_BxLxHxD.reshape(batch, length, num_kv, group, head_dim)
  scores_BxKxGxLxL = jnp.einsum('blkgd,bmkd->bkglm', q_BxLxKxGxD, k_BxLxKxD,
                                preferred_element_type=jnp.float32)
  scores_BxKxGxLxL = scores_BxKxGxLxL * (head_dim ** -0.5)
  mask = attention_mask(segment_ids_BxL)
  # Every token sees at least itself, so no row is fully masked and softmax stays finite.
  scores_BxKxGxLxL = jnp.where(mask, scores_BxKxGxLxL, jnp.finfo(jnp.float32).min)
  probs_BxKxGxLxL = jax.nn.softmax(scores_BxKxGxLxL, axis=-1).astype(v_BxLxKxD.dtype)
  out_BxLxKxGxD = jnp.einsum('bkglm,bmkd->blkgd', probs_BxKxGxLxL, v_BxLxKxD)
  return out_BxLxKxGxD.reshape(batch, length, num_heads, head_dim)


BACKENDS = {
    'xla': xla_attention,
}


def get_backend(name: str):
  if name not in BACKENDS:
    raise ValueError(f'model.attention={name!r} is not an available backend; '
                     f'available: {"|".join(BACKENDS)}')
  return BACKENDS[name]


class Attention(nn.Module):
  """Self-attention with rotary positions, GQA and no biases."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxE, positions_BxL, segment_ids_BxL):
    cfg = self.cfg
    dtype, compute = cfg.weight_dtype, cfg.compute_dtype
    E, H, K, D = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q_ExHxD = weight(self, 'q', (E, H, D), ('embed', 'heads', 'head_dim'), cfg.init_std, dtype)
    k_ExKxD = weight(self, 'k', (E, K, D), ('embed', 'kv_heads', 'head_dim'), cfg.init_std, dtype)
    v_ExKxD = weight(self, 'v', (E, K, D), ('embed', 'kv_heads', 'head_dim'), cfg.init_std, dtype)
    o_HxDxE = weight(self, 'o', (H, D, E), ('heads', 'head_dim', 'embed'), cfg.output_init_std,
                     dtype)

    x = x_BxLxE.astype(compute)
    heads = ('activation_batch', 'activation_length', 'activation_heads', 'activation_head_dim')
    kv_heads = ('activation_batch', 'activation_length', 'activation_kv_heads',
                'activation_head_dim')
    q_BxLxHxD = constrain(jnp.einsum('ble,ehd->blhd', x, q_ExHxD.astype(compute)), heads)
    k_BxLxKxD = constrain(jnp.einsum('ble,ekd->blkd', x, k_ExKxD.astype(compute)), kv_heads)
    v_BxLxKxD = constrain(jnp.einsum('ble,ekd->blkd', x, v_ExKxD.astype(compute)), kv_heads)
    q_BxLxHxD = apply_rope(q_BxLxHxD, positions_BxL, cfg.rope_base)
    k_BxLxKxD = apply_rope(k_BxLxKxD, positions_BxL, cfg.rope_base)

    out_BxLxHxD = get_backend(cfg.attention)(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL)
    out_BxLxHxD = constrain(out_BxLxHxD, heads)
    return jnp.einsum('blhd,hde->ble', out_BxLxHxD, o_HxDxE.astype(compute))
