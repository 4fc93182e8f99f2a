"""The `blockwise` backend against the dense reference: values and gradients, masks, memory."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from k2jax.model.kernels import blockwise
from k2jax.model.kernels.blockwise import blockwise_attention
from k2jax.model.kernels.reference import dense_attention

TOL = dict(atol=2e-5, rtol=1e-5)


def random_qkv(batch, q_len, kv_len, heads, kv_heads, dim, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  shapes = [
    (batch, q_len, heads, dim),
    (batch, kv_len, kv_heads, dim),
    (batch, kv_len, kv_heads, dim),
  ]
  q, k, v, dout = (
    jnp.asarray(rng.standard_normal(shape, np.float32), dtype) for shape in [*shapes, shapes[0]]
  )
  return q, k, v, dout


def packed(lengths):
  """Positions restarting at 0 in each document, and segment ids 1, 2, ...: one row [L]."""
  positions = np.concatenate([np.arange(n) for n in lengths]).astype(np.int32)
  segment_ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)]).astype(np.int32)
  return positions, segment_ids


@functools.partial(jax.jit, static_argnums=0)
def out_and_grads(attend, q, k, v, dout, q_pos, kv_pos, q_seg, kv_seg):
  """attention(q, k, v) and the gradient of sum(attention * dout) w.r.t. q, k, v."""

  def run(q, k, v):
    return attend(q, k, v, q_pos, kv_pos, q_seg, kv_seg)

  out, vjp = jax.vjp(run, q, k, v)
  return (out, *vjp(dout.astype(out.dtype)))


def assert_matches_dense(q, k, v, dout, q_pos, kv_pos, q_seg, kv_seg, tol=TOL, **blocks):
  args = (q, k, v, dout, *(jnp.asarray(x) for x in (q_pos, kv_pos, q_seg, kv_seg)))
  attend = functools.partial(blockwise_attention, **blocks)
  got = out_and_grads(attend, *args)
  want = out_and_grads(dense_attention, *(x.astype(jnp.float32) for x in args[:4]), *args[4:])
  for name, g, w in zip(('out', 'dq', 'dk', 'dv'), got, want):
    assert g.dtype == q.dtype, name
    np.testing.assert_allclose(np.float32(g), np.float32(w), err_msg=name, **tol)
  return got


@pytest.mark.parametrize(
  'heads,kv_heads,length,block_q,block_kv',
  [
    (8, 1, 64, 16, 16),  # block multiples, 4 x 4 blocks
    (4, 2, 70, 16, 32),  # neither length a block multiple
    (2, 2, 45, 32, 16),
  ],
)
def test_causal_matches_dense(heads, kv_heads, length, block_q, block_kv):
  q, k, v, dout = random_qkv(2, length, length, heads, kv_heads, 16)
  positions = np.tile(np.arange(length, dtype=np.int32), (2, 1))
  ones = np.ones_like(positions)
  assert_matches_dense(
    q, k, v, dout, positions, positions, ones, ones, block_q=block_q, block_kv=block_kv
  )


def test_packed_row_equals_its_documents():
  """A row of 4 documents of 24 tokens (crossing the 16-token blocks) against the same
  documents each alone in its own row."""
  q, k, v, dout = random_qkv(1, 96, 96, 4, 2, 16, seed=1)
  positions, segment_ids = packed([24] * 4)
  row = assert_matches_dense(
    q,
    k,
    v,
    dout,
    positions[None],
    positions[None],
    segment_ids[None],
    segment_ids[None],
    block_q=16,
    block_kv=16,
  )
  alone = out_and_grads(
    functools.partial(blockwise_attention, block_q=16, block_kv=16),
    *(x.reshape(4, 24, *x.shape[2:]) for x in (q, k, v, dout)),
    *(jnp.tile(jnp.arange(24, dtype=jnp.int32), (4, 1)),) * 2,
    *(jnp.ones((4, 24), jnp.int32),) * 2,
  )
  for name, g, w in zip(('out', 'dq', 'dk', 'dv'), row, alone):
    np.testing.assert_allclose(g.reshape(w.shape), w, err_msg=name, **TOL)


def test_queries_offset_from_keys():
  """A context-parallel shard: 24 local queries at positions 40..63 against keys 0..79."""
  q, k, v, dout = random_qkv(2, 24, 80, 4, 1, 16, seed=2)
  kv_pos = np.tile(np.arange(80, dtype=np.int32), (2, 1))
  q_pos = kv_pos[:, 40:64]
  kv_seg = np.ones_like(kv_pos)
  kv_seg[1, :50] = 7  # row 1: two documents, the boundary inside the local queries
  assert_matches_dense(
    q, k, v, dout, q_pos, kv_pos, kv_seg[:, 40:64], kv_seg, block_q=8, block_kv=16
  )


def test_permuted_positions():
  """Zigzag order for 2 shards (chunks 0,3 | 1,2) and a random permutation, with documents."""
  length = 64
  positions, segment_ids = packed([20, 30, 14])
  chunks = np.arange(length).reshape(4, 16)
  zigzag = np.concatenate([chunks[0], chunks[3], chunks[1], chunks[2]])
  shuffle = np.random.default_rng(3).permutation(length)
  perm = np.stack([zigzag, shuffle])
  q, k, v, dout = random_qkv(2, length, length, 4, 2, 16, seed=3)
  assert_matches_dense(
    q,
    k,
    v,
    dout,
    positions[perm],
    positions[perm],
    segment_ids[perm],
    segment_ids[perm],
    block_q=16,
    block_kv=16,
  )


def test_query_without_keys_gets_zeros():
  """Queries whose document has no key (or only later keys) output 0 and get 0 gradient."""
  q, k, v, dout = random_qkv(1, 32, 32, 2, 1, 16, seed=4)
  q_pos = np.arange(32, dtype=np.int32)[None]
  kv_pos = q_pos + 8  # queries 0..7 precede every key
  q_seg = np.ones_like(q_pos)
  q_seg[0, 24:] = 5  # and no key has segment 5
  out, dq, _, _ = assert_matches_dense(
    q, k, v, dout, q_pos, kv_pos, q_seg, np.ones_like(q_pos), block_q=8, block_kv=8
  )
  blind = np.r_[0:8, 24:32]
  assert not np.any(out[0, blind]) and not np.any(dq[0, blind])


def test_bf16_inputs():
  q, k, v, dout = random_qkv(2, 100, 100, 8, 1, 32, seed=5, dtype=jnp.bfloat16)
  positions, segment_ids = packed([60, 40])
  pos, seg = np.tile(positions, (2, 1)), np.tile(segment_ids, (2, 1))
  # bf16 rounding of the probabilities and of dS, against the fp32 reference
  assert_matches_dense(
    q, k, v, dout, pos, pos, seg, seg, tol=dict(atol=3e-2, rtol=3e-2), block_q=32, block_kv=32
  )


def test_default_blocks_and_sharded():
  """Default block sizes (longer than the sequence), under jit with batch and heads sharded."""
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ('data', 'tensor'))
  q, k, v, dout = random_qkv(2, 40, 40, 8, 4, 16, seed=6)
  positions, segment_ids = packed([25, 15])
  pos, seg = (jnp.asarray(np.tile(x, (2, 1))) for x in (positions, segment_ids))
  heads, rows = NamedSharding(mesh, P('data', None, 'tensor')), NamedSharding(mesh, P('data'))
  args = [jax.device_put(x, heads) for x in (q, k, v, dout)]
  args += [jax.device_put(x, rows) for x in (pos, pos, seg, seg)]
  got = out_and_grads(blockwise_attention, *args)
  want = out_and_grads(dense_attention, q, k, v, dout, pos, pos, seg, seg)
  for g, w in zip(got, want):
    assert tuple(g.sharding.spec)[:3] == ('data', None, 'tensor')
    np.testing.assert_allclose(g, w, **TOL)


def test_skips_blocks_no_query_can_see():
  """The tiles the loops visit: [query block, key block] -> visited, from the block table."""

  def visits(q_pos, kv_pos, q_seg, kv_seg, block):
    q_len, kv_len = q_pos.shape[1], kv_pos.shape[1]
    blocks = jax.jit(blockwise._to_blocks, static_argnums=(0, 1))(
      block,
      block,
      jnp.zeros((q_pos.shape[0], q_len, 1, 8)),
      jnp.zeros((kv_pos.shape[0], kv_len, 1, 8)),
      jnp.zeros((kv_pos.shape[0], kv_len, 1, 8)),
      *(jnp.asarray(x, jnp.int32) for x in (q_pos, kv_pos, q_seg, kv_seg)),
    )
    table = np.zeros((blocks.count_N.shape[0], blocks.order_NxM.shape[1]), bool)
    for i, (count, order) in enumerate(zip(blocks.count_N, blocks.order_NxM)):
      table[i, order[:count]] = True
    return table

  causal = np.arange(64)[None]
  ones = np.ones_like(causal)
  # causal self-attention: the lower triangle, 10 of 16 tiles
  np.testing.assert_array_equal(visits(causal, causal, ones, ones, 16), np.tri(4, dtype=bool))
  # the same keys, queries 40..63 of a context-parallel shard: key blocks up to theirs only
  table = visits(causal[:, 40:], causal, ones[:, 40:], ones, 8)
  np.testing.assert_array_equal(table.sum(1), [6, 7, 8])
  # two documents of 32: the off-diagonal document pair is skipped as well, 6 of 16 tiles
  positions, segment_ids = packed([32, 32])
  want = np.kron(np.eye(2), np.tri(2)).astype(bool)
  np.testing.assert_array_equal(
    visits(positions[None], positions[None], segment_ids[None], segment_ids[None], 16), want
  )
  # a key block of document 2 later than every document-2 query of a block (lexicographic
  # test): query block 1 holds document 1's end and document 2's start (tokens 24..31 ->
  # positions 0..7), key block 2 holds document 2's positions 8..15
  positions, segment_ids = packed([24, 40])
  table = visits(positions[None], positions[None], segment_ids[None], segment_ids[None], 16)
  assert not table[1, 2] and table[1].sum() == 2


def test_memory_is_linear_in_length():
  """fwd+bwd temp memory from compiling at 2K and 4K tokens: blockwise ~2x, dense ~4x."""

  def temp_bytes(attend, length):
    def loss(q, k, v, positions, segment_ids):
      return jnp.sum(attend(q, k, v, positions, positions, segment_ids, segment_ids))

    q = jax.ShapeDtypeStruct((1, length, 4, 32), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, length, 1, 32), jnp.float32)
    ints = jax.ShapeDtypeStruct((1, length), jnp.int32)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return grad.lower(q, kv, kv, ints, ints).compile().memory_analysis().temp_size_in_bytes

  attend = functools.partial(blockwise_attention, block_q=64, block_kv=64)
  small, large = temp_bytes(attend, 2048), temp_bytes(attend, 4096)
  dense_small, dense_large = temp_bytes(dense_attention, 2048), temp_bytes(dense_attention, 4096)
  # measured 1.93: linear buffers (lse, dK/dV, the output) plus a constant tile working set
  assert 1.8 < large / small < 2.2, (small, large)
  assert dense_large / dense_small > 3.5, (dense_small, dense_large)
  assert large < dense_large / 20
