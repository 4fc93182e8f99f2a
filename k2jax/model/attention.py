"""Grouped-query attention and its backends.

A backend is a function (q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL) -> out_BxLxHxD
computing causal attention in which a token sees only earlier tokens of its own segment
(document). `xla` is the reference every faster backend (cuDNN, Pallas flash) is tested
against; they register themselves in BACKENDS.

Decoding with a KV cache (see model.init_cache) does not go through a backend: the new
tokens' K/V are written into the cache at `cache['index']` and the queries attend to the
whole cache with `cached_attention_mask`, so the cached path is the same einsum as `xla`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from k2jax.model.config import ModelConfig
from k2jax.model.layers import apply_rope, constrain, weight


def attention_mask(segment_ids_BxL):
  """Causal and same-segment mask, [B, 1, 1, L_query, L_key]."""
  length = segment_ids_BxL.shape[1]
  causal_LxL = jnp.tril(jnp.ones((length, length), dtype=jnp.bool_))
  same_segment_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  return (causal_LxL & same_segment_BxLxL)[:, None, None, :, :]


def cached_attention_mask(index, segment_ids_BxT, cache_segment_ids_BxS):
  """Mask of T new tokens, written at cache slots index..index+T-1, over all S cache slots.

  A query sees the slots up to its own that hold its segment; padding and empty slots have
  segment 0, which real tokens (segment >= 1) never match. Positions are explicit per row,
  so left- and right-padded prompts work alike. [B, 1, 1, T, S].
  """
  length, slots = segment_ids_BxT.shape[1], cache_segment_ids_BxS.shape[1]
  causal_TxS = index + jnp.arange(length)[:, None] >= jnp.arange(slots)[None, :]
  same_BxTxS = segment_ids_BxT[:, :, None] == cache_segment_ids_BxS[:, None, :]
  return (causal_TxS & same_BxTxS)[:, None, None, :, :]


def masked_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask):
  """Einsum attention of T queries over S keys under a [B, 1, 1, T, S] mask, softmax in fp32."""
  batch, length, num_heads, head_dim = q_BxTxHxD.shape
  num_kv = k_BxSxKxD.shape[2]
  group = num_heads // num_kv
  # Query heads h = kv * group + g share KV head kv (the HF / Megatron GQA layout).
  q_BxTxKxGxD = q_BxTxHxD.reshape(batch, length, num_kv, group, head_dim)
  scores_BxKxGxTxS = jnp.einsum(
    'blkgd,bmkd->bkglm', q_BxTxKxGxD, k_BxSxKxD, preferred_element_type=jnp.float32
  )
  scores_BxKxGxTxS = scores_BxKxGxTxS * (head_dim**-0.5)
  # Every token sees at least itself, so no row is fully masked and softmax stays finite.
  scores_BxKxGxTxS = jnp.where(mask, scores_BxKxGxTxS, jnp.finfo(jnp.float32).min)
  probs_BxKxGxTxS = jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(v_BxSxKxD.dtype)
  out_BxTxKxGxD = jnp.einsum('bkglm,bmkd->blkgd', probs_BxKxGxTxS, v_BxSxKxD)
  return out_BxTxKxGxD.reshape(batch, length, num_heads, head_dim)


def xla_attention(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL):
  """Plain einsum attention, softmax in fp32. O(L^2) memory: the reference, not the fast path."""
  return masked_attention(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, attention_mask(segment_ids_BxL))


BACKENDS = {
  'xla': xla_attention,
}


def get_backend(name: str):
  if name not in BACKENDS:
    raise ValueError(
      f'model.attention={name!r} is not an available backend; available: {"|".join(BACKENDS)}'
    )
  return BACKENDS[name]


# Cache arrays [layers, batch, cache length, kv heads, head dim] (see model.init_cache).
CACHE_AXES = (
  'layers',
  'activation_batch',
  'activation_length',
  'activation_kv_heads',
  'activation_head_dim',
)


class Attention(nn.Module):
  """Self-attention with rotary positions, GQA and no biases.

  Without `cache`: attention within [B, L] through the configured backend; returns the
  output. With `cache` (the whole stack's, see model.init_cache) and `layer` (this layer's
  index into it): writes this chunk's K/V at `cache['index']`, attends over the cache, and
  returns (output, updated cache).
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxE, positions_BxL, segment_ids_BxL, cache=None, layer=None):
    cfg = self.cfg
    dtype, compute = cfg.weight_dtype, cfg.compute_dtype
    E, H, K, D = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q_ExHxD = weight(self, 'q', (E, H, D), ('embed', 'heads', 'head_dim'), cfg.init_std, dtype)
    k_ExKxD = weight(self, 'k', (E, K, D), ('embed', 'kv_heads', 'head_dim'), cfg.init_std, dtype)
    v_ExKxD = weight(self, 'v', (E, K, D), ('embed', 'kv_heads', 'head_dim'), cfg.init_std, dtype)
    o_HxDxE = weight(
      self, 'o', (H, D, E), ('heads', 'head_dim', 'embed'), cfg.output_init_std, dtype
    )

    x = x_BxLxE.astype(compute)
    heads = ('activation_batch', 'activation_length', 'activation_heads', 'activation_head_dim')
    kv_heads = (
      'activation_batch',
      'activation_length',
      'activation_kv_heads',
      'activation_head_dim',
    )
    q_BxLxHxD = constrain(jnp.einsum('ble,ehd->blhd', x, q_ExHxD.astype(compute)), heads)
    k_BxLxKxD = constrain(jnp.einsum('ble,ekd->blkd', x, k_ExKxD.astype(compute)), kv_heads)
    v_BxLxKxD = constrain(jnp.einsum('ble,ekd->blkd', x, v_ExKxD.astype(compute)), kv_heads)
    q_BxLxHxD = apply_rope(q_BxLxHxD, positions_BxL, cfg.rope_base)
    k_BxLxKxD = apply_rope(k_BxLxKxD, positions_BxL, cfg.rope_base)

    def project(out_BxLxHxD):
      out_BxLxHxD = constrain(out_BxLxHxD, heads)
      return jnp.einsum('blhd,hde->ble', out_BxLxHxD, o_HxDxE.astype(compute))

    if cache is None:
      return project(get_backend(cfg.attention)(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL))
    # In place in the scan's carry: only this chunk's slots of this layer are written.
    start = (layer, 0, cache['index'], 0, 0)
    cache = dict(cache)
    for name, new_BxLxKxD in (('k', k_BxLxKxD), ('v', v_BxLxKxD)):
      cache[name] = constrain(
        jax.lax.dynamic_update_slice(
          cache[name], new_BxLxKxD[None].astype(cache[name].dtype), start
        ),
        CACHE_AXES,
      )
    k_BxSxKxD, v_BxSxKxD = (
      jax.lax.dynamic_index_in_dim(cache[name], layer, 0, keepdims=False) for name in ('k', 'v')
    )
    mask = cached_attention_mask(cache['index'], segment_ids_BxL, cache['segment_ids'])
    out_BxLxHxD = masked_attention(
      q_BxLxHxD, k_BxSxKxD.astype(compute), v_BxSxKxD.astype(compute), mask
    )
    return project(out_BxLxHxD), cache
