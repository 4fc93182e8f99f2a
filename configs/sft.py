"""K2-V2 SFT on TxT360-3efforts: three reasoning efforts, tool use (K2V2.md, "SFT").

Launch from the last mid-training checkpoint:
  python -m k2jax.train --config=configs/sft.py --workdir=/ckpt/sft --config.init_from=/ckpt/mid4
CPU-sized variant:
  python -m k2jax.train --config=configs/sft.py:debug --workdir=/tmp/sft
Not yet: rendering `conversations` with the ChatML template and masking the loss to assistant
tokens (the data pipeline's chat stage); until then this stage reads `text` JSONL with loss on
every token.
"""

from configs import base


def get_config(arg=None):
  args = base.parse_args(arg, known=('debug',))
  c = base.get_config()
  c.total_steps = 2_000  # [?] 2 epochs over the SFT set; set from its size
  c.eval_every = 200
  c.mesh.data = -1
  c.mesh.tensor = 8
  c.mesh.sequence = 1  # [?] 32K sequences fit without context parallelism at tensor 8
  c.mesh.fsdp = True
  c.model.rope_base = 1e7  # inherited from mid-training stage 4
  c.data.seq_len = 32_768  # right truncation beyond this
  c.data.global_batch_size = 1024
  c.data.packing = 'best_fit'  # variable-length samples, no attention across samples
  c.optim.peak_lr = 2e-5
  c.optim.min_lr = 0.0  # [?] plain cosine
  c.optim.warmup_steps = 100  # 5% of total_steps
  c.optim.schedule = 'cosine'
  c.optim.clip_norm = 0.5
  if 'debug' in args:
    base.make_debug(c, seq_len=256, global_batch_size=8)
  return c
