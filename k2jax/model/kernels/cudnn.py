"""The `cudnn` backend: JAX's cuDNN fused flash attention (sm90), forward and backward.

It goes through JAX's cuDNN wrapper (`jax._src.cudnn.fused_attention_stablehlo`) in the
[B, T, N, H] layout with GQA native (K/V keep their own head count). cuDNN's causal mask is
by index, top-left, so this backend serves self-attention only: queries are the keys' own
tokens, with positions increasing within each document (what the data pipeline writes).
Context-parallel attention (local queries against gathered keys) needs a bottom-right mask
that JAX does not expose, and goes to `pallas`.

  documents=False  rows are one causal sequence (`data.packing=concat`, K2-V2's pre-training
                   and stage 1): mask CAUSAL, segment ids unused.
  documents=True   rows pack documents: the segment ids become cuDNN's packed layout
                   (per-row segment lengths and offsets, PADDING_CAUSAL). JAX 0.10.2 scales the
                   key offsets by the *query* head count (fixed upstream by jax#39521), which
                   with GQA reads the wrong keys; `fix_gqa_offsets` patches that once, only
                   when the installed function shows the bug. Not verified on a GPU yet, so
                   `auto` does not pick it (docs/attention.md).

cuDNN cannot be lowered without a GPU; tests check `cudnn_arguments` and the patch on CPU.
"""

import jax
import jax.numpy as jnp


def segment_layout(segment_ids_BxL):
  """Per-row segment lengths [B, L] and starts [B, L + 1] of the contiguous runs of equal ids.

  Unused entries are -1, as JAX's packed cuDNN layout wants. L slots cover the worst case of
  one-token segments; the arrays are tiny next to the activations.
  """
  length = segment_ids_BxL.shape[1]
  is_start_BxL = jnp.concatenate(
    [
      jnp.ones_like(segment_ids_BxL[:, :1], dtype=jnp.bool_),
      segment_ids_BxL[:, 1:] != segment_ids_BxL[:, :-1],
    ],
    axis=1,
  )

  def row(is_start_L):
    (starts_L,) = jnp.nonzero(is_start_L, size=length, fill_value=-1)
    used_L = starts_L >= 0
    next_start_L = jnp.concatenate([starts_L[1:], jnp.array([-1], starts_L.dtype)])
    ends_L = jnp.where(next_start_L >= 0, next_start_L, length)
    lengths_L = jnp.where(used_L, ends_L - starts_L, -1)
    offsets = jnp.concatenate([starts_L, jnp.array([-1], starts_L.dtype)])
    return lengths_L.astype(jnp.int32), offsets.astype(jnp.int32)

  return jax.vmap(row)(is_start_BxL)


def cudnn_arguments(q_BxTxHxD, k_BxSxKxD, q_segment_ids_BxT, kv_segment_ids_BxS, documents):
  """Keyword arguments of `fused_attention_stablehlo.dot_product_attention` for our contract."""
  from jax._src.cudnn.fused_attention_stablehlo import MaskType

  if q_BxTxHxD.shape[1] != k_BxSxKxD.shape[1]:
    raise ValueError(
      f'model.attention=cudnn serves self-attention only: {q_BxTxHxD.shape[1]} queries against '
      f'{k_BxSxKxD.shape[1]} keys needs a bottom-right causal mask; use model.attention=pallas'
    )
  args = dict(scale=q_BxTxHxD.shape[-1] ** -0.5, qkv_layout='BTNH')
  if not documents:
    return dict(args, mask_type=MaskType.CAUSAL)
  q_seqlen, q_offsets = segment_layout(q_segment_ids_BxT)
  kv_seqlen, kv_offsets = segment_layout(kv_segment_ids_BxS)
  return dict(
    args,
    mask_type=MaskType.PADDING_CAUSAL,
    q_seqlen=q_seqlen,
    kv_seqlen=kv_seqlen,
    q_offsets=q_offsets,
    kv_offsets=kv_offsets,
  )


def has_gqa_offset_bug(module) -> bool:
  """Whether `module._fix_seqlen_offsets` scales key offsets by the query's head count."""
  query = jax.ShapeDtypeStruct((1, 4, 4, 8), jnp.bfloat16)  # 4 query heads
  key = jax.ShapeDtypeStruct((1, 4, 2, 8), jnp.bfloat16)  # 2 KV heads
  with jax.ensure_compile_time_eval():  # also when first called while tracing a step
    seqlen = jnp.array([[2, 2]], jnp.int32)
    offsets = jnp.array([[0, 2, -1]], jnp.int32)
    *_, kv_offsets = module._fix_seqlen_offsets(seqlen, seqlen, offsets, offsets, query, key)
    return int(kv_offsets[0, 1]) == 2 * 4 * 8  # the right stride is 2 KV heads x 8


def fix_gqa_offsets(module=None) -> bool:
  """Patches JAX 0.10.2's key-offset stride for GQA packing, if the bug is there. Idempotent."""
  if module is None:
    import jax._src.cudnn.fused_attention_stablehlo as module
  original = getattr(module, '_fix_seqlen_offsets', None)
  if original is None or getattr(original, 'k2jax_fixed', False) or not has_gqa_offset_bug(module):
    return False

  def fixed(q_seqlen, kv_seqlen, q_offsets, kv_offsets, query, key):
    # The query side is right as is; the key side, computed with the keys standing in for
    # the queries, gets the keys' own length and head-count stride.
    q_seqlen, _, q_offsets, _ = original(q_seqlen, kv_seqlen, q_offsets, kv_offsets, query, key)
    _, kv_seqlen, _, kv_offsets = original(q_seqlen, kv_seqlen, q_offsets, kv_offsets, key, key)
    return q_seqlen, kv_seqlen, q_offsets, kv_offsets

  fixed.k2jax_fixed = True
  module._fix_seqlen_offsets = fixed
  return True


def cudnn_attention(
  q_BxTxHxD,
  k_BxSxKxD,
  v_BxSxKxD,
  q_positions_BxT,
  kv_positions_BxS,
  q_segment_ids_BxT,
  kv_segment_ids_BxS,
  *,
  documents=True,
):
  """Attention through cuDNN; positions are implied by the index (see the module docstring)."""
  from jax._src.cudnn import fused_attention_stablehlo

  del q_positions_BxT, kv_positions_BxS  # cuDNN masks by index; see the module docstring
  if documents:
    fix_gqa_offsets(fused_attention_stablehlo)
  kwargs = cudnn_arguments(q_BxTxHxD, k_BxSxKxD, q_segment_ids_BxT, kv_segment_ids_BxS, documents)
  return fused_attention_stablehlo.dot_product_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, **kwargs)
