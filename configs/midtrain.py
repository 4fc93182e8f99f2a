"""K2-V2 mid-training on TxT360-Midas: four stages, 8K -> 512K context (docs/recipe.md).

Each stage starts from the previous stage's checkpoint. Stage 1 reads K2-V2's published mixture;
stages 2-4 name no training data (their mixtures are not public): give each its folder with
data.train_files, or a data-bank JSON with data.mixture, else the run stops saying so.
  python -m k2jax.train --config=configs/midtrain.py:stage1 --workdir=/ckpt/mid1 \
      --config.init_from=/ckpt/pretrain --config.data.data_root=/data \
      --config.data.tokenizer=/models/k2-v2/tokenizer.json
  python -m k2jax.train --config=configs/midtrain.py:stage2 --workdir=/ckpt/mid2 \
      --config.init_from=/ckpt/mid1 --config.data.train_files=/data/prepared/midas-stage2 \
      --config.data.tokenizer=/models/k2-v2/tokenizer.json
  (stage3 and stage4 likewise, from /ckpt/mid2 and /ckpt/mid3)
CPU-sized variants keep each stage's RoPE base, schedule, packing and sequence degree, with a
sequence 16x the pre-training debug length at stage 4 (stages 3-4 need 2 / 8 devices: set
XLA_FLAGS=--xla_force_host_platform_device_count=8 on a CPU):
  python -m k2jax.train --config=configs/midtrain.py:stage4,debug --workdir=/tmp/mid4
"""

import os

from configs import base

# stage: (seq_len, rope_base, global_batch, steps, context-parallel degree, GPUs)
STAGES = {
  'stage1': (8_192, 5e5, 1600, 135_000, 1, 3200),
  'stage2': (65_536, 1e6, 200, 45_000, 1, 1600),
  'stage3': (131_072, 1e7, 100, 17_500, 2, 1600),
  'stage4': (524_288, 1e7, 25, 10_000, 8, 1600),
}
# mesh.fsdp_group per stage: the most data shards (up to 8 nodes) that divide both the stage's
# data axis (400, 200, 100, 25) and, times its sequence degree, the 8192-wide `embed`.
FSDP_GROUP = {'stage1': 8, 'stage2': 8, 'stage3': 4, 'stage4': 1}
DEBUG_SEQ_LEN = {'stage1': 128, 'stage2': 512, 'stage3': 1024, 'stage4': 2048}
# Divisible by the data axis that 8 simulated devices leave after the sequence degree.
DEBUG_BATCH = {'stage1': 16, 'stage2': 8, 'stage3': 4, 'stage4': 1}


def get_config(arg=None):
  args = base.parse_args(arg, known=(*STAGES, 'debug'))
  stages = [a for a in args if a in STAGES]
  if len(stages) != 1:
    raise ValueError(
      f'configs/midtrain.py needs exactly one of {", ".join(STAGES)} '
      f'(e.g. configs/midtrain.py:stage3), got {arg!r}'
    )
  stage = stages[0]
  seq_len, rope_base, batch, steps, context_parallel, _ = STAGES[stage]
  c = base.get_config()
  c.total_steps = steps
  c.eval_every = 500
  c.mesh.data = -1  # GPUs / (tensor x sequence): 400, 200, 100, 25
  c.mesh.tensor = 8
  c.mesh.sequence = context_parallel
  # ZeRO-1 as K2-V2's Megatron distributed optimizer (configs/pretrain.py), sharded over
  # data × sequence in groups; fp32 weights stay whole on each tensor shard (36 GB). Stages 3
  # and 4 still fit an H200 with them: 89 and 90 GiB per device (docs/parallelism.md).
  c.mesh.fsdp = 'optimizer'
  c.mesh.fsdp_group = FSDP_GROUP[stage]
  c.model.rope_base = rope_base  # 1e6 degraded at 128K in the paper; 1e7 recovered it
  c.data.seq_len = seq_len
  c.data.global_batch_size = batch  # ~13.1M tokens per step in every stage
  # Stage 1 packs like pre-training; stages 2-4 pack whole documents best-fit.
  c.data.packing = 'concat' if stage == 'stage1' else 'best_fit'
  # Stage 1's published mixture; stages 2-4's are not public [?]: set data.mixture or
  # data.train_files to the stage's folder (TxT360-Midas stageN/).
  c.data.mixture = os.path.join(base.DATA_BANKS, 'midas_stage1.json') if stage == 'stage1' else ''
  c.optim.min_lr = 6e-6
  if stage == 'stage1':
    c.optim.peak_lr = 1.5e-5
    c.optim.warmup_steps = 500
    c.optim.schedule = 'cosine'  # 1.5e-5 -> 6e-6
  else:
    c.optim.peak_lr = 6e-6
    c.optim.warmup_steps = 0
    c.optim.schedule = 'constant'
  if 'debug' in args:
    base.make_debug(c, seq_len=DEBUG_SEQ_LEN[stage], global_batch_size=DEBUG_BATCH[stage])
  return c
