"""K2-V2 SFT on TxT360-3efforts: three reasoning efforts, tool use (docs/recipe.md).

Conversations are rendered with the ChatML template, one sample per assistant turn, loss on
the assistant's reasoning and answer only (data_pipeline/chat.py). Launch from the last
mid-training checkpoint, with the prepared 3efforts sets (docs/data.md):
  python -m k2jax.train --config=configs/sft.py --workdir=/ckpt/sft --config.init_from=/ckpt/mid4 \
      --config.data.data_root=/data
CPU-sized variant on the bundled demo conversations:
  python -m k2jax.train --config=configs/sft.py:debug --workdir=/tmp/sft
"""

import os

from configs import base


def get_config(arg=None):
  args = base.parse_args(arg, known=('debug',))
  c = base.get_config()
  c.total_steps = 2_000  # [?] 2 epochs over the SFT set; set from its size
  c.eval_every = 200
  c.mesh.data = -1
  c.mesh.tensor = 8
  c.mesh.sequence = 1  # [?] 32K sequences fit without context parallelism at tensor 8
  c.mesh.fsdp = 'optimizer'  # ZeRO-1, as K2-V2's Megatron runs (configs/pretrain.py)
  c.mesh.fsdp_group = 8  # Adam's state sharded within 8 nodes, replicated across groups
  c.model.rope_base = 1e7  # inherited from mid-training stage 4
  c.data.seq_len = 32_768  # right truncation beyond this
  c.data.global_batch_size = 1024
  c.data.packing = 'best_fit'  # variable-length samples, no attention across samples
  c.data.format = 'chat'  # raw sources hold `conversations`
  c.data.mixture = os.path.join(base.DATA_BANKS, 'sft_3efforts.json')  # identity/safety x4
  c.optim.peak_lr = 2e-5
  c.optim.min_lr = 0.0  # [?] plain cosine
  c.optim.warmup_steps = 100  # 5% of total_steps
  c.optim.schedule = 'cosine'
  c.optim.clip_norm = 0.5
  # 8 rows of 32K per data shard on 1,024 GPUs, in 4 micro-batches of 2: as one micro-batch of
  # 8 the step plans at 172 GB per device, over an H200's 141 (python -m k2jax.estimate --stages).
  c.optim.grad_accum_steps = 4
  if 'debug' in args:
    base.make_debug(c, seq_len=512, global_batch_size=8)
    c.data.train_files = os.path.join(base.DEMO_DIR, 'sft', 'train.parquet')
    c.data.eval_files = os.path.join(base.DEMO_DIR, 'sft', 'eval.parquet')
  return c
