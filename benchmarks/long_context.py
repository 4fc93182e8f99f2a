"""Long context on CPU: per-device memory and step time of the debug model as rows grow, at
context parallelism 1, 2, 4 and 8; then the 70B stage-3 and stage-4 planner rows.

  python benchmarks/long_context.py [--lengths=1024,2048,4096,8192] [--degrees=1,2,4,8]
                                    [--time_max=4096] [--no_70b]

Debug rows: configs/midtrain.py:stage3,debug (packed documents, best-fit) with one row per
step on `sequence` devices (data 1 × tensor 1 × sequence CP), `auto` attention (blockwise on
CPU). Memory is the compiled train step's per-device total (arguments + outputs − donated +
temporaries, XLA's memory_analysis); time is the median of 3 steps after a warm-up, up to
--time_max tokens. 70B rows: `python -m k2jax.estimate` on K2-V2's per-device meshes, data 1 ×
tensor 8 × sequence 2 (stage 3, 131,072 tokens) and × sequence 8 (stage 4, 524,288 tokens),
one row per data shard, against an H200's 141 GB (aim: ≤ 120 GiB); stage 3 also on data 4, where
FSDP shards the state over data too, as K2-V2's distributed optimizer did.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ['XLA_FLAGS'] = (
  re.sub(r'--xla_force_host_platform_device_count=\S+', '', os.environ.get('XLA_FLAGS', ''))
  + ' --xla_force_host_platform_device_count=8'
)
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, REPO)

H200_GIB = 141e9 / 2**30
TARGET_GIB = 120


def debug_row(length: int, degree: int, time_it: bool) -> dict:
  import jax
  import numpy as np

  from data_pipeline import load_balance
  from k2jax import run_config
  from k2jax.parallel import sharding
  from k2jax.training import train_step

  cfg = run_config.load(os.path.join(REPO, 'configs/midtrain.py:stage3,debug'))
  cfg.data.seq_len, cfg.data.global_batch_size = length, 1
  cfg.mesh.data, cfg.mesh.tensor, cfg.mesh.sequence = 1, 1, degree
  run = train_step.plan(cfg, devices=jax.devices()[:degree])
  rng = np.random.default_rng(0)
  sizes = [length // 4, length // 2, length - length // 4 - length // 2]  # three documents
  batch = {
    'inputs': rng.integers(0, 2048, (1, length)).astype(np.int32),
    'targets': rng.integers(0, 2048, (1, length)).astype(np.int32),
    'positions': np.concatenate([np.arange(n) for n in sizes])[None].astype(np.int32),
    'segment_ids': np.repeat(np.arange(1, 4), sizes)[None].astype(np.int32),
    'loss_mask': np.ones((1, length), np.float32),
  }
  batch = load_balance.reorder(batch, degree)
  with sharding.activate(run.mesh, cfg.mesh.fsdp):
    init = jax.jit(
      train_step.make_init_fn(run.model, run.tx, length), out_shardings=run.state_sharding
    )
    state = init(jax.random.key(0))
    batch = {k: jax.device_put(v, run.batch_sharding) for k, v in batch.items()}
    step = run.jit_train_step()
    compiled = step.lower(state, batch).compile()
    stats = compiled.memory_analysis()
    total = (
      stats.argument_size_in_bytes
      + stats.output_size_in_bytes
      - stats.alias_size_in_bytes
      + stats.temp_size_in_bytes
    )
    seconds = None
    if time_it:
      state, _ = compiled(state, batch)  # warm-up
      times = []
      for _ in range(3):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
      seconds = statistics.median(times)
  return dict(length=length, degree=degree, mib=total / 2**20, seconds=seconds)


def planner_row(stage: str, degree: int, data: int, fsdp: str | None = None) -> dict:
  command = [
    sys.executable,
    '-m',
    'k2jax.estimate',
    f'--config=configs/midtrain.py:{stage}',
    f'--devices={data * 8 * degree}',
    f'--mesh=data:{data},tensor:8,sequence:{degree}',
    f'--config.data.global_batch_size={data}',  # one row per data shard, as K2-V2's
    '--output=json',
    *([f'--config.mesh.fsdp={fsdp}'] if fsdp else []),  # else the stage config's mode
  ]
  env = dict(os.environ)
  env['XLA_FLAGS'] = re.sub(r'--xla_force_host_platform_device_count=\S+', '', env['XLA_FLAGS'])
  start = time.perf_counter()
  done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=True)
  result = json.loads(done.stdout)
  result['wall_seconds'] = time.perf_counter() - start
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--lengths', default='1024,2048,4096,8192')
  parser.add_argument('--degrees', default='1,2,4,8')
  parser.add_argument('--time_max', type=int, default=4096, help='time steps up to this length')
  parser.add_argument('--no_70b', action='store_true')
  args = parser.parse_args()
  degrees = [int(d) for d in args.degrees.split(',')]
  print('debug model (configs/midtrain.py:stage3,debug), one row, data 1 x tensor 1 x sequence CP')
  print('per-device MiB (compiled) | step seconds')
  print(f'{"tokens":>7} ' + ' '.join(f'{f"CP {d}":>18}' for d in degrees))
  for length in (int(x) for x in args.lengths.split(',')):
    cells = []
    for degree in degrees:
      row = debug_row(length, degree, length <= args.time_max)
      time_cell = '-' if row['seconds'] is None else f'{row["seconds"]:.2f}'
      cells.append(f'{row["mib"]:9.1f} | {time_cell:>5}')
    print(f'{length:>7} ' + ' '.join(f'{c:>18}' for c in cells), flush=True)
  if args.no_70b:
    return
  print()
  print('70B planner rows (k2jax.estimate; blockwise for the flash kernel, float16 for bfloat16)')
  print(
    f'{"stage":>7} {"tokens":>8} {"mesh":>24} {"fsdp":>10} {"state GiB":>10} {"temp GiB":>9} '
    f'{"total GiB":>10} {"fits H200":>10} {"compile s":>10}'
  )
  # One data shard's devices (K2-V2's per-device shapes), in the stage config's mode (ZeRO-1
  # over its group of data shards) and in `full`, which on data 1 still shards the weights and
  # the optimizer state over the 16 / 64 devices of the row.
  rows = (
    ('stage3', 2, 1, 'optimizer'),
    ('stage3', 2, 1, 'full'),
    ('stage3', 2, 4, 'optimizer'),
    ('stage4', 8, 1, 'optimizer'),
    ('stage4', 8, 1, 'full'),
  )
  for stage, degree, data, fsdp in rows:
    r = planner_row(stage, degree, data, fsdp)
    memory = r['memory_per_device']
    total = memory['total'] / 2**30
    fits = 'yes' if total <= TARGET_GIB else ('tight' if total <= H200_GIB else 'NO')
    print(
      f'{stage:>7} {r["seq_len"]:>8,} {f"data {data} x tensor 8 x seq {degree}":>24} {fsdp:>10} '
      f'{r["state_bytes_per_device"]["total"] / 2**30:10.1f} {memory["temp"] / 2**30:9.1f} '
      f'{total:10.1f} {fits:>10} {r["compile_seconds"]:10.1f}',
      flush=True,
    )


if __name__ == '__main__':
  main()
