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
from jax.ad_checkpoint import checkpoint_name


def visible(q_positions_BxT, kv_positions_BxS, q_segment_ids_BxT, kv_segment_ids_BxS):
  """Which keys each query sees: [B, T, S] bool."""
  causal_BxTxS = kv_positions_BxS[:, None, :] <= q_positions_BxT[:, :, None]
  same_BxTxS = q_segment_ids_BxT[:, :, None] == kv_segment_ids_BxS[:, None, :]
  return causal_BxTxS & same_BxTxS


def masked_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask):
  """Einsum attention of T queries over S keys under a [B, T, S] mask, softmax in fp32."""
  batch, length, num_heads, head_dim = q_BxTxHxD.shape
  slots, num_kv = k_BxSxKxD.shape[1:3]
  group = num_heads // num_kv
  # Per KV head, the T queries of its G query heads are the M = T*G rows of one score matrix
  # (t major, so a split of the length stays a split of the rows): every product is then a
  # [B, K]-batched 2-D matmul and the softmax a row-wise pass over contiguous [M, S].
  q_BxKxMxD = q_BxTxHxD.reshape(batch, length, num_kv, group, head_dim).transpose(0, 2, 1, 3, 4)
  q_BxKxMxD = q_BxKxMxD.reshape(batch, num_kv, length * group, head_dim)
  mask_BxTxGxS = jnp.broadcast_to(mask[:, :, None], (batch, length, group, slots))
  out_BxKxMxD = _attend(
    q_BxKxMxD,
    k_BxSxKxD.transpose(0, 2, 1, 3),
    v_BxSxKxD.transpose(0, 2, 1, 3),
    mask_BxTxGxS.reshape(batch, 1, length * group, slots),
  )
  out_BxTxKxGxD = out_BxKxMxD.reshape(batch, num_kv, length, group, head_dim).transpose(
    0, 2, 1, 3, 4
  )
  return out_BxTxKxGxD.reshape(batch, length, num_heads, head_dim)


_MASKED = float(jnp.finfo(jnp.float32).min)


@jax.custom_vjp
def _attend(q_BxKxMxD, k_BxKxSxD, v_BxKxSxD, mask_Bx1xMxS):
  return _attend_fwd(q_BxKxMxD, k_BxKxSxD, v_BxKxSxD, mask_Bx1xMxS)[0]


def _attend_fwd(q_BxKxMxD, k_BxKxSxD, v_BxKxSxD, mask_Bx1xMxS):
  scale = q_BxKxMxD.shape[-1] ** -0.5
  scores_BxKxMxS = jnp.einsum(
    'bkmd,bksd->bkms', q_BxKxMxD, k_BxKxSxD, preferred_element_type=jnp.float32
  )
  scores_BxKxMxS = jnp.where(mask_Bx1xMxS, scores_BxKxMxS * scale, _MASKED)
  max_BxKxMx1 = jnp.max(scores_BxKxMxS, axis=-1, keepdims=True)
  probs_BxKxMxS = jnp.exp(scores_BxKxMxS - max_BxKxMx1)
  # A row with no visible key has max == _MASKED: it gets zeros, not a uniform average.
  norm_BxKxMx1 = jnp.where(
    max_BxKxMx1 > _MASKED, 1.0 / jnp.sum(probs_BxKxMxS, axis=-1, keepdims=True), 0.0
  )
  probs_BxKxMxS = probs_BxKxMxS * norm_BxKxMx1
  out_BxKxMxD = jnp.einsum('bkms,bksd->bkmd', probs_BxKxMxS.astype(v_BxKxSxD.dtype), v_BxKxSxD)
  # Named like the flash backends' output; the probabilities stay unnamed (they are [M, S]).
  out_BxKxMxD = checkpoint_name(out_BxKxMxD, 'attention_out')
  return out_BxKxMxD, (q_BxKxMxD, k_BxKxSxD, v_BxKxSxD, probs_BxKxMxS, out_BxKxMxD)


def _attend_bwd(residuals, dout_BxKxMxD):
  """The softmax-attention gradient, written out: autodiff's version transposes the [M, S]
  probabilities and their gradient for the K/V gradients, which XLA:CPU runs as copies
  followed by slow matmuls. Here each [M, S] operand is used as stored."""
  q_BxKxMxD, k_BxKxSxD, v_BxKxSxD, probs_BxKxMxS, out_BxKxMxD = residuals
  scale = q_BxKxMxD.shape[-1] ** -0.5
  dprobs_BxKxMxS = jnp.einsum(
    'bkmd,bksd->bkms', dout_BxKxMxD, v_BxKxSxD, preferred_element_type=jnp.float32
  )
  # sum_s probs * dprobs, as the cheaper sum_d out * dout.
  rowdot_BxKxMx1 = jnp.sum(
    dout_BxKxMxD.astype(jnp.float32) * out_BxKxMxD.astype(jnp.float32), axis=-1, keepdims=True
  )
  dscores_BxKxMxS = probs_BxKxMxS * (dprobs_BxKxMxS - rowdot_BxKxMx1) * scale
  dq_BxKxMxD = jnp.einsum('bkms,bksd->bkmd', dscores_BxKxMxS.astype(k_BxKxSxD.dtype), k_BxKxSxD)
  # K/V gradients as [D, S]: the [M, S] operands are contracted over their leading dim.
  dk_BxKxDxS = jnp.einsum('bkmd,bkms->bkds', q_BxKxMxD, dscores_BxKxMxS.astype(q_BxKxMxD.dtype))
  dv_BxKxDxS = jnp.einsum('bkmd,bkms->bkds', dout_BxKxMxD, probs_BxKxMxS.astype(dout_BxKxMxD.dtype))
  return (
    dq_BxKxMxD.astype(q_BxKxMxD.dtype),
    jnp.swapaxes(dk_BxKxDxS, 2, 3).astype(k_BxKxSxD.dtype),
    jnp.swapaxes(dv_BxKxDxS, 2, 3).astype(v_BxKxSxD.dtype),
    None,
  )


_attend.defvjp(_attend_fwd, _attend_bwd)


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
