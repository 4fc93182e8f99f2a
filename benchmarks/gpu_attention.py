"""Attention backends on one NVIDIA GPU: TFLOP/s forward + backward, and their agreement.

`python benchmarks/gpu_attention.py [--lengths=8192,65536 --heads=8 --kv_heads=1 --head_dim=128]`

K2-V2's per-device attention after tensor parallelism 8: 8 query heads, 1 KV head, head dim
128, bf16, one row. Times `pallas` (our kernel), `cudnn` (JAX's cuDNN) and `xla` (dense
reference, only where its [H, L, L] fp32 scores fit) on a causal row and on a row of packed
documents, and prints each backend's largest difference from the others' outputs and input
gradients. Needs only jax: k2jax's kernels are imported directly (the GPU image lacks flax).

FLOPs: causal attention forward = 2 matmuls x 2 x H x L^2 x D / 2 (half the scores are
masked), backward = 2.5x forward (5 matmuls), so fwd+bwd = 3.5x forward, FlashAttention's
convention; MFU elsewhere in k2jax counts 3x (docs/attention.md).

`--allow_cpu --lengths=256` runs the same code on a CPU (Pallas interpreted) to check the
script itself; its timings mean nothing.
"""

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# The kernels import only jax (no flax), so this runs in a bare GPU image.
from k2jax.model.kernels.cudnn import cudnn_attention  # noqa: E402
from k2jax.model.kernels.pallas_gpu import pallas_attention  # noqa: E402
from k2jax.model.kernels.reference import dense_attention  # noqa: E402


def inputs(length, args, documents, seed=0):
  rng = np.random.default_rng(seed)
  shape_q = (1, length, args.heads, args.head_dim)
  shape_kv = (1, length, args.kv_heads, args.head_dim)
  q, k, v, d_out = (
    jnp.asarray(rng.normal(size=s), jnp.bfloat16) for s in (shape_q, shape_kv, shape_kv, shape_q)
  )
  if documents:  # documents of 1/8 to 1/2 of the row, positions restarting in each
    cuts = np.sort(rng.choice(np.arange(1, length), size=5, replace=False))
    segments = np.searchsorted(cuts, np.arange(length), side='right') + 1
    starts = np.concatenate([[0], cuts])[segments - 1]
    positions = np.arange(length) - starts
  else:
    segments, positions = np.ones(length), np.arange(length)
  positions = jnp.asarray(positions[None], jnp.int32)
  segments = jnp.asarray(segments[None], jnp.int32)
  return (q, k, v, positions, positions, segments, segments), d_out


def fwd_bwd(fn):
  def run(args, d_out):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, *args[3:]), *args[:3])
    return out, vjp(d_out)

  return jax.jit(run)


def timed(step, args, d_out, reps):
  result = jax.block_until_ready(step(args, d_out))  # compile + warm up
  start = time.perf_counter()
  for _ in range(reps):
    jax.block_until_ready(step(args, d_out))
  return (time.perf_counter() - start) / reps, result


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--lengths', default='8192,65536')
  parser.add_argument('--heads', type=int, default=8)
  parser.add_argument('--kv_heads', type=int, default=1)
  parser.add_argument('--head_dim', type=int, default=128)
  parser.add_argument('--reps', type=int, default=5)
  parser.add_argument('--xla_max_length', type=int, default=16384, help='dense reference up to')
  parser.add_argument('--allow_cpu', action='store_true')
  args = parser.parse_args(argv)
  device = jax.devices()[0]
  if device.platform != 'gpu' and not args.allow_cpu:
    sys.exit(f'error: needs an NVIDIA GPU, found {device.platform} (--allow_cpu to smoke-test)')
  print(
    f'{device.device_kind}, jax {jax.__version__}; {args.heads} query heads, '
    f'{args.kv_heads} KV head(s), head dim {args.head_dim}, bf16, batch 1'
  )

  backends = {'pallas': pallas_attention, 'cudnn': cudnn_attention, 'xla': dense_attention}
  header = (
    f'{"length":>7} {"rows":>9} {"backend":>8} {"ms":>9} {"TFLOP/s":>8}  max |diff| vs pallas'
  )
  print(header)
  print('-' * len(header))
  for length in (int(x) for x in args.lengths.split(',')):
    flops = 3.5 * 2 * 2 * args.heads * length * length * args.head_dim / 2
    for documents in (False, True):
      call_args, d_out = inputs(length, args, documents)
      results = {}
      for name, fn in backends.items():
        if name == 'xla' and length > args.xla_max_length:
          continue
        if name == 'cudnn':
          fn = functools.partial(fn, documents=documents)
        try:
          seconds, results[name] = timed(fwd_bwd(fn), call_args, d_out, args.reps)
        except Exception as error:  # noqa: BLE001 - report the backend's failure and go on
          print(
            f'{length:>7} {"documents" if documents else "causal":>9} {name:>8} failed: '
            f'{type(error).__name__}: {str(error).splitlines()[0][:120]}'
          )
          continue
        diff = ''
        if name != 'pallas' and 'pallas' in results:
          leaves = zip(jax.tree.leaves(results[name]), jax.tree.leaves(results['pallas']))
          diff = max(
            float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
            for a, b in leaves
          )
          diff = f'{diff:.3g}'
        print(
          f'{length:>7} {"documents" if documents else "causal":>9} {name:>8} '
          f'{seconds * 1e3:9.2f} {flops / seconds / 1e12:8.1f}  {diff}'
        )


if __name__ == '__main__':
  main()
