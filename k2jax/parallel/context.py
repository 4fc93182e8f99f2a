"""Attention on the mesh, context parallelism included.

Each device computes attention for its own batch rows and heads. When the activation length
is split (`mesh.sequence > 1`), it also holds only its own slice of the queries: it
all-gathers K, V and their positions and segment ids along the length axes and runs the
backend on its local queries against every key of the row. Autodiff turns the all-gathers
into reduce-scatters of dK and dV. K/V keep their own (after tensor parallelism, often a
single) head: at 524,288 tokens one KV head of K and V is 256 MiB in bf16, which is why
gathering beats a ring here (docs/long_context.md).

The rows arrive in zigzag order (data_pipeline/load_balance.py), so each shard's queries are
a short and a long chunk of the row and every shard does the same causal work; masks come
from the positions, which travel with the tokens, so nothing is un-permuted.

Backends XLA partitions itself (`xla`, `blockwise`) are left to it when the length is whole;
custom calls (`pallas`, `cudnn`) always run under `shard_map`, which XLA cannot see into.
"""

import flax.linen as nn
import jax
from jax import lax
from jax.sharding import PartitionSpec

from k2jax.parallel import sharding

_QUERY = ('activation_batch', 'activation_length', 'activation_heads', None)
_KEY = ('activation_batch', 'activation_length', 'activation_kv_heads', None)
_TOKENS = ('activation_batch', 'activation_length')
IN_AXES = (_QUERY, _KEY, _KEY, _TOKENS, _TOKENS, _TOKENS, _TOKENS)


def shard_attention(fn, *, custom_call: bool):
  """`fn` (the attention contract of kernels/reference.py) laid out on the current mesh."""

  def attend(*args):
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
      return fn(*args)
    rules = dict(nn.get_logical_axis_rules())
    length_axes = tuple(
      a for a in sharding.mesh_axes(rules, 'activation_length') if mesh.shape[a] > 1
    )
    if not length_axes and not custom_call:
      return fn(*args)
    # A dimension that does not divide its mesh axes (the one-row batch of shape inference)
    # stays whole; the length always divides (sharding.check_activations).
    whole = set()
    for arg, axes in zip(args, IN_AXES):
      for size, name in zip(arg.shape, axes):
        if name and size % sharding.split_count(mesh, rules, name):
          whole.add(name)

    if 'activation_length' in whole:  # each device then holds whole rows: nothing to gather
      length_axes = ()

    def spec(axes):
      return PartitionSpec(*nn.logical_to_mesh_axes(tuple(None if a in whole else a for a in axes)))

    def local(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids):
      if length_axes:
        k, v, kv_positions, kv_segment_ids = (
          lax.all_gather(x, length_axes, axis=1, tiled=True)
          for x in (k, v, kv_positions, kv_segment_ids)
        )
      return fn(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids)

    return jax.shard_map(
      local,
      in_specs=tuple(spec(axes) for axes in IN_AXES),
      out_specs=spec(_QUERY),
      # Pallas outputs carry no varying-manual-axes type in this JAX (long_context.md §2).
      check_vma=False,
    )(*args)

  return attend
