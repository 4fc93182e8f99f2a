"""How long an async save blocks the training loop, against a synchronous save; restore time.

    python benchmarks/checkpoint.py [--hidden=768 --layers=10 --reps=3 --dir=/tmp/k2jax_ckpt_bench]

The state is a real k2jax train state (parameters and AdamW moments, fp32) of a ~100M-parameter
K2-V2-shaped model on one CPU device, saved through k2jax/training/checkpoint.py's `Checkpoints` (the
class the trainer uses): `save` returns once the arrays are copied off the devices, and the
write continues in the background. Measured per repetition:

  async blocking   the time `save` blocks the loop (the goal: at most 10% of a sync save)
  async total      until the background write is committed
  sync save        the same save with Orbax's async checkpointing off
  restore          `restore` of the newest step onto the plan's shardings

Use the repo's virtualenv (`.venv/bin/python`); the figures depend on the disk under --dir.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from configs import pretrain  # noqa: E402
from k2jax.parallel import sharding
from k2jax.training import checkpoint, train_step


class _NoData:
  """The data position saved with each step (a real run saves Grain's)."""

  def get_state(self):
    return {'position': 0}

  def set_state(self, state):
    del state

  def start_prefetch(self):  # what Grain's restore handler calls after set_state
    pass


def _config(args):
  cfg = pretrain.get_config('debug')
  cfg.model.preset = 'debug'
  cfg.model.vocab_size = 16_000
  cfg.model.num_layers = args.layers
  for key, value in dict(
    hidden_size=args.hidden,
    ffn_size=int(args.hidden * 3.5 // 64 * 64),
    num_heads=args.hidden // 64,
    num_kv_heads=max(1, args.hidden // 256),
    head_dim=64,
  ).items():
    cfg.model[key] = value
  cfg.data.seq_len = 128
  cfg.data.global_batch_size = 1
  cfg.mesh.data = 1
  cfg.checkpoint.every = 1
  cfg.checkpoint.keep = 2
  cfg.checkpoint.keep_every = 0
  return cfg


def _time_saves(cfg, plan, state, directory, asynchronous, reps):
  shutil.rmtree(directory, ignore_errors=True)
  checkpoints = checkpoint.Checkpoints(directory, cfg, asynchronous=asynchronous)
  blocking, total = [], []
  for rep in range(reps + 1):  # the first save also creates the directories: not timed
    start = time.perf_counter()
    checkpoints.save(rep + 1, state, _NoData())
    blocked = time.perf_counter() - start
    checkpoints.wait()
    if rep:
      blocking.append(blocked)
      total.append(time.perf_counter() - start)
  restore = []
  for _ in range(reps):
    start = time.perf_counter()
    restored = checkpoints.restore(reps + 1, plan, _NoData())
    jax.block_until_ready(restored)
    restore.append(time.perf_counter() - start)
  checkpoints.close()
  return statistics.median(blocking), statistics.median(total), statistics.median(restore)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--hidden', type=int, default=768)
  parser.add_argument('--layers', type=int, default=10)
  parser.add_argument('--reps', type=int, default=3)
  parser.add_argument('--dir', default='/tmp/k2jax_ckpt_bench')
  parser.add_argument('--output', choices=('text', 'json'), default='text')
  args = parser.parse_args()

  cfg = _config(args)
  plan = train_step.plan(cfg, devices=jax.devices()[:1])
  with sharding.activate(plan.mesh, False):
    init = jax.jit(
      train_step.make_init_fn(plan.model, plan.tx, cfg.data.seq_len),
      out_shardings=plan.state_sharding,
    )
    state = jax.block_until_ready(init(jax.random.key(0)))
    params = plan.model_cfg.param_count()
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    async_block, async_total, restore = _time_saves(
      cfg, plan, state, os.path.join(args.dir, 'async'), True, args.reps
    )
    sync_block, sync_total, _ = _time_saves(
      cfg, plan, state, os.path.join(args.dir, 'sync'), False, args.reps
    )
  shutil.rmtree(args.dir, ignore_errors=True)
  ratio = async_block / sync_block
  result = dict(
    params=params,
    state_gib=state_bytes / 2**30,
    async_blocking_sec=async_block,
    async_total_sec=async_total,
    sync_save_sec=sync_block,
    restore_sec=restore,
    blocking_ratio=ratio,
    goal_met=ratio <= 0.10,
  )
  if args.output == 'json':
    print(json.dumps(result))
    return
  print(
    f'state: {params / 1e6:.1f}M parameters + AdamW moments = {result["state_gib"]:.2f} GiB '
    f'(fp32), {jax.devices()[0].platform}, median of {args.reps}'
  )
  print(f'{"":24}{"seconds":>10}')
  print(f'{"async save, blocking":24}{async_block:>10.3f}')
  print(f'{"async save, committed":24}{async_total:>10.3f}')
  print(f'{"sync save":24}{sync_block:>10.3f}')
  print(f'{"restore":24}{restore:>10.3f}')
  print(
    f'async blocking / sync save = {ratio:.1%} (goal <= 10%: '
    f'{"met" if result["goal_met"] else "NOT met"})'
  )


if __name__ == '__main__':
  main()
