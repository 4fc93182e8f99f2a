"""K2-V2 pre-training: 1.25M steps of 1200 x 8192 tokens on TxT360 (docs/recipe.md).

Prepare each TxT360 source once (docs/data.md), then launch the same command on every host:
  python -m k2jax.train --config=configs/pretrain.py --workdir=/ckpt/pretrain \
      --config.data.data_root=/data --config.data.tokenizer=/models/k2-v2/tokenizer.json
CPU-sized variant on the bundled demo corpus (what `make demo` runs):
  python -m k2jax.train --config=configs/pretrain.py:debug --workdir=/tmp/k2jax_demo
"""

import os

from configs import base


def get_config(arg=None):
  args = base.parse_args(arg, known=('debug',))
  c = base.get_config()
  c.total_steps = 1_250_000  # ~12.3T tokens
  c.log_every = 10
  c.eval_every = 500  # as K2-V2: eval and checkpoint every 500 steps
  c.mesh.data = -1  # 400 nodes x 8 GPUs / tensor 8 = 400
  c.mesh.tensor = 8  # Megatron TP 8 with sequence parallelism
  c.mesh.sequence = 1  # no context parallelism in pre-training
  # K2-V2's Megatron distributed optimizer is ZeRO-1: Adam's state sharded over data, weights
  # replicated (36 GB of fp32 weights per GPU at tensor 8: fits an H200, and no per-layer weight
  # gathers across nodes as `full` would add). In groups of 8 data shards (8 nodes): the
  # 8192-wide `embed` cannot split 400 ways; Adam's state is then 9 GB per GPU
  # (docs/parallelism.md).
  c.mesh.fsdp = 'optimizer'
  c.mesh.fsdp_group = 8
  c.model.rope_base = 5e5  # [?] not in the scripts we read; stage 1 of mid-training uses 5e5
  c.model.remat = 'full'  # full activation recompute, every layer
  c.data.seq_len = 8192
  c.data.global_batch_size = 1200  # 3 sequences per GPU x 400 data shards
  c.data.packing = 'concat'  # documents joined with EOD, attention across documents
  c.data.mixture = os.path.join(base.DATA_BANKS, 'txt360_pretrain.json')  # published shares
  c.optim.peak_lr = 1.5e-4
  c.optim.min_lr = 1.5e-6  # the script decays to 0; the paper's lesson says keep a floor
  c.optim.warmup_steps = 50  # [?] as in the released script, marked "test run" there
  c.optim.schedule = 'cosine'
  if 'debug' in args:
    base.make_debug(c)
  return c
