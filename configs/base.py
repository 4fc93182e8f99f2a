"""Defaults shared by every stage; stage files change only what differs.

Not launched directly: see configs/pretrain.py, configs/midtrain.py and configs/sft.py.
"""

import os

import ml_collections

from data_pipeline import chat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_DIR = os.path.join(REPO, 'data_pipeline', 'demo')
DATA_BANKS = os.path.join(REPO, 'configs', 'data')  # K2-V2's mixtures as data-bank JSON

# A stage's learning rates are multiplied by this in its `debug` variant: a 4M-parameter
# model from scratch learns nothing in 100 steps at a 70B model's rates.
DEBUG_LR_SCALE = 20.0


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # parameter init and data order
  c.total_steps = 1000  # optimizer updates in this stage
  c.log_every = 10  # steps between console / metrics.jsonl records
  c.eval_every = 500  # steps between held-out evals (0: never)
  c.eval_batches = 8  # batches per held-out eval
  c.init_from = ''  # previous stage's workdir or step dir: its params start this stage ('' = fresh)
  c.init_from_optimizer = False  # with init_from: also carry over Adam's moments
  c.resume_schedule_change = False  # True: resume checkpoints under a changed LR schedule
  c.compile_cache_dir = 'auto'  # persistent XLA cache: auto (<workdir>/compile_cache) | off | DIR

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 500  # steps between async saves, and one at the end of the run (0: off)
  c.checkpoint.keep = 3  # newest checkpoints kept
  c.checkpoint.keep_every = 0  # also keep every step divisible by this forever (0: none)
  c.checkpoint.every_minutes = 0.0  # also save when this many minutes passed (0: off)
  # False: resume without the data position (e.g. on another process count), with a fresh data
  # order from the restored step (a function of seed and step); True refuses such a restart.
  c.checkpoint.restore_data = True  # restore the data position (refuse when it cannot)

  c.stability = ml_collections.ConfigDict()
  c.stability.spike_window = 100  # good steps whose loss mean / std define "normal"
  c.stability.spike_threshold = 5.0  # a spike: loss above mean + this many std ...
  c.stability.spike_min_increase = 0.1  # ... and above mean x (1 + this)
  c.stability.spike_patience = 10  # bad steps in a row that trigger a rollback (0: never roll back)
  c.stability.max_rollbacks = 5  # more than this many rollbacks stop the run

  c.monitor = ml_collections.ConfigDict()
  c.monitor.peak_tflops = 989.0  # per device, the MFU denominator (H100/H200 dense BF16)
  c.monitor.webhook_url = ''  # alerts webhook: env:NAME reads it from $NAME; never saved
  c.monitor.stall_minutes = 30.0  # alert when no step finished for this long (0: off)
  c.monitor.wandb_project = ''  # also log to Weights & Biases (needs `pip install wandb`)
  c.monitor.profile_steps = ''  # 'START:STOP': jax.profiler traces in <workdir>/profile

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # data-parallel degree (-1: all devices left over)
  c.mesh.tensor = 1  # tensor-parallel degree (heads, MLP hidden, vocab)
  c.mesh.sequence = 1  # sequence / context-parallel degree
  # What the data axes (data, and sequence) shard: none | optimizer (ZeRO-1: gradients and
  # Adam's state; parameters replicated) | full (ZeRO-3: parameters too); docs/parallelism.md.
  c.mesh.fsdp = 'none'  # none | optimizer | full
  c.mesh.fsdp_group = 0  # shard over groups of this many data shards, replicated across (0: all)

  c.model = ml_collections.ConfigDict()
  c.model.preset = 'k2v2_70b'  # debug | 1b | 7b | k2v2_70b (k2jax/model/config.py)
  c.model.rope_base = 5e5  # RoPE base frequency; changes per stage
  c.model.attention = 'auto'  # auto | xla | blockwise | pallas | cudnn (docs/attention.md)
  c.model.attention_block_q = ml_collections.config_dict.placeholder(int)  # pallas/blockwise block
  c.model.attention_block_kv = ml_collections.config_dict.placeholder(int)  # None: backend default
  # What each block keeps for its backward: none | full | save_dots | save_qkv_attn | save_attn
  # | offload_block_input (in host memory; docs/long_context.md).
  c.model.remat = 'full'
  c.model.loss_chunk = 4096  # positions of each row per cross-entropy chunk (0: whole logits)
  c.model.dtype = 'bfloat16'  # compute dtype
  c.model.param_dtype = 'float32'  # master weights
  # Shape overrides of the preset (None: keep the preset's value).
  c.model.vocab_size = ml_collections.config_dict.placeholder(int)  # e.g. the tokenizer's size
  c.model.num_layers = ml_collections.config_dict.placeholder(int)  # depth

  c.data = ml_collections.ConfigDict()
  c.data.seq_len = 8192  # tokens per training sequence
  c.data.global_batch_size = 1200  # sequences per optimizer step, over all hosts
  c.data.train_files = ''  # one source: glob/folder of .jsonl[.gz|.zst]/.parquet, or a prepared dir
  c.data.mixture = ''  # data-bank JSON {name: [tokens, epochs, path]}; replaces train_files
  c.data.data_root = ''  # prefix of the mixture's relative paths ('' = the JSON's folder)
  c.data.eval_files = ''  # held-out source, same forms as train_files
  c.data.tokenizer = ''  # SentencePiece .model, HF tokenizer.json, or a folder holding one
  c.data.format = 'text'  # raw files hold text documents | chat conversations
  c.data.text_field = 'text'  # record field with the document text
  c.data.chat_field = 'conversations'  # record field with the conversation (format chat)
  c.data.chat = ml_collections.ConfigDict()
  c.data.chat.system_prompt_prob = 0.1  # chance a sample without a system turn gets one
  c.data.chat.system_prompt = chat.DEFAULT_SYSTEM_PROMPT  # K2-V2's default system prompt
  c.data.strict = False  # stop at the first bad record instead of skipping and counting it
  c.data.packing = 'concat'  # concat (EOD-joined, attention across docs) | document | best_fit
  c.data.pack_buffer = 0  # best_fit: documents per packing window (0: enough for ~32 rows)
  c.data.worker_count = 0  # Grain workers, or with data.stream tokenizing ones (0: in-process)
  # Stream the raw training sources (JSONL / parquet) instead of reading them into memory:
  # memory bounded by buffers, for corpora larger than a host (TxT360). Off by default: the
  # in-memory reader's global shuffle and exact epochs suit the SFT sets and the demo, and
  # every existing config and data position keeps its meaning (docs/data.md, section 8).
  c.data.stream = False  # True: stream raw training files (bounded memory)
  c.data.shuffle_buffer = 8192  # stream: records per source shuffled together (a window)
  c.data.stream_open_files = 4  # stream: files per source read interleaved at once

  c.optim = ml_collections.ConfigDict()
  c.optim.peak_lr = 1.5e-4  # learning rate after warmup
  c.optim.min_lr = 1.5e-6  # floor of the decay (paper: updates stall below ~1.5e-6)
  c.optim.warmup_steps = 50  # linear warmup from 0
  c.optim.schedule = 'cosine'  # cosine | constant | wsd
  c.optim.decay_steps = 0  # cosine length after warmup (0: to the end of the stage)
  c.optim.wsd_decay_fraction = 0.1  # wsd: final fraction of steps spent decaying
  c.optim.wsd_decay_shape = 'linear'  # wsd: linear | cosine | sqrt
  c.optim.b1 = 0.9  # AdamW beta1
  c.optim.b2 = 0.95  # AdamW beta2
  c.optim.eps = 1e-8  # AdamW epsilon
  c.optim.weight_decay = 0.05  # decoupled; none on norm scales
  c.optim.clip_norm = 1.0  # global L2 gradient clipping (0: off)
  c.optim.grad_accum_steps = 1  # micro-batches per optimizer step
  return c


def parse_args(arg: str | None, known: tuple[str, ...]) -> set[str]:
  """'stage3,debug' -> {'stage3', 'debug'}; an unknown word is an error listing the known ones."""
  words = {w.strip() for w in (arg or '').split(',') if w.strip()}
  unknown = words - set(known)
  if unknown:
    raise ValueError(
      f'unknown config argument(s) {", ".join(sorted(unknown))}; known: {", ".join(known)}'
    )
  return words


def make_debug(c: ml_collections.ConfigDict, seq_len: int = 128, global_batch_size: int = 16):
  """Shrinks a stage to CPU size in place: debug model, demo corpus, short run.

  What gives the stage its character (schedule shape, RoPE base, packing, mesh sequence
  degree, clipping) is left as the stage set it.
  """
  if c.optim.warmup_steps:  # keep the warmup's share of the stage, but at least 5 steps
    c.optim.warmup_steps = max(5, round(100 * c.optim.warmup_steps / c.total_steps))
  c.total_steps = 100
  c.log_every = 10
  c.eval_every = 50
  c.eval_batches = 2
  c.checkpoint.every = 50
  c.mesh.data = -1
  c.mesh.tensor = 1
  c.mesh.fsdp = 'none'
  c.mesh.fsdp_group = 0
  c.model.preset = 'debug'
  c.model.remat = 'none'
  c.model.dtype = 'float32'  # bf16 matmuls are emulated, hence slow, on CPU
  c.data.seq_len = seq_len
  c.data.global_batch_size = global_batch_size
  c.data.mixture = ''
  c.data.data_root = ''
  c.data.train_files = os.path.join(DEMO_DIR, 'train.jsonl')
  c.data.eval_files = os.path.join(DEMO_DIR, 'eval.jsonl')
  c.data.tokenizer = os.path.join(DEMO_DIR, 'tokenizer.model')
  c.optim.peak_lr *= DEBUG_LR_SCALE
  c.optim.min_lr *= DEBUG_LR_SCALE
  c.optim.grad_accum_steps = 1
  return c
