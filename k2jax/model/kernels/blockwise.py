"""The `blockwise` backend: flash attention in plain XLA, linear memory forward and backward.

Same contract as reference.py (query t sees key s iff kv_positions[s] <= q_positions[t] and the
segment ids match; fp32 softmax with scale D**-0.5; GQA; a query that sees no key gets zeros),
computed one [block_q x block_kv] tile of scores at a time.

Layout. Queries (and the output, dout, dq) stay in their [B, T, H, D] buffers; each step slices
one block of Q queries and regroups it as a [B, K, G, Q, D] tile operand (G = H // K query heads
per KV head). Keys and values (G times smaller) are cut into [M, B, K, C, D] blocks once. A
tile is a batched matmul over (B, K) of [G * Q, D] x [D, C]: the G query heads of a KV head read
it together, and K/V are never repeated per query head.

Forward (online softmax). A `lax.scan` over query blocks; inside it a loop over that block's
key blocks keeps, per query row, the running max m, the running sum l = sum exp(s - m) and the
accumulator acc = sum exp(s - m) v, all fp32, rescaled by exp(m_old - m_new) when the max
grows. The block's output acc / l (0 where l = 0: no visible key) is written in place into the
output in the input dtype; its log-sum-exp lse = m + log l is kept (fp32, T x H) for the backward.

Backward (`jax.custom_vjp`, FlashAttention-2). The residuals are q, k, v, the output and lse:
no scores. Per tile the probabilities are recomputed as p = exp(s - lse); with delta =
rowsum(dO * O): dV += p^T dO, dP = dO V^T, dS = p * (dP - delta), dQ += dS K * scale,
dK += dS^T Q * scale. One scan over query blocks does all three: dQ of the block is carried over
its key blocks, and dK/dV are added into one fp32 [M, B, K, C, D] buffer each over the query
blocks, so every tile is recomputed once, and the sum over the G query heads of a KV head happens
inside the matmul (no per-query-head dK/dV). Memory is linear in length both ways.

Skipping. Before the loops, each block gets per-row summaries of its (non-padding) tokens:
position range, segment range and its lexicographic (segment, position) min/max. A (query
block, key block) pair can hold a visible pair only if the segment ranges overlap, the key
block's min position <= the query block's max position, and its lexicographic min <= the query
block's lexicographic max (visible => same segment and kv_pos <= q_pos). Each test is necessary,
so no visible pair is skipped; positions are compared, not indices, so context-parallel offsets
and zigzag (non-monotonic) orders are handled. The tests are OR-ed over the batch, and each
query block gets the indices of its non-empty key blocks, sorted first: the inner loop (a while
loop with a per-block trip count) visits only those, so a skipped tile costs nothing, neither
matmuls nor exp. Causal attention over n x n blocks visits n(n+1)/2 tiles, half the FLOPs at
length (128 x 128 blocks of 128 at 16K: 8,256 of 16,384 tiles); in a packed row every tile
between two different documents is skipped too. Kept tiles apply the exact element mask. The
[T / block_q, S / block_kv] table is the only quadratic part: at 524,288 tokens with the default
128-blocks, 64 MiB of int32 (~120 MiB with its sort; 3% of the layer's bf16 fwd+bwd temp).

Padding. Lengths that are not block multiples are padded: padded keys get position INT32_MAX
(seen by no query), padded queries position INT32_MIN (see no key); both are left out of the
block summaries, and the padded rows are sliced off the results.

Pure jnp/lax, so it runs on any platform and under GSPMD (batch over `data`, heads over
`tensor`); the block table's reduction over the batch becomes an all-reduce of booleans.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

# From benchmarks/attention.py on CPU (fp32, 8 query heads on 1 KV head, head dim 128): a tile
# of 8 x 128 query rows by 128 keys (512 KiB of fp32 scores) stays in L2 and is near matmul
# peak. fwd+bwd CPU seconds at 4K (16K): 128x128 0.85 (12.7), 128x256 0.98 (14.5),
# 256x256 0.97 (15.1), 512x512 1.40; 64x64 1.09.
DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_KV = 128

_INT_MIN = jnp.iinfo(jnp.int32).min
_INT_MAX = jnp.iinfo(jnp.int32).max


def blockwise_attention(
  q_BxTxHxD,
  k_BxSxKxD,
  v_BxSxKxD,
  q_positions_BxT,
  kv_positions_BxS,
  q_segment_ids_BxT,
  kv_segment_ids_BxS,
  *,
  block_q=DEFAULT_BLOCK_Q,
  block_kv=DEFAULT_BLOCK_KV,
):
  """Attention per reference.py's contract in [block_q x block_kv] tiles; returns [B, T, H, D].

  A block larger than its sequence shrinks to the sequence length.
  """
  block_q = max(1, min(block_q, q_BxTxHxD.shape[1]))
  block_kv = max(1, min(block_kv, k_BxSxKxD.shape[1]))
  ints = [
    jnp.asarray(x, jnp.int32)
    for x in (q_positions_BxT, kv_positions_BxS, q_segment_ids_BxT, kv_segment_ids_BxS)
  ]
  return _attention(block_q, block_kv, q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, *ints)


class _Blocks(NamedTuple):
  """The inputs cut into blocks, as the scan and the loops index them."""

  q_BxTxHxD: jax.Array  # the queries as they are (T padded to N * Q), as _to_bits
  k_MxBxKxCxD: jax.Array  # M key blocks of C keys, block index first, as _to_bits
  v_MxBxKxCxD: jax.Array
  q_positions_NxBxQ: jax.Array  # N query blocks of Q queries
  q_segment_ids_NxBxQ: jax.Array
  kv_positions_MxBxC: jax.Array
  kv_segment_ids_MxBxC: jax.Array
  count_N: jax.Array  # how many key blocks query block i must visit
  order_NxM: jax.Array  # their indices first: order[i, :count[i]]


def _pad_to(x, length, value=0):
  """x padded along axis 1 to `length` (no copy when it already is that long)."""
  if x.shape[1] == length:
    return x
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, length - x.shape[1])
  return jnp.pad(x, pad, constant_values=value)


def _round_up(length, block):
  return -(-length // block) * block


def _split(x_BxLx_, block):
  """[B, L, ...] (L a multiple of block) -> [L // block, B, block, ...]."""
  batch, length = x_BxLx_.shape[:2]
  x = x_BxLx_.reshape(batch, length // block, block, *x_BxLx_.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _pad_queries(x_BxTx_, block):
  """T zero-padded to a block multiple (a no-op when it is one: the query-length arrays are
  sliced per block where they are, never copied or transposed as a whole)."""
  return _pad_to(x_BxTx_, _round_up(x_BxTx_.shape[1], block))


def _to_bits(x):
  """16-bit floats as uint16, for dynamic slicing: XLA:CPU slices bf16 in f32, hoisting a
  full-length f32 copy of the sliced array out of the loop. Integers are sliced as they are,
  and the bitcast fuses into whatever produces the array (in-place updates of bf16 buffers
  stay bf16)."""
  if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize == 2:
    return lax.bitcast_convert_type(x, jnp.uint16)
  return x


def _get_block(bits_BxTxHxD, i, block, num_kv, dtype):
  """Query block i of a _to_bits [B, T, H, D] array as a tile operand [B, K, G, Q, D]."""
  batch, _, heads, dim = bits_BxTxHxD.shape
  x_BxQxHxD = lax.dynamic_slice_in_dim(bits_BxTxHxD, i * block, block, axis=1)
  x_BxQxKxGxD = x_BxQxHxD.reshape(batch, block, num_kv, heads // num_kv, dim)
  return lax.bitcast_convert_type(jnp.moveaxis(x_BxQxKxGxD, 1, 3), dtype)


def _set_block(x_BxTxHxD, block_BxKxGxQxD, i, block):
  """Writes query block i in place: the inverse of _get_block (without the bits)."""
  x_BxQxKxGxD = jnp.moveaxis(block_BxKxGxQxD, 3, 1).astype(x_BxTxHxD.dtype)
  x_BxQxHxD = x_BxQxKxGxD.reshape(x_BxTxHxD.shape[0], block, *x_BxTxHxD.shape[2:])
  return lax.dynamic_update_slice_in_dim(x_BxTxHxD, x_BxQxHxD, i * block, axis=1)


def _keys_to_blocks(x_BxSxKxD, block):
  """[B, S, K, D] -> [M, B, K, C, D], S zero-padded to a block multiple. K/V are G times
  smaller than the queries, so this copy is cheap."""
  x = _pad_to(x_BxSxKxD, _round_up(x_BxSxKxD.shape[1], block))
  return _split(x, block).transpose(0, 1, 3, 2, 4)


def _keys_from_blocks(x_MxBxKxCxD, length):
  m, batch, num_kv, block, dim = x_MxBxKxCxD.shape
  return x_MxBxKxCxD.transpose(1, 0, 3, 2, 4).reshape(batch, m * block, num_kv, dim)[:, :length]


def _summaries(positions_NxBxL, segment_ids_NxBxL, valid_NxBxL):
  """Per block and row: position range, segment range, lexicographic (segment, position) extremes.

  A block of padding only gets empty ranges (min > max), which overlap nothing.
  """

  def lo(x, where):
    return jnp.min(jnp.where(where, x, _INT_MAX), axis=-1)

  def hi(x, where):
    return jnp.max(jnp.where(where, x, _INT_MIN), axis=-1)

  seg_lo, seg_hi = lo(segment_ids_NxBxL, valid_NxBxL), hi(segment_ids_NxBxL, valid_NxBxL)
  return dict(
    pos_lo=lo(positions_NxBxL, valid_NxBxL),
    pos_hi=hi(positions_NxBxL, valid_NxBxL),
    seg_lo=seg_lo,
    seg_hi=seg_hi,
    # the smallest position within the smallest segment, the largest within the largest
    lex_lo=lo(positions_NxBxL, valid_NxBxL & (segment_ids_NxBxL == seg_lo[..., None])),
    lex_hi=hi(positions_NxBxL, valid_NxBxL & (segment_ids_NxBxL == seg_hi[..., None])),
  )


def _block_table(q_pos_NxBxQ, q_seg_NxBxQ, q_len, kv_pos_MxBxC, kv_seg_MxBxC, kv_len):
  """Which (query block, key block) pairs may hold a visible pair, as loop counts and orders."""

  def valid(x_NxBxL, length):
    n, _, block = x_NxBxL.shape
    index_NxL = jnp.arange(n)[:, None] * block + jnp.arange(block)[None, :]
    return jnp.broadcast_to((index_NxL < length)[:, None, :], x_NxBxL.shape)

  qs = _summaries(q_pos_NxBxQ, q_seg_NxBxQ, valid(q_pos_NxBxQ, q_len))
  ks = _summaries(kv_pos_MxBxC, kv_seg_MxBxC, valid(kv_pos_MxBxC, kv_len))
  qs = {name: x_NxB[:, None, :] for name, x_NxB in qs.items()}  # [N, 1, B]
  ks = {name: x_MxB[None, :, :] for name, x_MxB in ks.items()}  # [1, M, B]
  overlap = (qs['seg_lo'] <= ks['seg_hi']) & (ks['seg_lo'] <= qs['seg_hi'])
  causal = ks['pos_lo'] <= qs['pos_hi']
  lex = (ks['seg_lo'] < qs['seg_hi']) | (
    (ks['seg_lo'] == qs['seg_hi']) & (ks['lex_lo'] <= qs['lex_hi'])
  )
  visit_NxM = jnp.any(overlap & causal & lex, axis=-1)
  count_N = jnp.sum(visit_NxM, axis=1, dtype=jnp.int32)
  order_NxM = jnp.argsort(~visit_NxM, axis=1, stable=True).astype(jnp.int32)
  return count_N, order_NxM


def _to_blocks(block_q, block_kv, q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, qp_BxT, kp_BxS, qs_BxT, ks_BxS):
  q_len, kv_len = q_BxTxHxD.shape[1], k_BxSxKxD.shape[1]
  q_padded, kv_padded = _round_up(q_len, block_q), _round_up(kv_len, block_kv)
  q_pos_NxBxQ = _split(_pad_to(qp_BxT, q_padded, _INT_MIN), block_q)
  q_seg_NxBxQ = _split(_pad_to(qs_BxT, q_padded, _INT_MIN), block_q)
  kv_pos_MxBxC = _split(_pad_to(kp_BxS, kv_padded, _INT_MAX), block_kv)
  kv_seg_MxBxC = _split(_pad_to(ks_BxS, kv_padded, _INT_MAX), block_kv)
  count_N, order_NxM = _block_table(
    q_pos_NxBxQ, q_seg_NxBxQ, q_len, kv_pos_MxBxC, kv_seg_MxBxC, kv_len
  )
  return _Blocks(
    _to_bits(_pad_queries(q_BxTxHxD, block_q)),
    _to_bits(_keys_to_blocks(k_BxSxKxD, block_kv)),
    _to_bits(_keys_to_blocks(v_BxSxKxD, block_kv)),
    q_pos_NxBxQ,
    q_seg_NxBxQ,
    kv_pos_MxBxC,
    kv_seg_MxBxC,
    count_N,
    order_NxM,
  )


def _tile(blocks, q_BxKxGxQxD, xs, j, k_dtype, v_dtype):
  """Key block j's K, V and its fp32 scaled scores against the query block, -inf where the
  mask hides the key: [B, K, G, Q, C]."""
  k_BxKxCxD, v_BxKxCxD = (
    lax.bitcast_convert_type(lax.dynamic_index_in_dim(x, j, keepdims=False), dtype)
    for x, dtype in ((blocks.k_MxBxKxCxD, k_dtype), (blocks.v_MxBxKxCxD, v_dtype))
  )
  kv_pos_BxC = lax.dynamic_index_in_dim(blocks.kv_positions_MxBxC, j, keepdims=False)
  kv_seg_BxC = lax.dynamic_index_in_dim(blocks.kv_segment_ids_MxBxC, j, keepdims=False)
  scores = jnp.einsum(
    'bkgqd,bkcd->bkgqc', q_BxKxGxQxD, k_BxKxCxD, preferred_element_type=jnp.float32
  )
  scores = scores * (q_BxKxGxQxD.shape[-1] ** -0.5)
  mask_BxQxC = (kv_pos_BxC[:, None, :] <= xs['q_pos'][:, :, None]) & (
    kv_seg_BxC[:, None, :] == xs['q_seg'][:, :, None]
  )
  return k_BxKxCxD, v_BxKxCxD, jnp.where(mask_BxQxC[:, None, None], scores, -jnp.inf)


def _query_xs(blocks):
  """What the scan over query blocks reads per block (all small)."""
  return dict(
    index=jnp.arange(blocks.count_N.shape[0]),
    q_pos=blocks.q_positions_NxBxQ,
    q_seg=blocks.q_segment_ids_NxBxQ,
    count=blocks.count_N,
    order=blocks.order_NxM,
  )


def _forward(block_q, block_kv, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
  """(out [B, T, H, D], lse [N, B, K, G, Q] fp32)."""
  blocks = _to_blocks(block_q, block_kv, q, k, v, q_pos, kv_pos, q_seg, kv_seg)

  def query_block(out_BxTxHxD, xs):
    q_BxKxGxQxD = _get_block(blocks.q_BxTxHxD, xs['index'], block_q, k.shape[2], q.dtype)
    stats_shape = q_BxKxGxQxD.shape[:-1]

    def key_block(n, carry):
      m_BxKxGxQ, l_BxKxGxQ, acc_BxKxGxQxD = carry
      _, v_BxKxCxD, scores = _tile(blocks, q_BxKxGxQxD, xs, xs['order'][n], k.dtype, v.dtype)
      m_new = jnp.maximum(m_BxKxGxQ, jnp.max(scores, axis=-1))
      # A row that has seen no key yet keeps m = -inf; shift by 0 there to avoid inf - inf.
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      p = jnp.exp(scores - m_safe[..., None])
      correction = jnp.exp(m_BxKxGxQ - m_safe)
      l_new = correction * l_BxKxGxQ + jnp.sum(p, axis=-1)
      pv = jnp.einsum(
        'bkgqc,bkcd->bkgqd', p.astype(v.dtype), v_BxKxCxD, preferred_element_type=jnp.float32
      )
      return m_new, l_new, correction[..., None] * acc_BxKxGxQxD + pv

    init = (
      jnp.full(stats_shape, -jnp.inf, jnp.float32),
      jnp.zeros(stats_shape, jnp.float32),
      jnp.zeros(q_BxKxGxQxD.shape, jnp.float32),
    )
    m, total, acc = lax.fori_loop(0, xs['count'], key_block, init)
    seen = total > 0
    total = jnp.where(seen, total, 1.0)
    out = jnp.where(seen[..., None], acc / total[..., None], 0.0)
    lse = jnp.where(seen, m + jnp.log(total), 0.0)
    return _set_block(out_BxTxHxD, out, xs['index'], block_q), lse

  out_BxTxHxD = jnp.zeros(blocks.q_BxTxHxD.shape, q.dtype)
  out_BxTxHxD, lse_NxBxKxGxQ = lax.scan(query_block, out_BxTxHxD, _query_xs(blocks))
  return out_BxTxHxD[:, : q.shape[1]], lse_NxBxKxGxQ


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attention(block_q, block_kv, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
  return _forward(block_q, block_kv, q, k, v, q_pos, kv_pos, q_seg, kv_seg)[0]


def _attention_fwd(block_q, block_kv, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
  out, lse = _forward(block_q, block_kv, q, k, v, q_pos, kv_pos, q_seg, kv_seg)
  # Named, so a remat policy can keep them and the backward pass skip the forward loop.
  out, lse = checkpoint_name(out, 'attention_out'), checkpoint_name(lse, 'attention_lse')
  return out, (q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse)


def _attention_bwd(block_q, block_kv, residuals, dout_BxTxHxD):
  q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse_NxBxKxGxQ = residuals
  blocks = _to_blocks(block_q, block_kv, q, k, v, q_pos, kv_pos, q_seg, kv_seg)
  num_kv, scale = k.shape[2], q.shape[-1] ** -0.5
  group = q.shape[2] // num_kv
  dout_BxTxHxD = dout_BxTxHxD.astype(q.dtype)
  do_BxTxHxD = _to_bits(_pad_queries(dout_BxTxHxD, block_q))
  # delta = rowsum(dO * O): the softmax Jacobian's correction term, per query row.
  delta_BxTxH = jnp.einsum('bthd,bthd->bth', dout_BxTxHxD, out, preferred_element_type=jnp.float32)
  delta_BxTxKxG = _pad_queries(delta_BxTxH, block_q).reshape(*q.shape[:1], -1, num_kv, group)
  delta_NxBxKxGxQ = jnp.moveaxis(_split(delta_BxTxKxG, block_q), 2, 4)
  xs = dict(_query_xs(blocks), lse=lse_NxBxKxGxQ, delta=delta_NxBxKxGxQ)

  def query_block(carry, xs):
    dq_BxTxHxD, dkv = carry
    q_BxKxGxQxD = _get_block(blocks.q_BxTxHxD, xs['index'], block_q, num_kv, q.dtype)
    do_BxKxGxQxD = _get_block(do_BxTxHxD, xs['index'], block_q, num_kv, q.dtype)

    def key_block(n, carry):
      dq_BxKxGxQxD, (dk_MxBxKxCxD, dv_MxBxKxCxD) = carry
      j = xs['order'][n]
      k_BxKxCxD, v_BxKxCxD, scores = _tile(blocks, q_BxKxGxQxD, xs, j, k.dtype, v.dtype)
      p = jnp.exp(scores - xs['lse'][..., None])  # masked keys: exp(-inf) = 0
      dv = jnp.einsum(
        'bkgqc,bkgqd->bkcd', p.astype(q.dtype), do_BxKxGxQxD, preferred_element_type=jnp.float32
      )
      dp = jnp.einsum(
        'bkgqd,bkcd->bkgqc', do_BxKxGxQxD, v_BxKxCxD, preferred_element_type=jnp.float32
      )
      ds = (p * (dp - xs['delta'][..., None])).astype(q.dtype)
      dq = jnp.einsum('bkgqc,bkcd->bkgqd', ds, k_BxKxCxD, preferred_element_type=jnp.float32)
      dk = jnp.einsum('bkgqc,bkgqd->bkcd', ds, q_BxKxGxQxD, preferred_element_type=jnp.float32)
      # In-place adds into the loop-carried buffers: one key block's slice each.
      dk_MxBxKxCxD = dk_MxBxKxCxD.at[j].add(dk * scale)
      dv_MxBxKxCxD = dv_MxBxKxCxD.at[j].add(dv)
      return dq_BxKxGxQxD + dq * scale, (dk_MxBxKxCxD, dv_MxBxKxCxD)

    init = (jnp.zeros(q_BxKxGxQxD.shape, jnp.float32), dkv)
    dq, dkv = lax.fori_loop(0, xs['count'], key_block, init)
    return (_set_block(dq_BxTxHxD, dq, xs['index'], block_q), dkv), None

  zeros = jnp.zeros(blocks.k_MxBxKxCxD.shape, jnp.float32)  # dK, dV in fp32
  init = (jnp.zeros(blocks.q_BxTxHxD.shape, q.dtype), (zeros, zeros))
  (dq_BxTxHxD, (dk_acc, dv_acc)), _ = lax.scan(query_block, init, xs)
  dq_BxTxHxD = dq_BxTxHxD[:, : q.shape[1]]
  dk_BxSxKxD = _keys_from_blocks(dk_acc, k.shape[1]).astype(k.dtype)
  dv_BxSxKxD = _keys_from_blocks(dv_acc, v.shape[1]).astype(v.dtype)
  return dq_BxTxHxD, dk_BxSxKxD, dv_BxSxKxD, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)
