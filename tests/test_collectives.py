"""k2jax.parallel.collectives: bytes per device from compiled programs equal the closed forms."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from k2jax.parallel import collectives

DATA, TENSOR = 4, 2
F32 = 4


@pytest.fixture(scope='module')
def mesh():
  return jax.make_mesh((DATA, TENSOR), ('data', 'tensor'), axis_types=(AxisType.Explicit,) * 2)


def rows(fn, mesh, *args, **jit):
  text = jax.jit(fn, **jit).lower(*args).compile().as_text()
  return collectives.summarize(text, dict(mesh.shape))['rows']


def only(table, kind):
  found = [r for r in table if r['kind'] == kind]
  assert len(found) == 1, table
  return found[0]


def spec(mesh, shape, *axes):
  return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, P(*axes)))


def test_all_gather_over_data(mesh):
  x = spec(mesh, (64, 32), 'data', None)
  table = rows(lambda x: x * 2, mesh, x, out_shardings=NamedSharding(mesh, P()))
  row = only(table, 'all-gather')
  assert row['axes'] == ['data'] and row['group_size'] == DATA and row['runs'] == 1
  # (n - 1) / n of the gathered output.
  assert row['bytes'] == (DATA - 1) / DATA * 64 * 32 * F32


def shard_map(fn, mesh, in_spec, out_spec):
  return jax.shard_map(fn, mesh=mesh, in_specs=in_spec, out_specs=out_spec)


def test_all_reduce_over_tensor(mesh):
  x = spec(mesh, (16, 8 * TENSOR), None, 'tensor')
  fn = shard_map(lambda b: jax.lax.psum(b, 'tensor'), mesh, P(None, 'tensor'), P())
  row = only(rows(fn, mesh, x), 'all-reduce')
  assert row['axes'] == ['tensor'] and row['group_size'] == TENSOR
  assert row['bytes'] == 2 * (TENSOR - 1) / TENSOR * 16 * 8 * F32


def test_reduce_scatter_over_data(mesh):
  x = spec(mesh, (DATA * 16, 8), 'data', None)
  fn = shard_map(
    lambda b: jax.lax.psum_scatter(b, 'data', scatter_dimension=0, tiled=True),
    mesh,
    P('data', None),
    P('data', None),
  )
  row = only(rows(fn, mesh, x), 'reduce-scatter')
  assert row['axes'] == ['data'] and row['group_size'] == DATA
  # The input on each device is [16, 8]; it sends (n - 1) / n of it.
  assert row['bytes'] == (DATA - 1) / DATA * 16 * 8 * F32


def test_collective_permute_ring(mesh):
  x = spec(mesh, (DATA * 4, 8), 'data', None)
  ring = [(i, (i + 1) % DATA) for i in range(DATA)]
  fn = shard_map(lambda b: jax.lax.ppermute(b, 'data', ring), mesh, P('data'), P('data'))
  row = only(rows(fn, mesh, x), 'collective-permute')
  assert row['axes'] == ['data']
  assert row['bytes'] == 4 * 8 * F32  # every device sends its whole block once


def test_loop_trip_count_multiplies(mesh):
  layers = 5
  w = spec(mesh, (layers, 32, 32), None, 'data', None)
  x = spec(mesh, (8, 32), None, None)

  def fn(w, x):
    def body(h, w_l):
      w_l = jax.sharding.reshard(w_l, NamedSharding(mesh, P()))  # gathered per layer, as FSDP
      return jnp.tanh(h @ w_l), None

    return jax.lax.scan(body, x, w)[0]

  row = only(rows(fn, mesh, w, x), 'all-gather')
  assert row['axes'] == ['data'] and row['runs'] == layers
  assert row['bytes'] == layers * (DATA - 1) / DATA * 32 * 32 * F32


def test_array_bytes():
  assert collectives.array_bytes('f32[8,16]{1,0}') == 512
  assert collectives.array_bytes('(bf16[4]{0}, s32[], f8e4m3fn[10]{0}, token[])') == 8 + 4 + 10
  assert collectives.array_bytes('pred[64,64]{1,0}') == 4096


def test_sent_bytes_closed_forms():
  assert collectives.sent_bytes('all-gather', 8, 800) == 700
  assert collectives.sent_bytes('reduce-scatter', 8, 800) == 700
  assert collectives.sent_bytes('all-reduce', 8, 800) == 1400
  assert collectives.sent_bytes('all-to-all', 4, 400) == 300
  assert collectives.sent_bytes('all-reduce', 1, 800) == 0


# A GPU-style module by hand: an async all-gather in an 80-trip loop (counted once per trip,
# not twice for start and done), a reduce-scatter wrapped by async-start / async-done
# (counted once), an iota-grouped all-reduce feeding only a dynamic-slice (a reduce-scatter
# on GPU), promoted from bf16, and explicit groups.
HAND_MODULE = """HloModule hand, num_partitions=8

%add_promoted (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%add (c: f32[], d: f32[]) -> f32[] {
  %c = f32[] parameter(0)
  %d = f32[] parameter(1)
  ROOT %e = f32[] add(%c, %d)
}

%wrapped_rs (v: f32[64]) -> f32[16] {
  %v = f32[64]{0} parameter(0)
  ROOT %rs = f32[16]{0} reduce-scatter(%v), replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}, to_apply=%add
}

%body (p: (s32[], bf16[128])) -> (s32[], bf16[128]) {
  %p = (s32[], bf16[128]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %w = bf16[128]{0} get-tuple-element(%p), index=1
  %ags = (bf16[128]{0}, bf16[1024]{0}) all-gather-start(%w), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}
  %agd = bf16[1024]{0} all-gather-done(%ags)
  ROOT %t = (s32[], bf16[128]{0}) tuple(%i, %w)
}

%cond (q: (s32[], bf16[128])) -> pred[] {
  %q = (s32[], bf16[128]{0}) parameter(0)
  %n = s32[] constant(80)
  %j = s32[] get-tuple-element(%q), index=0
  ROOT %lt = pred[] compare(%j, %n), direction=LT
}

ENTRY %main (x: bf16[128], g: bf16[64]) -> f32[32] {
  %x = bf16[128]{0} parameter(0)
  %g = bf16[64]{0} parameter(1)
  %zero = s32[] constant(0)
  %init = (s32[], bf16[128]{0}) tuple(%zero, %x)
  %loop = (s32[], bf16[128]{0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"80"}}
  %up = f32[64]{0} convert(%g)
  %rss = ((f32[64]{0}), f32[16]{0}) async-start(%up), calls=%wrapped_rs
  %rsd = f32[16]{0} async-done(%rss), calls=%wrapped_rs
  %ar = f32[64]{0} all-reduce(%up), channel_id=2, replica_groups=[4,2]<=[2,4]T(1,0), use_global_device_ids=true, to_apply=%add_promoted
  %off = s32[] constant(0)
  ROOT %ds = f32[32]{0} dynamic-slice(%ar, %off), dynamic_slice_sizes={32}
  %ar2 = f32[16]{0} all-reduce(%up), channel_id=3, replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add_promoted
}
"""


def test_hand_written_module():
  mesh_shape = {'data': 2, 'tensor': 4}
  found, loops = collectives.collectives(HAND_MODULE, mesh_shape)
  assert not loops
  by_name = {op.name: op for op in found}
  assert set(by_name) == {'ags', 'ar', 'ar2', 'rs'}  # no -done, the async-start by its op
  gather = by_name['ags']
  assert gather.kind == 'all-gather' and gather.runs == 80 and gather.axes == ('data', 'tensor')
  assert gather.bytes == 80 * 7 * 128 * 2  # (n - 1) x the 256-byte bf16 operand
  ar = by_name['ar']
  # [4,2]<=[2,4]T(1,0): groups {0,4},{1,5},...: partitions 4 apart differ in `data`.
  assert ar.axes == ('data',) and ar.group_size == 2
  assert ar.sliced == 1.0 and ar.promoted
  assert ar.bytes == 2 * 1 / 2 * 64 * 4
  # On GPU: a reduce-scatter (half), in bf16 (half again).
  assert collectives.gpu_bytes(ar) == 1 / 2 * 64 * 4 / 2
  assert by_name['ar2'].axes == ('tensor',) and by_name['ar2'].sliced == 0.0
  scatter = by_name['rs']
  assert scatter.kind == 'reduce-scatter' and scatter.runs == 1 and not scatter.promoted
  assert scatter.axes == ('tensor',) and scatter.bytes == 3 / 4 * 64 * 4


@pytest.mark.parametrize(
  'text, groups',
  [
    ('{{0,2},{1,3}}', [[0, 2], [1, 3]]),
    ('[2,2]<=[4]', [[0, 1], [2, 3]]),
    ('[2,2]<=[2,2]T(1,0)', [[0, 2], [1, 3]]),
    ("mesh['axis_0'=2,'axis_1'=2] {'axis_0'}", [[0, 2], [1, 3]]),
    ("mesh['axis_0'=2,'axis_1'=2], device_ids=([2,2]T(1,0)) {'axis_1'}", [[0, 2], [1, 3]]),
    # Sub-axis (pre)size: (1)2 is the major half of 'a', (2)2 the minor one.
    ("mesh['a'=4] {'a':(1)2}", [[0, 2], [1, 3]]),
    ("mesh['a'=4] {'a':(2)2}", [[0, 1], [2, 3]]),
    ('{}', [[0, 1, 2, 3]]),
  ],
)
def test_replica_group_spellings(text, groups):
  parsed = collectives.replica_groups(f'replica_groups={text}, dimensions={{0}}', 4)
  assert sorted(map(sorted, parsed.tolist())) == groups


def test_group_axes():
  shape = {'data': 2, 'tensor': 4}
  assert collectives.group_axes([0, 1, 2, 3], shape) == ('tensor',)
  assert collectives.group_axes([1, 5], shape) == ('data',)
  assert collectives.group_axes(list(range(8)), shape) == ('data', 'tensor')
  assert collectives.group_axes([0, 1], shape) == ('tensor/2',)


def test_rescale_reprices_the_group():
  row = {'kind': 'all-gather', 'axes': ['data'], 'group_size': 8, 'gpu_bytes': 7.0}
  compiled, real = {'data': 8, 'tensor': 8}, {'data': 400, 'tensor': 8}
  assert collectives.rescale(row, compiled, real) == pytest.approx(8 * 399 / 400)
  assert collectives.rescale(row, compiled, compiled) == pytest.approx(7.0)
  tensor = dict(row, axes=['tensor'])
  assert collectives.rescale(tensor, compiled, real) == pytest.approx(7.0)
