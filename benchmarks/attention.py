"""Memory and time of one attention layer's forward + backward: `xla` (dense) vs `blockwise`.

  python benchmarks/attention.py [--lengths=256,512,...,65536] [--time_max=16384]
                                 [--dtype=float32|bfloat16] [--reps=3]
                                 [--block_q=N --block_kv=N] [--backends=xla,blockwise]

The attention core alone at K2-V2's per-device shape (batch 1, 8 query heads on 1 KV head,
head dim 128; TP8 leaves one KV head per device), causal over one document: positions 0..L-1,
one segment. What is compiled and timed is dq, dk, dv = grad of sum(attention(q, k, v) * dout),
the forward and the backward of one layer, on one CPU device.

Memory is the compiled program's `temp_size_in_bytes` (the working memory besides the inputs
q, k, v, dout and the outputs dq, dk, dv, which are the same for both backends). It comes from
compiling, so it is given at every length, also where the program could not run here. Time is
the median of --reps runs (more for short runs: at least 1 s in all, up to 50) after one
warm-up, measured only up to --time_max tokens and only where inputs + outputs + temp fit in half
of this machine's available memory; otherwise '-'. `others` is how many cores other processes
kept busy meanwhile (on a shared machine, trust the ratios more than the times).

float32 by default, the CPU path: XLA:CPU converts bf16 matmul operands to f32, so
--dtype=bfloat16 is for the memory columns (with --time_max=0), not for CPU times.
"""

import os
import re

# One real CPU device: drop the test suite's simulated devices before jax is imported.
os.environ['XLA_FLAGS'] = re.sub(
  r'--xla_force_host_platform_device_count=\S+', '', os.environ.get('XLA_FLAGS', '')
)
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import argparse  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from k2jax.model.kernels import blockwise  # noqa: E402
from k2jax.model.kernels.reference import dense_attention  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 8, 1, 128


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument(
    '--lengths', default=','.join(str(256 << i) for i in range(9)), help='tokens per row'
  )
  parser.add_argument('--time_max', type=int, default=16384, help='time only up to this length')
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--reps', type=int, default=3)
  parser.add_argument('--block_q', type=int, default=blockwise.DEFAULT_BLOCK_Q)
  parser.add_argument('--block_kv', type=int, default=blockwise.DEFAULT_BLOCK_KV)
  parser.add_argument('--backends', default='xla,blockwise')
  return parser.parse_args()


def available_bytes() -> float:
  with open('/proc/meminfo') as f:
    info = dict(line.split(':', 1) for line in f)
  return float(info['MemAvailable'].split()[0]) * 1024


def busy_seconds() -> float:
  """CPU seconds all processes spent busy since boot (/proc/stat), to tell others' load."""
  with open('/proc/stat') as f:
    fields = [float(x) for x in f.readline().split()[1:]]
  user, nice, system, _, _, irq, softirq, steal = fields[:8]
  return (user + nice + system + irq + softirq + steal) / os.sysconf('SC_CLK_TCK')


def own_seconds() -> float:
  times = os.times()
  return times.user + times.system


def fwd_bwd(attend):
  """(q, k, v, dout, positions, segment ids) -> (dq, dk, dv), jitted."""

  def loss(q, k, v, dout, positions, segment_ids):
    out = attend(q, k, v, positions, positions, segment_ids, segment_ids)
    return jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32))

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def shapes(length, dtype):
  q = jax.ShapeDtypeStruct((1, length, HEADS, HEAD_DIM), dtype)
  kv = jax.ShapeDtypeStruct((1, length, KV_HEADS, HEAD_DIM), dtype)
  ints = jax.ShapeDtypeStruct((1, length), jnp.int32)
  return q, kv, kv, q, ints, ints


def inputs(length, dtype, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v, dout = (
    jnp.asarray(rng.standard_normal(s.shape, np.float32), dtype) for s in shapes(length, dtype)[:4]
  )
  positions = jnp.arange(length, dtype=jnp.int32)[None]
  return q, k, v, dout, positions, jnp.ones_like(positions)


def measure(attend, length, dtype, args):
  """(temp bytes, median seconds or None, note, cores other processes kept busy meanwhile)."""
  compiled = fwd_bwd(attend).lower(*shapes(length, dtype)).compile()
  memory = compiled.memory_analysis()
  temp = memory.temp_size_in_bytes
  need = temp + memory.argument_size_in_bytes + memory.output_size_in_bytes
  if length > args.time_max:
    return temp, None, 'over --time_max', None
  if need > 0.5 * available_bytes():
    return temp, None, f'needs {need / 2**30:.1f} GiB', None
  data = inputs(length, dtype)
  start = time.perf_counter()
  jax.block_until_ready(compiled(*data))  # warm-up
  reps = max(args.reps, min(50, int(1.0 / (time.perf_counter() - start))))
  times = []
  busy, own = busy_seconds(), own_seconds()
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*data))
    times.append(time.perf_counter() - start)
  others = (busy_seconds() - busy - (own_seconds() - own)) / sum(times)
  del data
  return temp, statistics.median(times), '', max(others, 0.0)


def main():
  args = parse_args()
  dtype = jnp.dtype(args.dtype)
  lengths = [int(x) for x in args.lengths.split(',')]
  attends = {
    'xla': dense_attention,
    'blockwise': functools.partial(
      blockwise.blockwise_attention, block_q=args.block_q, block_kv=args.block_kv
    ),
  }
  names = args.backends.split(',')
  print(
    f'one attention layer fwd+bwd: batch 1, {HEADS} query heads / {KV_HEADS} KV head x '
    f'{HEAD_DIM}, causal, {args.dtype}; blockwise blocks {args.block_q} x {args.block_kv}; '
    f'jax {jax.__version__}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; '
    f'{datetime.date.today()}'
  )
  print('memory = compiled temp_size_in_bytes (MiB); x = growth per doubling; time = median ms')
  header = f'{"length":>7}'
  for name in names:
    header += f' {"mem " + name:>14} {"x":>5}'
  for name in names:
    header += f' {"ms " + name:>13}'
  if len(names) == 2:
    header += f' {"speedup":>8}'
  print(header + f' {"others":>6}', flush=True)
  previous, notes = {}, {}
  for length in lengths:
    results = {name: measure(attends[name], length, dtype, args) for name in names}
    row = f'{length:>7}'
    for name in names:
      temp = results[name][0]
      growth = f'{temp / previous[name]:.2f}' if previous.get(name) else '-'
      row += f' {temp / 2**20:>14,.1f} {growth:>5}'
      previous[name] = temp
    for name in names:
      seconds, note = results[name][1:3]
      row += f' {seconds * 1e3:>13,.1f}' if seconds is not None else f' {"-":>13}'
      if note:
        notes.setdefault(note, []).append(f'{name}@{length}')
    if len(names) == 2 and None not in (results[n][1] for n in names):
      row += f' {results[names[0]][1] / results[names[1]][1]:>7.2f}x'
    elif len(names) == 2:
      row += f' {"-":>8}'
    others = [results[name][3] for name in names if results[name][3] is not None]
    print(row + (f' {max(others):>6.2f}' if others else f' {"-":>6}'), flush=True)
  if len(names) == 2:
    print(f'speedup = time {names[0]} / time {names[1]} (> 1: {names[1]} faster)')
  for note, where in notes.items():
    print(f"'-' = not timed, {note}: {', '.join(where)}")
  print('others = cores that other processes kept busy while this row was timed (max)')
  print(f'load at the end {os.getloadavg()[0]:.2f}')


if __name__ == '__main__':
  main()
