"""The `pallas` backend: our flash-attention kernel for NVIDIA GPUs (Pallas lowered to Triton).

Same contract as `reference.dense_attention`: query t sees key s iff kv_positions[s] <=
q_positions[t] and the segment ids are equal; softmax in fp32 with scale D**-0.5; query head h
reads KV head h // (H // K); a query that sees no key outputs zeros. On CPU it runs in Pallas
interpret mode (tests); on a GPU it lowers to one Triton kernel per pass.

Algorithm (FlashAttention-2, online softmax, nothing of size [T, S] is ever materialised):
  - The wrapper pads T to a multiple of block_q and S to a multiple of block_kv, repeating the
    last position and segment id. Padded keys are masked by index inside the kernel; padded
    queries are sliced off, and their zero output cotangent gives them zero gradients.
  - Block skipping. From per-block ranges ([B, T/block_q] max query position, [B, S/block_kv]
    min key position, and both min/max segment ids) the wrapper marks a (q block, kv block)
    pair live unless no key can be visible (min key position > max query position, or disjoint
    segment-id ranges). It compacts the live kv blocks of each q block into an ascending list
    ([B, T/block_q, S/block_kv] int32 plus a count), and the live q blocks of each kv block
    likewise. Kernels loop over `count` entries of their list, so dead blocks cost neither
    loads nor flops, and the loop stays branch-free for Triton's software pipelining.
  - Forward: grid (q block, batch, query head); K/V's index map sends query head h to KV
    head h // group, so K/V are read per KV head, never repeated. Each program keeps its
    [block_q, D] output, running max and sum in fp32 (base-2 exponentials, log2(e) folded into
    the scale) and writes the output in the input dtype plus the natural-log log-sum-exp
    (fp32, [B, H, T]; -inf for a query that sees no key) as the backward's residual.
  - Backward (jax.custom_vjp): delta = rowsum(dO * O) in XLA, then two kernels that recompute
    P = exp(S - lse) from q, k and the lse:
      dq:    grid (q block, batch, query head), looping over the q block's live kv blocks;
      dk/dv: grid (kv block, batch, KV head), looping over the group's query heads and each
             kv block's live q blocks, so GQA's sum over the group happens in the fp32
             accumulators (no per-query-head dK/dV is ever written).
"""

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# GPU defaults for head dim 128 (K2-V2), as in FlashAttention-2's Triton kernels: a 128-query
# tile amortises each K/V load over many rows, and a 64-key tile keeps the fp32 scores and
# probabilities ([128, 64] each) plus the [128, 128] fp32 accumulator within the registers of
# 8 warps without spilling. Tiles must be powers of two >= 16 (Triton's dot).
DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_KV = 64
# Two stages double-buffer the K/V (forward, dq) or Q/dO (dk/dv) tiles in shared memory,
# JAX's own kernel's default and well within an H100/H200's 228 KiB at these tiles.
DEFAULT_NUM_STAGES = 2

LOG2_E = math.log2(math.e)
LN_2 = math.log(2.0)
# The running max starts finite: masked scores are -inf, and exp2(m_prev - m_next) must not
# see -inf - -inf while a row has no visible key yet.
_MAX_INIT = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class _Config:
  """The static parameters every kernel shares."""

  block_q: int
  block_kv: int
  kv_length: int  # keys before padding: those at or past it are masked
  interpret: bool
  num_warps: int
  num_stages: int

  def params(self):
    return plgpu.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


class _Mask(NamedTuple):
  """The padded positions and segment ids, and the live-block lists (all int32)."""

  q_positions_BxT: jax.Array
  q_segment_ids_BxT: jax.Array
  kv_positions_BxS: jax.Array
  kv_segment_ids_BxS: jax.Array
  kv_count_BxNq: jax.Array  # live kv blocks per q block
  kv_blocks_BxNqxNk: jax.Array  # their indices, ascending, in the first kv_count entries
  q_count_BxNk: jax.Array  # live q blocks per kv block
  q_blocks_BxNkxNq: jax.Array


def pallas_attention(
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
  interpret=None,
  num_warps=None,
  num_stages=None,
):
  """Flash attention under the contract of `reference.dense_attention`; see the module doc.

  interpret: None runs interpreted on CPU and as Triton elsewhere. num_warps defaults to 8 for
  head dims above 64 (4 below), num_stages to DEFAULT_NUM_STAGES.
  """
  _, q_length, num_heads, head_dim = q_BxTxHxD.shape
  kv_length, num_kv = k_BxSxKxD.shape[1:3]
  if num_heads % num_kv:
    raise ValueError(f'{num_heads} query heads are not a multiple of {num_kv} KV heads')
  for name, size in (('head dim', head_dim), ('block_q', block_q), ('block_kv', block_kv)):
    if size < 16 or size & (size - 1):
      raise ValueError(f'pallas attention needs a {name} that is a power of two >= 16: {size}')
  config = _Config(
    # A sequence shorter than the block gets a smaller block rather than padding.
    block_q=min(block_q, max(16, pl.next_power_of_2(q_length))),
    block_kv=min(block_kv, max(16, pl.next_power_of_2(kv_length))),
    kv_length=kv_length,
    interpret=jax.default_backend() == 'cpu' if interpret is None else interpret,
    num_warps=num_warps or (8 if head_dim > 64 else 4),
    num_stages=num_stages or DEFAULT_NUM_STAGES,
  )
  q_pad = -q_length % config.block_q
  kv_pad = -kv_length % config.block_kv
  pad_seq = lambda x, pad: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  pad_ids = lambda x, pad: jnp.pad(x.astype(jnp.int32), [(0, 0), (0, pad)], mode='edge')
  mask = _live_blocks(
    config,
    pad_ids(q_positions_BxT, q_pad),
    pad_ids(q_segment_ids_BxT, q_pad),
    pad_ids(kv_positions_BxS, kv_pad),
    pad_ids(kv_segment_ids_BxS, kv_pad),
  )
  out_BxTxHxD = _flash(
    config,
    pad_seq(q_BxTxHxD, q_pad),
    pad_seq(k_BxSxKxD, kv_pad),
    pad_seq(v_BxSxKxD, kv_pad),
    mask,
  )
  return out_BxTxHxD[:, :q_length]


def _live_blocks(config, q_positions_BxT, q_segment_ids_BxT, kv_positions_BxS, kv_segment_ids_BxS):
  """The compacted lists of (q block, kv block) pairs that may hold a visible key.

  Conservative: a pair is dropped only when no key in it can be visible to any query in it, so
  the kernels' exact per-element mask keeps the result exact whatever the ranges' slack."""

  def ranges(ids_BxL, block):
    ids_BxNxblock = ids_BxL.reshape(ids_BxL.shape[0], -1, block)
    return ids_BxNxblock.min(axis=-1), ids_BxNxblock.max(axis=-1)

  _, q_pos_max_BxNq = ranges(q_positions_BxT, config.block_q)
  q_seg_min_BxNq, q_seg_max_BxNq = ranges(q_segment_ids_BxT, config.block_q)
  kv_pos_min_BxNk, _ = ranges(kv_positions_BxS, config.block_kv)
  kv_seg_min_BxNk, kv_seg_max_BxNk = ranges(kv_segment_ids_BxS, config.block_kv)
  live_BxNqxNk = (
    (kv_pos_min_BxNk[:, None, :] <= q_pos_max_BxNq[:, :, None])
    & (kv_seg_min_BxNk[:, None, :] <= q_seg_max_BxNq[:, :, None])
    & (q_seg_min_BxNq[:, :, None] <= kv_seg_max_BxNk[:, None, :])
  )

  def compact(live_BxMxN):
    # Live indices first (ascending), then N as filler that the kernels never read.
    num = live_BxMxN.shape[-1]
    indices_BxMxN = jnp.where(live_BxMxN, jnp.arange(num, dtype=jnp.int32), num)
    return live_BxMxN.sum(axis=-1, dtype=jnp.int32), jnp.sort(indices_BxMxN, axis=-1)

  return _Mask(
    q_positions_BxT,
    q_segment_ids_BxT,
    kv_positions_BxS,
    kv_segment_ids_BxS,
    *compact(live_BxNqxNk),
    *compact(live_BxNqxNk.transpose(0, 2, 1)),
  )


def _visible(config, q_pos, q_seg, kv_pos, kv_seg, kv_start):
  """[block_q, block_kv] bool: the contract's mask, plus the padded keys hidden."""
  visible = (kv_pos[None, :] <= q_pos[:, None]) & (q_seg[:, None] == kv_seg[None, :])
  if config.kv_length % config.block_kv:  # only then are there padded keys
    kv_index = kv_start + lax.broadcasted_iota(jnp.int32, (1, config.block_kv), 1)
    visible &= kv_index < config.kv_length
  return visible


def _scores_log2(q, k, scale):
  """Scaled scores in base-2 units (exp2(s * log2 e) == exp(s)), fp32."""
  return plgpu.dot(q, k, trans_b=True) * (scale * LOG2_E)


# ---------------------------------------------------------------------------------------------
# Forward


def _forward_kernel(
  kv_count_ref,
  kv_blocks_ref,
  q_pos_ref,
  q_seg_ref,
  kv_pos_ref,
  kv_seg_ref,
  q_ref,
  k_ref,
  v_ref,
  out_ref,
  lse_ref,
  *,
  config,
  scale,
):
  q = q_ref[...]
  q_pos, q_seg = q_pos_ref[...], q_seg_ref[...]
  block_q, head_dim = q.shape

  def visit(n, carry):
    out, row_max, row_sum = carry
    kv_start = kv_blocks_ref[n] * config.block_kv
    keys = pl.ds(kv_start, config.block_kv)
    visible = _visible(config, q_pos, q_seg, kv_pos_ref[keys], kv_seg_ref[keys], kv_start)
    scores = jnp.where(visible, _scores_log2(q, k_ref[keys, :], scale), -jnp.inf)
    new_max = jnp.maximum(row_max, scores.max(axis=1))
    rescale = jnp.exp2(row_max - new_max)
    probs = jnp.exp2(scores - new_max[:, None])
    v = v_ref[keys, :]
    out = rescale[:, None] * out + plgpu.dot(probs.astype(v.dtype), v)
    return out, new_max, rescale * row_sum + probs.sum(axis=1)

  init = (
    jnp.zeros((block_q, head_dim), jnp.float32),
    jnp.full((block_q,), _MAX_INIT, jnp.float32),
    jnp.zeros((block_q,), jnp.float32),
  )
  out, row_max, row_sum = lax.fori_loop(0, kv_count_ref[...], visit, init)
  # A query that saw no key has out == 0 and row_sum == 0: it outputs 0, and its lse is -inf.
  out_ref[...] = (out / jnp.where(row_sum == 0, 1.0, row_sum)[:, None]).astype(out_ref.dtype)
  lse_ref[...] = (row_max + jnp.log2(row_sum)) * LN_2


def _q_grid_specs(config, q_length, kv_length, group, head_dim):
  """BlockSpecs of a grid (q block, batch, query head), shared by the forward and dq kernels:
  (the kv-block list, count and the ids as in the kernels' signatures), q rows, K/V, lse rows."""
  num_kv_blocks = kv_length // config.block_kv
  q_ids_spec = pl.BlockSpec((None, config.block_q), lambda i, b, h: (b, i))
  kv_ids_spec = pl.BlockSpec((None, kv_length), lambda i, b, h: (b, 0))
  mask_specs = [
    pl.BlockSpec((None, None), lambda i, b, h: (b, i)),
    pl.BlockSpec((None, None, num_kv_blocks), lambda i, b, h: (b, i, 0)),
    q_ids_spec,
    q_ids_spec,
    kv_ids_spec,
    kv_ids_spec,
  ]
  q_spec = pl.BlockSpec((None, config.block_q, None, head_dim), lambda i, b, h: (b, i, h, 0))
  # GQA: query head h reads KV head h // group; K/V stay whole for the loop over kv blocks.
  kv_spec = pl.BlockSpec((None, kv_length, None, head_dim), lambda i, b, h: (b, 0, h // group, 0))
  row_spec = pl.BlockSpec((None, None, config.block_q), lambda i, b, h: (b, h, i))
  return mask_specs, q_spec, kv_spec, row_spec


def _forward(config, q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask):
  batch, q_length, num_heads, head_dim = q_BxTxHxD.shape
  kv_length, num_kv = k_BxSxKxD.shape[1:3]
  mask_specs, q_spec, kv_spec, row_spec = _q_grid_specs(
    config, q_length, kv_length, num_heads // num_kv, head_dim
  )
  return pl.pallas_call(
    functools.partial(_forward_kernel, config=config, scale=head_dim**-0.5),
    grid=(q_length // config.block_q, batch, num_heads),
    in_specs=[*mask_specs, q_spec, kv_spec, kv_spec],
    out_specs=[q_spec, row_spec],
    out_shape=[
      jax.ShapeDtypeStruct(q_BxTxHxD.shape, q_BxTxHxD.dtype),
      jax.ShapeDtypeStruct((batch, num_heads, q_length), jnp.float32),
    ],
    compiler_params=config.params(),
    interpret=config.interpret,
    name='k2_flash_forward',
  )(
    mask.kv_count_BxNq,
    mask.kv_blocks_BxNqxNk,
    mask.q_positions_BxT,
    mask.q_segment_ids_BxT,
    mask.kv_positions_BxS,
    mask.kv_segment_ids_BxS,
    q_BxTxHxD,
    k_BxSxKxD,
    v_BxSxKxD,
  )


# ---------------------------------------------------------------------------------------------
# Backward


def _probs(q, k, lse, visible, scale):
  """The forward's softmax, recomputed from the lse: exp(s - lse) where visible, else 0."""
  return jnp.where(visible, jnp.exp2(_scores_log2(q, k, scale) - (lse * LOG2_E)[:, None]), 0.0)


def _dq_kernel(
  kv_count_ref,
  kv_blocks_ref,
  q_pos_ref,
  q_seg_ref,
  kv_pos_ref,
  kv_seg_ref,
  q_ref,
  k_ref,
  v_ref,
  dout_ref,
  lse_ref,
  delta_ref,
  dq_ref,
  *,
  config,
  scale,
):
  q, dout = q_ref[...], dout_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  q_pos, q_seg = q_pos_ref[...], q_seg_ref[...]

  def visit(n, dq):
    kv_start = kv_blocks_ref[n] * config.block_kv
    keys = pl.ds(kv_start, config.block_kv)
    k, v = k_ref[keys, :], v_ref[keys, :]
    visible = _visible(config, q_pos, q_seg, kv_pos_ref[keys], kv_seg_ref[keys], kv_start)
    probs = _probs(q, k, lse, visible, scale)
    dscores = probs * (plgpu.dot(dout, v, trans_b=True) - delta[:, None])
    return dq + plgpu.dot(dscores.astype(k.dtype), k)

  dq = lax.fori_loop(0, kv_count_ref[...], visit, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(
  q_count_ref,
  q_blocks_ref,
  q_pos_ref,
  q_seg_ref,
  kv_pos_ref,
  kv_seg_ref,
  q_ref,
  k_ref,
  v_ref,
  dout_ref,
  lse_ref,
  delta_ref,
  dk_ref,
  dv_ref,
  *,
  config,
  scale,
):
  k, v = k_ref[...], v_ref[...]
  kv_pos, kv_seg = kv_pos_ref[...], kv_seg_ref[...]
  kv_start = pl.program_id(0) * config.block_kv
  group = q_ref.shape[1]

  def visit_head(head, carry):
    # q_ref, dout_ref: [T, group, D] and lse_ref, delta_ref: [group, T] of this KV head.
    def visit(n, carry):
      dk, dv = carry
      rows = pl.ds(q_blocks_ref[n] * config.block_q, config.block_q)
      q, dout = q_ref[rows, head, :], dout_ref[rows, head, :]
      visible = _visible(config, q_pos_ref[rows], q_seg_ref[rows], kv_pos, kv_seg, kv_start)
      probs = _probs(q, k, lse_ref[head, rows], visible, scale)
      dv = dv + plgpu.dot(probs.astype(dout.dtype), dout, trans_a=True)
      dscores = probs * (plgpu.dot(dout, v, trans_b=True) - delta_ref[head, rows][:, None])
      return dk + plgpu.dot(dscores.astype(q.dtype), q, trans_a=True), dv

    return lax.fori_loop(0, q_count_ref[...], visit, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, group, visit_head, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward(config, q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask, out_BxTxHxD, lse_BxHxT, dout_BxTxHxD):
  batch, q_length, num_heads, head_dim = q_BxTxHxD.shape
  kv_length, num_kv = k_BxSxKxD.shape[1:3]
  group = num_heads // num_kv
  num_q_blocks = q_length // config.block_q
  num_kv_blocks = kv_length // config.block_kv
  scale = head_dim**-0.5
  # FlashAttention-2's D_i = sum_d dO * O, the softmax's backward term; one fused XLA pass.
  delta_BxHxT = jnp.einsum(
    'bthd,bthd->bht', dout_BxTxHxD, out_BxTxHxD, preferred_element_type=jnp.float32
  )
  ids_args = (
    mask.q_positions_BxT,
    mask.q_segment_ids_BxT,
    mask.kv_positions_BxS,
    mask.kv_segment_ids_BxS,
  )
  tensor_args = (q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, dout_BxTxHxD, lse_BxHxT, delta_BxHxT)

  # dq: a program per (q block, batch, query head), as in the forward.
  mask_specs, q_spec, kv_spec, row_spec = _q_grid_specs(
    config, q_length, kv_length, group, head_dim
  )
  dq_BxTxHxD = pl.pallas_call(
    functools.partial(_dq_kernel, config=config, scale=scale),
    grid=(num_q_blocks, batch, num_heads),
    in_specs=[*mask_specs, q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
    out_specs=q_spec,
    out_shape=jax.ShapeDtypeStruct(q_BxTxHxD.shape, q_BxTxHxD.dtype),
    compiler_params=config.params(),
    interpret=config.interpret,
    name='k2_flash_dq',
  )(mask.kv_count_BxNq, mask.kv_blocks_BxNqxNk, *ids_args, *tensor_args)

  # dk, dv: a program per (kv block, batch, KV head) that sums over its group's query heads.
  # The group's heads are adjacent in H, so a block of `group` heads at block index kh.
  group_spec = pl.BlockSpec((None, q_length, group, head_dim), lambda j, b, kh: (b, 0, kh, 0))
  block_spec = pl.BlockSpec((None, config.block_kv, None, head_dim), lambda j, b, kh: (b, j, kh, 0))
  rows_spec = pl.BlockSpec((None, group, q_length), lambda j, b, kh: (b, kh, 0))
  q_ids_spec = pl.BlockSpec((None, q_length), lambda j, b, kh: (b, 0))
  kv_ids_spec = pl.BlockSpec((None, config.block_kv), lambda j, b, kh: (b, j))
  dk_BxSxKxD, dv_BxSxKxD = pl.pallas_call(
    functools.partial(_dkv_kernel, config=config, scale=scale),
    grid=(num_kv_blocks, batch, num_kv),
    in_specs=[
      pl.BlockSpec((None, None), lambda j, b, kh: (b, j)),
      pl.BlockSpec((None, None, num_q_blocks), lambda j, b, kh: (b, j, 0)),
      q_ids_spec,
      q_ids_spec,
      kv_ids_spec,
      kv_ids_spec,
      group_spec,
      block_spec,
      block_spec,
      group_spec,
      rows_spec,
      rows_spec,
    ],
    out_specs=[block_spec, block_spec],
    out_shape=[
      jax.ShapeDtypeStruct(k_BxSxKxD.shape, k_BxSxKxD.dtype),
      jax.ShapeDtypeStruct(v_BxSxKxD.shape, v_BxSxKxD.dtype),
    ],
    compiler_params=config.params(),
    interpret=config.interpret,
    name='k2_flash_dkv',
  )(mask.q_count_BxNk, mask.q_blocks_BxNkxNq, *ids_args, *tensor_args)
  return dq_BxTxHxD, dk_BxSxKxD, dv_BxSxKxD


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(config, q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask):
  return _forward(config, q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask)[0]


def _flash_fwd(config, q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask):
  out_BxTxHxD, lse_BxHxT = _forward(config, q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask)
  # Named, so a remat policy can keep them and the backward pass skip the forward kernel.
  out_BxTxHxD = checkpoint_name(out_BxTxHxD, 'attention_out')
  lse_BxHxT = checkpoint_name(lse_BxHxT, 'attention_lse')
  return out_BxTxHxD, (q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask, out_BxTxHxD, lse_BxHxT)


def _flash_bwd(config, residuals, dout_BxTxHxD):
  q, k, v, mask, out, lse = residuals
  return (*_backward(config, q, k, v, mask, out, lse, dout_BxTxHxD), None)


_flash.defvjp(_flash_fwd, _flash_bwd)
