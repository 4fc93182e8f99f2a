"""Pre-training input pipeline on Grain: JSONL documents -> packed token batches.

K2-V2 pre-training packing (Megatron style): every document is tokenized and
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
      ConcatThenSplit(seq_len + 1)
      .map(chunk -> example)
      .batch(global_batch_size // process_count)

The returned iterator is a Grain DatasetIterator, so `get_state()` /
`set_state()` can checkpoint the data position along with the model.
"""

from collections.abc import Iterator

from absl import flags
import grain
import numpy as np

from data_pipeline import jsonl
from data_pipeline.tokenizer import Tokenizer, load_tokenizer

SPLITS = ('train', 'eval')

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
  packing = data_cfg.get('packing', 'concat')
  if packing != 'concat':
    raise NotImplementedError(f"data.packing={packing!r}: only 'concat' is implemented")
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
  from the first document in file order.
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
  tokens = docs.repeat().map(_TokenizeWithEod(tokenizer_for(data_cfg)))

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

  chunks = grain.experimental.ConcatThenSplitIterDataset(
      stream, length_struct={'tokens': data_cfg.seq_len + 1})
  batches = chunks.map(_chunk_to_example).batch(local_batch, drop_remainder=True)
  return iter(batches)
