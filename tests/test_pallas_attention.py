"""The `pallas` attention kernel (interpret mode on CPU, fp32) against the dense reference, and
its Triton lowering for CUDA at K2-V2's per-device shapes (lowering only: no GPU here)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k2jax.model.kernels import select
from k2jax.model.kernels.pallas_gpu import pallas_attention
from k2jax.model.kernels.reference import dense_attention

TOL = dict(atol=1e-5, rtol=1e-5)
HEAD_DIM = 16


def _documents(*rows):
  """Packed rows from document lengths: positions restart at 0 per document, segment ids
  count documents from 1. Returns ([B, S] positions, [B, S] segment ids), numpy int32."""
  positions = [np.concatenate([np.arange(n) for n in row]) for row in rows]
  segments = [np.concatenate([np.full(n, i + 1) for i, n in enumerate(row)]) for row in rows]
  return np.stack(positions).astype(np.int32), np.stack(segments).astype(np.int32)


def _tensors(seed, batch, q_length, kv_length, heads, kv_heads):
  """Random q, k, v and an output cotangent, fp32 numpy (built without compiling anything)."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal((batch, *shape, HEAD_DIM), np.float32)
  q, k, v = normal(q_length, heads), normal(kv_length, kv_heads), normal(kv_length, kv_heads)
  return q, k, v, normal(q_length, heads)


@jax.jit(static_argnums=0)
def _out_and_grads(attention, q, k, v, ids, cotangent):
  """attention's output and the gradients of <output, cotangent> w.r.t. q, k and v."""
  out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, *ids), q, k, v)
  return out, vjp(cotangent)


def _assert_close(ours, reference, **tolerance):
  (out, grads), (ref_out, ref_grads) = ours, reference
  np.testing.assert_allclose(out, ref_out, **(tolerance or TOL), err_msg='output')
  for name, grad, ref_grad in zip('qkv', grads, ref_grads):
    np.testing.assert_allclose(grad, ref_grad, **(tolerance or TOL), err_msg=f'd{name}')


def _pallas(block_q, block_kv):
  # The way the model calls the backend (select.backend binds the block sizes).
  return select.backend('pallas', block_q=block_q, block_kv=block_kv)


@pytest.mark.parametrize(
  'heads, kv_heads, rows, q_length, blocks',
  [
    # 8:1 as K2-V2 per device; one causal document; lengths are block multiples.
    (8, 1, [[64]], 64, (16, 32)),
    # 4:2; 40 queries = the last 40 of 72 keys (a position offset); neither length is a multiple
    # of its block, and the queries' first block straddles two documents.
    (4, 2, [[40, 32]], 40, (16, 32)),
    # 1:1; two rows with different documents; 48 queries in blocks of 32.
    (2, 2, [[20, 28], [5, 11, 32]], 48, (32, 16)),
  ],
  ids=['gqa8:1-multiples', 'gqa4:2-ragged-offset', 'gqa1:1-two-rows'],
)
def test_matches_dense_reference(heads, kv_heads, rows, q_length, blocks):
  kv_positions, kv_segments = _documents(*rows)
  batch, kv_length = kv_positions.shape
  q_positions, q_segments = kv_positions[:, -q_length:], kv_segments[:, -q_length:]
  q_segments = q_segments.copy()
  q_segments[:, 3] = 99  # a query that sees no key: zeros, zero gradient
  q, k, v, cotangent = _tensors(0, batch, q_length, kv_length, heads, kv_heads)
  ids = (q_positions, kv_positions, q_segments, kv_segments)
  ours = _out_and_grads(_pallas(*blocks), q, k, v, ids, cotangent)
  _assert_close(ours, _out_and_grads(dense_attention, q, k, v, ids, cotangent))
  np.testing.assert_array_equal(ours[0][:, 3], 0.0)
  np.testing.assert_array_equal(ours[1][0][:, 3], 0.0)


def test_packed_row_equals_documents_one_by_one():
  lengths = (24, 40, 13)
  positions, segments = _documents(lengths)
  q, k, v, cotangent = _tensors(1, 1, sum(lengths), sum(lengths), 4, 1)
  attention = _pallas(16, 16)
  packed_out, packed_grads = _out_and_grads(
    attention, q, k, v, (positions, positions, segments, segments), cotangent
  )
  start = 0
  for length in lengths:
    doc = slice(start, start + length)
    ids = (positions[:, doc], positions[:, doc], segments[:, doc], segments[:, doc])
    doc_out, doc_grads = _out_and_grads(
      attention, q[:, doc], k[:, doc], v[:, doc], ids, cotangent[:, doc]
    )
    np.testing.assert_allclose(packed_out[:, doc], doc_out, **TOL)
    for grad, doc_grad in zip(packed_grads, doc_grads):
      np.testing.assert_allclose(grad[:, doc], doc_grad, **TOL)
    start += length


def test_context_parallel_zigzag_shard():
  """CP=4 with the zigzag order: rank 1 holds chunks 1 and 6 of 8 (non-contiguous positions)
  and attends to all keys, gathered in the ranks' order [0, 7, 1, 6, 2, 5, 3, 4]."""
  positions, segments = _documents((50, 78))
  chunk = 16
  order = np.concatenate([np.arange(c * chunk, (c + 1) * chunk) for c in (0, 7, 1, 6, 2, 5, 3, 4)])
  mine = order[2 * chunk : 4 * chunk]
  q, k, v, cotangent = _tensors(2, 1, len(mine), len(order), 8, 1)
  ids = (positions[:, mine], positions[:, order], segments[:, mine], segments[:, order])
  ours = _out_and_grads(_pallas(16, 32), q, k, v, ids, cotangent)
  _assert_close(ours, _out_and_grads(dense_attention, q, k, v, ids, cotangent))


def test_dead_blocks_are_skipped_not_masked():
  """Queries at positions 32..63 against keys 0..95: the last key block (64..95) is in every
  query's future, and the first query block (segment 9) matches no key. Both are filled with
  NaN: a kernel that loaded and masked them (0 * NaN) would return NaN, one that skips them
  returns the dense reference on clean inputs, with exact zeros where nothing is visible."""
  q, k, v, cotangent = _tensors(3, 1, 32, 96, 4, 2)
  kv_positions = np.arange(96, dtype=np.int32)[None]
  q_segments = np.zeros((1, 32), np.int32)
  q_segments[:, :16] = 9
  ids = (kv_positions[:, 32:64], kv_positions, q_segments, np.zeros((1, 96), np.int32))
  reference = _out_and_grads(dense_attention, q, k, v, ids, cotangent)
  q, k, v = q.copy(), k.copy(), v.copy()  # the reference may still be reading the originals
  q[:, :16] = k[:, 64:] = v[:, 64:] = np.nan
  out, (dq, dk, dv) = _out_and_grads(_pallas(16, 32), q, k, v, ids, cotangent)
  _assert_close((out, (dq, dk, dv)), reference)
  for array in (out[:, :16], dq[:, :16], dk[:, 64:], dv[:, 64:]):
    np.testing.assert_array_equal(array, 0.0)


def test_default_blocks_and_grads_through_jax_grad():
  """The defaults (block 128 x 64) clamp to short sequences; jax.grad of a sum goes through the
  custom VJP."""
  positions, segments = _documents((30, 20))
  q, k, v, _ = _tensors(4, 1, 50, 50, 4, 1)
  ids = (positions, positions, segments, segments)
  loss = lambda attention: lambda q, k, v: jnp.sum(attention(q, k, v, *ids) ** 2)
  ours = jax.jit(jax.grad(loss(pallas_attention), argnums=(0, 1, 2)))(q, k, v)
  reference = jax.grad(loss(dense_attention), argnums=(0, 1, 2))(q, k, v)
  for grad, ref_grad in zip(ours, reference):
    np.testing.assert_allclose(grad, ref_grad, **TOL)


@pytest.mark.parametrize(
  'shapes, message',
  [
    (((1, 32, 4, 24), (1, 32, 1, 24)), 'head dim'),
    (((1, 32, 3, 16), (1, 32, 2, 16)), 'not a multiple'),
  ],
)
def test_rejects_what_triton_cannot_run(shapes, message):
  q_shape, kv_shape = shapes
  ids = (np.zeros((1, 32), np.int32),) * 4
  with pytest.raises(ValueError, match=message):
    pallas_attention(np.zeros(q_shape), np.zeros(kv_shape), np.zeros(kv_shape), *ids)
  with pytest.raises(ValueError, match='block_kv'):
    pallas_attention(*(np.zeros((1, 32, 1, 16)),) * 3, *ids, block_kv=48)


@pytest.mark.parametrize('length', [8192, 65536], ids=['8K', '64K'])
@pytest.mark.parametrize('backward', [False, True], ids=['forward', 'forward+backward'])
def test_lowers_to_triton_for_cuda(length, backward):
  """K2-V2 per device (TP8: 8 query heads, 1 KV head, head dim 128, bf16), lowered for CUDA
  from this CPU-only machine: one Triton call per kernel and nothing of size [T, S]."""
  q = jax.ShapeDtypeStruct((1, length, 8, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, length, 1, 128), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
  forward = lambda q, k, v, *ids: pallas_attention(q, k, v, *ids, interpret=False)
  loss = lambda q, k, v, *ids: forward(q, k, v, *ids).astype(jnp.float32).sum()
  program = jax.grad(loss, argnums=(0, 1, 2)) if backward else forward
  text = jax.jit(program).trace(q, kv, kv, *(ids,) * 4).lower(lowering_platforms=('cuda',))
  text = text.as_text()
  kernels = (
    ['k2_flash_forward', 'k2_flash_dq', 'k2_flash_dkv'] if backward else ['k2_flash_forward']
  )
  assert text.count('stablehlo.custom_call @__gpu$xla.gpu.triton') == len(kernels)
  assert re.findall(r'name = "(k2_flash_\w+)"', text) == kernels
  for shape in re.findall(r'tensor<((?:\d+x)+)\w+>', text):
    dims = [int(d) for d in shape.rstrip('x').split('x')]
    assert dims.count(length) <= 1 and np.prod(dims) < length * length, shape
