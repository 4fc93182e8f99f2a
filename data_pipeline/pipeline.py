"""Input pipeline on Grain: JSONL documents -> packed token batches.

`data.packing` chooses how documents become rows:

  'concat'    K2-V2 pre-training and mid-training stage 1 (below).
  'document'  whole documents per row, greedy in stream order (data_pipeline/packing.py).
  'best_fit'  whole documents per row, best-fit decreasing over a window of
              `data.pack_buffer` documents (default 256); K2-V2 mid-training stages 2-4.

'concat' packing (Megatron style): every document is tokenized and
followed by EOD (the eos id), the documents are concatenated into one token
stream, and the stream is cut into consecutive chunks of seq_len + 1 tokens.
A chunk gives `inputs = chunk[:-1]` and `targets = chunk[1:]`. Attention
crosses document boundaries and every token carries loss, so `positions` is
simply 0..seq_len-1, `segment_ids` is all ones and `loss_mask` all ones.

The Grain graph, per process:

    MapDataset.source(texts)[process_index::process_count]   disjoint shards
      .shuffle(seed)            train only; epoch e is shuffled with seed + e
      .repeat()                 endless, for train and eval alike
      .map(tokenize + EOD)
      .to_iter_dataset()
      .mp_prefetch(workers)     optional; keeps the document order
      ConcatThenSplit(seq_len + 1)     'concat'
      .map(chunk -> example)
      .batch(global_batch_size // process_count)
    or
      PackedBatchIterDataset(...)      'document' / 'best_fit'

The returned iterator is a Grain DatasetIterator, so `get_state()` /
`set_state()` can checkpoint the data position along with the model. For
'document' and 'best_fit', `packing_stats(iterator)` gives running totals of
rows, padding and loss tokens (see packing.PackingStats).
"""

from collections.abc import Iterator

from absl import flags
import grain
import numpy as np

from data_pipeline import jsonl, packing
from data_pipeline.tokenizer import Tokenizer, load_tokenizer

SPLITS = ('train', 'eval')
PACKINGS = ('concat', *packing.MODES)
DEFAULT_PACK_BUFFER = 256

# Documents are already in memory, so one reader thread is enough to run
# tokenization ahead of the training step; more threads only fight over the GIL.
_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=256)


def tokenizer_for(data_cfg) -> Tokenizer:
  """The tokenizer named by `data_cfg.tokenizer`."""
  return load_tokenizer(data_cfg.tokenizer)


class _TokenizeWithEod(grain.transforms.Map):
  """Document text -> {"tokens": int32 ids followed by EOD}."""

  def __init__(self, tokenizer: Tokenizer):
    self._tokenizer = tokenizer
    self._eod = tokenizer.eos_id

  def map(self, text: str) -> dict[str, np.ndarray]:
    ids = self._tokenizer.encode(text)
    ids.append(self._eod)
    return {'tokens': np.asarray(ids, dtype=np.int32)}


def _chunk_to_example(chunk: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  tokens = chunk['tokens']
  seq_len = len(tokens) - 1
  return {
      'inputs': tokens[:-1],
      'targets': tokens[1:],
      'positions': np.arange(seq_len, dtype=np.int32),
      'segment_ids': np.ones(seq_len, dtype=np.int32),
      'loss_mask': np.ones(seq_len, dtype=np.float32),
  }


def _require_int(name: str, value, minimum: int) -> int:
  # bool is an int subclass; a True batch size is surely a config mistake.
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f'{name} must be an integer >= {minimum}, got {value!r}')
  return int(value)


def _local_batch_size(data_cfg, split: str, seed: int, process_index: int,
                      process_count: int) -> int:
  """Validates the arguments; returns the per-process batch size."""
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
  _require_int('data.seq_len', data_cfg.seq_len, 1)
  global_batch = _require_int('data.global_batch_size', data_cfg.global_batch_size, 1)
  _require_int('data.worker_count', data_cfg.get('worker_count', 0), 0)
  mode = data_cfg.get('packing', 'concat')
  if mode not in PACKINGS:
    raise ValueError(f'data.packing must be one of {"|".join(PACKINGS)}, got {mode!r}')
  _require_int('data.pack_buffer', data_cfg.get('pack_buffer', DEFAULT_PACK_BUFFER), 1)
  process_count = _require_int('process_count', process_count, 1)
  process_index = _require_int('process_index', process_index, 0)
  if process_index >= process_count:
    raise ValueError(f'process_index {process_index} must be < process_count {process_count}')
  # Grain's shuffle takes a 32-bit seed.
  if _require_int('seed', seed, 0) >= 2**32:
    raise ValueError(f'seed must be < 2**32, got {seed}')
  if global_batch % process_count:
    raise ValueError(f'data.global_batch_size {global_batch} is not divisible by '
                     f'process_count {process_count}')
  return global_batch // process_count


def build(data_cfg, *, seed: int, split: str, process_index: int = 0,
          process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Endless iterator of this process's batches for `split` ("train" or "eval").

  Each batch maps `inputs`, `targets`, `positions`, `segment_ids` (int32) and
  `loss_mask` (float32) to arrays of shape
  [global_batch_size // process_count, seq_len]. The same config, seed and
  process give the same batches; eval ignores the seed and always starts
  from the first document in file order. `data.packing` (default 'concat')
  and, for 'best_fit', `data.pack_buffer` (default 256) choose the packing.
  """
  local_batch = _local_batch_size(data_cfg, split, seed, process_index, process_count)
  pattern = data_cfg.train_files if split == 'train' else data_cfg.eval_files
  texts = jsonl.read_texts(pattern, data_cfg.get('text_field', 'text'))

  # Shard whole documents by process, before shuffling, so shards stay disjoint.
  docs = grain.MapDataset.source(texts)[process_index::process_count]
  if len(docs) == 0:
    raise ValueError(f'{pattern!r} has {len(texts)} document(s): too few to give '
                     f'process {process_index} of {process_count} any')
  if split == 'train':
    docs = docs.shuffle(seed=seed)
  tokenizer = tokenizer_for(data_cfg)
  tokens = docs.repeat().map(_TokenizeWithEod(tokenizer))

  stream = tokens.to_iter_dataset(_READ_OPTIONS)
  worker_count = data_cfg.get('worker_count', 0)
  if worker_count > 0:
    # Grain's worker processes read absl flags; a trainer that does not use
    # absl.app never parses them, so fall back to the flag defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    # Workers take documents round-robin and the results are interleaved
    # back in order, so the batches do not depend on worker_count.
    stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))

  mode = data_cfg.get('packing', 'concat')
  if mode == 'concat':
    chunks = grain.experimental.ConcatThenSplitIterDataset(
        stream, length_struct={'tokens': data_cfg.seq_len + 1})
    batches = chunks.map(_chunk_to_example).batch(local_batch, drop_remainder=True)
  else:
    # A SentencePiece model without a pad piece answers -1; EOD then pads (masked anyway).
    pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id
    batches = packing.PackedBatchIterDataset(
        stream, mode=mode, seq_len=data_cfg.seq_len, batch_size=local_batch, pad_id=pad_id,
        pack_buffer=data_cfg.get('pack_buffer', DEFAULT_PACK_BUFFER),
        # Eval ignores the seed (see above), also for the order of packed rows.
        seed=seed if split == 'train' else 0)
  return iter(batches)


def packing_stats(batches) -> packing.PackingStats | None:
  """Running totals (rows, padding, loss tokens) of an iterator from `build`.

  None for 'concat', which has no padding. The totals cover every batch the iterator
  has returned, and are restored with its state by `set_state`.
  """
  return getattr(batches, 'stats', None)
