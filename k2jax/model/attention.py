"""Grouped-query self-attention: projections, rotary positions, and the configured backend.

The backends (dense reference, blockwise, Pallas flash, cuDNN) live in k2jax/model/kernels and
share one contract (kernels/reference.py): a query sees the keys at or before its position
within its own segment (document).

Decoding with a KV cache (see model.init_cache) does not go through a backend: the new
tokens' K/V are written into the cache at `cache['index']` and the queries attend to the
whole cache with `cached_attention_mask`, so the cached path is the same einsum as `xla`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from k2jax.model.config import ModelConfig
from k2jax.model.kernels import select as kernel_select
from k2jax.model.kernels.reference import masked_attention
from k2jax.model.layers import apply_rope, constrain, dense, weight


def cached_attention_mask(index, segment_ids_BxT, cache_segment_ids_BxS):
  """Mask of T new tokens, written at cache slots index..index+T-1, over all S cache slots.

  A query sees the slots up to its own that hold its segment; padding and empty slots have
  segment 0, which real tokens (segment >= 1) never match. Positions are explicit per row,
  so left- and right-padded prompts work alike. [B, T, S].
  """
  length, slots = segment_ids_BxT.shape[1], cache_segment_ids_BxS.shape[1]
  causal_TxS = index + jnp.arange(length)[:, None] >= jnp.arange(slots)[None, :]
  same_BxTxS = segment_ids_BxT[:, :, None] == cache_segment_ids_BxS[:, None, :]
  return causal_TxS & same_BxTxS


def get_backend(cfg: ModelConfig, length: int):
  """The attention function for `cfg.attention` (resolving `auto` for this platform)."""
  return kernel_select.for_model(cfg, length)


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
    std = cfg.init_std
    q_ExHxD = weight(self, 'q', (E, H, D), ('embed', 'heads', 'head_dim'), std, dtype, compute)
    k_ExKxD = weight(self, 'k', (E, K, D), ('embed', 'kv_heads', 'head_dim'), std, dtype, compute)
    v_ExKxD = weight(self, 'v', (E, K, D), ('embed', 'kv_heads', 'head_dim'), std, dtype, compute)
    o_HxDxE = weight(
      self, 'o', (H, D, E), ('heads', 'head_dim', 'embed'), cfg.output_init_std, dtype, compute
    )

    x = x_BxLxE.astype(compute)
    heads = ('activation_batch', 'activation_length', 'activation_heads', 'activation_head_dim')
    kv_heads = (
      'activation_batch',
      'activation_length',
      'activation_kv_heads',
      'activation_head_dim',
    )
    q_BxLxHxD, k_BxLxKxD, v_BxLxKxD = dense(x, q_ExHxD, k_ExKxD, v_ExKxD)
    q_BxLxHxD = constrain(q_BxLxHxD, heads)
    k_BxLxKxD = constrain(k_BxLxKxD, kv_heads)
    v_BxLxKxD = constrain(v_BxLxKxD, kv_heads)
    # Named for the remat policies (transformer.REMAT_POLICY): q and k after rotary, as the
    # attention core takes them.
    q_BxLxHxD = checkpoint_name(apply_rope(q_BxLxHxD, positions_BxL, cfg.rope_base), 'query_proj')
    k_BxLxKxD = checkpoint_name(apply_rope(k_BxLxKxD, positions_BxL, cfg.rope_base), 'key_proj')
    v_BxLxKxD = checkpoint_name(v_BxLxKxD, 'value_proj')

    def project(out_BxLxHxD):
      out_BxLxHxD = constrain(out_BxLxHxD, heads)
      [out_BxLxE] = dense(out_BxLxHxD, o_HxDxE)
      return out_BxLxE

    if cache is None:
      attend = get_backend(cfg, x_BxLxE.shape[1])
      out_BxLxHxD = attend(
        q_BxLxHxD,
        k_BxLxKxD,
        v_BxLxKxD,
        positions_BxL,
        positions_BxL,
        segment_ids_BxL,
        segment_ids_BxL,
      )
      return project(out_BxLxHxD)  # the backends name their output 'attention_out'
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
