"""The attention contract, and its dense reference implementation (`xla`).

Every backend computes

  attention(q[B,T,H,D], k[B,S,K,D], v[B,S,K,D],
            q_positions[B,T], kv_positions[B,S], q_segment_ids[B,T], kv_segment_ids[B,S])
    -> out[B,T,H,D]

where query t sees key s iff kv_positions[s] <= q_positions[t] and the segment ids are equal;
the softmax runs in fp32 with scale D**-0.5. Queries and keys may differ in length and offset
(a context-parallel shard's local queries against the gathered keys). GQA is native: query
head h reads KV head h // (H // K) (the HF / Megatron layout) and K/V are never repeated per
query head. A query that sees no key gets zeros.
"""

import jax
import jax.numpy as jnp


def visible(q_positions_BxT, kv_positions_BxS, q_segment_ids_BxT, kv_segment_ids_BxS):
  """Which keys each query sees: [B, T, S] bool."""
  causal_BxTxS = kv_positions_BxS[:, None, :] <= q_positions_BxT[:, :, None]
  same_BxTxS = q_segment_ids_BxT[:, :, None] == kv_segment_ids_BxS[:, None, :]
  return causal_BxTxS & same_BxTxS


def masked_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask):
  """Einsum attention of T queries over S keys under a [B, T, S] mask, softmax in fp32."""
  batch, length, num_heads, head_dim = q_BxTxHxD.shape
  num_kv = k_BxSxKxD.shape[2]
  group = num_heads // num_kv
  q_BxTxKxGxD = q_BxTxHxD.reshape(batch, length, num_kv, group, head_dim)
  scores_BxKxGxTxS = jnp.einsum(
    'btkgd,bskd->bkgts', q_BxTxKxGxD, k_BxSxKxD, preferred_element_type=jnp.float32
  )
  scores_BxKxGxTxS = scores_BxKxGxTxS * (head_dim**-0.5)
  mask_Bx1x1xTxS = mask[:, None, None]
  scores_BxKxGxTxS = jnp.where(mask_Bx1x1xTxS, scores_BxKxGxTxS, jnp.finfo(jnp.float32).min)
  probs_BxKxGxTxS = jax.nn.softmax(scores_BxKxGxTxS, axis=-1)
  # A row with no visible key would otherwise average every key uniformly.
  probs_BxKxGxTxS = jnp.where(mask_Bx1x1xTxS, probs_BxKxGxTxS, 0.0).astype(v_BxSxKxD.dtype)
  out_BxTxKxGxD = jnp.einsum('bkgts,bskd->btkgd', probs_BxKxGxTxS, v_BxSxKxD)
  return out_BxTxKxGxD.reshape(batch, length, num_heads, head_dim)


def dense_attention(
  q_BxTxHxD,
  k_BxSxKxD,
  v_BxSxKxD,
  q_positions_BxT,
  kv_positions_BxS,
  q_segment_ids_BxT,
  kv_segment_ids_BxS,
):
  """The `xla` backend: materialises [B, H, T, S] fp32 scores. The reference, not a fast path."""
  mask_BxTxS = visible(q_positions_BxT, kv_positions_BxS, q_segment_ids_BxT, kv_segment_ids_BxS)
  return masked_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask_BxTxS)
