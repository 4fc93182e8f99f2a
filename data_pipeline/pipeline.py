"""Input pipeline on Grain: sources -> documents -> mixture -> packed token batches.

Sources are raw JSONL / parquet files or prepared ArrayRecord directories
(data_pipeline/documents.py); a run reads one (`data.train_files`) or a weighted
mixture of them (`data.mixture`, data_pipeline/mixture.py). `data.packing` chooses how
documents become rows:

  'concat'    K2-V2 pre-training and mid-training stage 1 (below).
  'document'  whole documents per row, greedy in stream order (data_pipeline/packing.py).
  'best_fit'  whole documents per row, best-fit decreasing over a window of
              `data.pack_buffer` documents (0, the default: enough for ~32 rows, at least
              256, see auto_pack_buffer); K2-V2 mid-training stages 2-4, SFT.

'concat' packing (Megatron style): the documents (each ending with EOD) are concatenated
into one token stream, cut into consecutive chunks of seq_len + 1 tokens. A chunk gives
`inputs = chunk[:-1]` and `targets = chunk[1:]`. Attention crosses document boundaries,
so `positions` is simply 0..seq_len-1 and `segment_ids` all ones; `loss_mask` is the
targets' target_mask (all ones for text).

The Grain graph, per process:

    per source: documents[process_index::process_count]   disjoint shards
                  .shuffle(seed + source)     train only; every epoch reshuffled
                  .repeat()                   endless, for train and eval alike
    MapDataset.mix(sources, document weights) token shares as asked (mixture.py)
      .to_iter_dataset()
      .mp_prefetch(workers)                   optional
      ConcatThenSplit(seq_len + 1) .map(chunk -> example) .batch(...)    'concat'
      or PackedBatchIterDataset(...)                                     'document' / 'best_fit'
      SourceCounts                            realised tokens per source

With `data.stream` the training split takes its documents from data_pipeline/streaming.py
instead (raw files read lazily, files assigned to data shards whole, a bounded shuffle
window, tokenizing worker processes, a deterministic weighted mix); packing is the same.
Eval always uses the graph above: evaluation files are small.

Batches map `inputs`, `targets`, `positions`, `segment_ids` (int32), `loss_mask`
(float32) and `source_ids` (int32, -1 on padding; host-side only) to
[global_batch_size // process_count, seq_len] arrays.

The returned iterator is a Grain DatasetIterator, so `get_state()` / `set_state()` checkpoint
the data position with the model; the state also records the process count and worker
count (the shard count only, when streaming: the worker count does not change the batches)
and whether it was streamed, and restoring it under different ones is refused with a clear
message.
"""

import functools
import math
from typing import Any

import grain
import numpy as np
from absl import flags

from data_pipeline import documents, load_balance, mixture, packing, streaming
from data_pipeline.tokenizer import Tokenizer, load_tokenizer

SPLITS = ('train', 'eval')
PACKINGS = ('concat', *packing.MODES)
DEFAULT_PACK_BUFFER = 256
MAX_PACK_BUFFER = 65_536  # bounds the window's memory: its documents are held until packed

# Documents are already in memory, so one reader thread is enough to run
# tokenization ahead of the training step; more threads only fight over the GIL.
_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=256)


def tokenizer_for(data_cfg) -> Tokenizer:
  """The tokenizer named by `data_cfg.tokenizer`."""
  return load_tokenizer(data_cfg.tokenizer)


_DOCUMENT_KEYS = ('tokens', 'target_mask', 'source')


def _chunk_to_example(chunk: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  tokens = chunk['tokens']
  seq_len = len(tokens) - 1
  return {
    'inputs': tokens[:-1],
    'targets': tokens[1:],
    'positions': np.arange(seq_len, dtype=np.int32),
    'segment_ids': np.ones(seq_len, dtype=np.int32),
    'loss_mask': chunk['target_mask'][1:].astype(np.float32),
    'source_ids': chunk['source'][1:],
  }


def _require_int(name: str, value, minimum: int) -> int:
  # bool is an int subclass; a True batch size is surely a config mistake.
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f'{name} must be an integer >= {minimum}, got {value!r}')
  return int(value)


def _local_batch_size(
  data_cfg, split: str, seed: int, process_index: int, process_count: int
) -> int:
  """Validates the arguments; returns the rows of input shard `process_index` of
  `process_count`."""
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
  _require_int('data.seq_len', data_cfg.seq_len, 1)
  global_batch = _require_int('data.global_batch_size', data_cfg.global_batch_size, 1)
  _require_int('data.worker_count', data_cfg.get('worker_count', 0), 0)
  mode = data_cfg.get('packing', 'concat')
  if mode not in PACKINGS:
    raise ValueError(f'data.packing must be one of {"|".join(PACKINGS)}, got {mode!r}')
  _require_int('data.pack_buffer', data_cfg.get('pack_buffer', 0), 0)
  # The caller's input shard (k2jax/parallel/input.py): processes that hold the same rows of
  # the batch share one, so these count distinct row sets, not processes.
  process_count = _require_int('process_count (the input shard count)', process_count, 1)
  process_index = _require_int('process_index (the input shard index)', process_index, 0)
  if process_index >= process_count:
    raise ValueError(
      f'process_index {process_index} (the input shard index) must be < process_count '
      f'{process_count} (the input shard count)'
    )
  # Grain's shuffle takes a 32-bit seed.
  if _require_int('seed', seed, 0) >= 2**32:
    raise ValueError(f'seed must be < 2**32, got {seed}')
  if global_batch % process_count:
    raise ValueError(
      f'data.global_batch_size {global_batch} is not divisible by the input shard count '
      f'{process_count} (process_count: the processes that load different rows)'
    )
  return global_batch // process_count


def auto_pack_buffer(seq_len: int, mean_document_tokens: float) -> int:
  """Documents per best-fit window: enough for ~32 rows, so the window's last, partly filled
  row costs little (at 8K tokens, 256 short documents fill only ~4 rows and pad ~14%)."""
  return int(
    min(
      MAX_PACK_BUFFER,
      max(DEFAULT_PACK_BUFFER, math.ceil(32 * seq_len / max(mean_document_tokens, 1.0))),
    )
  )


def build(
  data_cfg,
  *,
  seed: int,
  split: str,
  process_index: int = 0,
  process_count: int = 1,
  context_shards: int = 1,
) -> 'SourceCountsIterator':
  """Endless iterator of this process's batches for `split` ("train" or "eval").

  `process_index` / `process_count` name this process's data shard and the number of
  distinct shards: processes given the same index read the same documents and get the same
  batches. The same config, seed and shard give the same batches; eval ignores the seed and
  always starts from the first document in file order. With `context_shards` > 1 (the
  context-parallel degree) every row comes in zigzag order (load_balance.py). With
  `data.stream` the training sources are streamed (data_pipeline/streaming.py), else read
  as random-access datasets (in memory for raw files).
  """
  local_batch = _local_batch_size(data_cfg, split, seed, process_index, process_count)
  tokenizer = tokenizer_for(data_cfg)
  chosen = mixture.sources_for(data_cfg, split)
  mode = data_cfg.get('packing', 'concat')
  pack_buffer = data_cfg.get('pack_buffer', 0)
  needs_lengths = len(chosen) > 1 or (mode == 'best_fit' and not pack_buffer)
  streamed = split == 'train' and bool(data_cfg.get('stream', False))
  if streamed:
    mixed, weights, lengths = streaming.build_documents(
      data_cfg,
      chosen,
      tokenizer,
      seed=seed,
      shuffle=True,
      shard=process_index,
      shards=process_count,
      need_lengths=needs_lengths,
    )
    stream = streaming.IteratorDataset(mixed)
    # Batches do not depend on the worker count: only the shard count is pinned.
    layout = {'process_count': process_count}
  else:
    stream, weights, lengths = _random_access_documents(
      data_cfg, chosen, tokenizer, seed, split, process_index, process_count, needs_lengths
    )
    layout = {'process_count': process_count, 'worker_count': data_cfg.get('worker_count', 0)}
  if mode == 'best_fit' and not pack_buffer:
    pack_buffer = auto_pack_buffer(data_cfg.seq_len, sum(w * n for w, n in zip(weights, lengths)))

  if mode == 'concat':
    chunks = grain.experimental.ConcatThenSplitIterDataset(
      stream, length_struct={key: data_cfg.seq_len + 1 for key in _DOCUMENT_KEYS}
    )
    batches = chunks.map(_chunk_to_example).batch(local_batch, drop_remainder=True)
  else:
    # A SentencePiece model without a pad piece answers -1; EOD then pads (masked anyway).
    pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id
    batches = packing.PackedBatchIterDataset(
      stream,
      mode=mode,
      seq_len=data_cfg.seq_len,
      batch_size=local_batch,
      pad_id=pad_id,
      pack_buffer=pack_buffer or DEFAULT_PACK_BUFFER,
      # Eval ignores the seed (see above), also for the order of packed rows.
      seed=seed if split == 'train' else 0,
    )
  if context_shards > 1:
    batches = batches.map(functools.partial(load_balance.reorder, shards=context_shards))
  return SourceCountsIterator(
    iter(batches),
    [s.name for s in chosen],
    [s.share for s in chosen],
    layout,
    mixed if streamed else None,
  )


def _random_access_documents(
  data_cfg, chosen, tokenizer, seed, split, process_index, process_count, needs_lengths
) -> tuple[grain.IterDataset, list[float], list[float]]:
  """(documents as a Grain IterDataset, document weights, mean tokens per document) of the
  sources read as random-access datasets: raw files in memory, prepared ones lazily."""
  streams, mean_tokens = [], []
  for index, source in enumerate(chosen):
    try:
      opened = documents.open_source(
        source.path,
        index,
        data_cfg,
        tokenizer,
        seed=seed if split == 'train' else 0,
        system_prompt_prob=source.system_prompt_prob,
        strict=data_cfg.get('strict', False),
      )
    except FileNotFoundError as e:
      if len(chosen) == 1:
        raise
      raise FileNotFoundError(
        f'data.mixture source {source.name!r}: {e} (relative paths in {data_cfg.mixture} '
        "are taken from data.data_root, or the file's folder when that is empty)"
      ) from None
    # Shard whole documents by process, before shuffling, so shards stay disjoint.
    docs = opened.documents[process_index::process_count]
    if len(docs) == 0:
      raise ValueError(
        f'{source.path!r} has {len(opened.documents)} document(s): too few '
        f'to give process {process_index} of {process_count} any'
      )
    if split == 'train':
      docs = docs.shuffle(seed=(seed + index) % 2**32)
    streams.append(docs.repeat())
    mean_tokens.append(opened.mean_tokens)  # measured only if there is a mixture
  lengths = [m() for m in mean_tokens] if needs_lengths else [1.0] * len(streams)
  weights = mixture.document_weights([s.share for s in chosen], lengths)
  mixed = streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams, weights)

  stream = mixed.to_iter_dataset(_READ_OPTIONS)
  worker_count = data_cfg.get('worker_count', 0)
  if worker_count > 0:
    # Grain's worker processes read absl flags; a trainer that does not use
    # absl.app never parses them, so fall back to the flag defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    # Workers take documents round-robin and the results are interleaved
    # back in order, so the batches do not depend on worker_count.
    stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return stream, weights, lengths


class SourceCountsIterator(grain.DatasetIterator):
  """Passes batches through, counting the loss tokens each source contributed.

  The counts are part of the iterator state, so the shares reported after a resume cover
  the whole run. The state also pins the process and worker counts: Grain's per-worker
  positions, and this process's shard of every source, mean nothing under other counts.
  """

  def __init__(
    self,
    parent: grain.DatasetIterator,
    names: list[str],
    shares: list[float],
    layout: dict[str, int],
    streamed_documents: streaming.MixedDocuments | None = None,
  ):
    super().__init__(parent)
    self.names = names
    self.requested_shares = shares
    self.source_tokens = np.zeros(len(names), np.int64)
    self._layout = layout
    self._documents = streamed_documents  # None: the in-memory / random-access reader
    self._streamed = streamed_documents is not None

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._parent)
    counted = batch['source_ids'][batch['loss_mask'] > 0]
    self.source_tokens += np.bincount(counted, minlength=len(self.names))
    return batch

  def realised_shares(self) -> dict[str, float]:
    """{source name: fraction of the loss tokens so far}; empty before the first batch."""
    total = int(self.source_tokens.sum())
    if not total:
      return {}
    return {name: int(n) / total for name, n in zip(self.names, self.source_tokens)}

  def get_state(self) -> dict[str, Any]:
    return {
      'batches': self._parent.get_state(),
      'source_tokens': self.source_tokens.tolist(),
      **self._layout,
      **({'stream': True} if self._streamed else {}),
    }

  def set_state(self, state: dict[str, Any]) -> None:
    saved_stream = bool(state.get('stream', False))
    if saved_stream != self._streamed:
      raise ValueError(
        f'the data position was saved with data.stream={saved_stream} and this run has '
        f'{self._streamed}: positions of the two readers do not translate; resume with '
        f'data.stream={saved_stream} or start the stage afresh'
      )
    for key, now in self._layout.items():
      saved = state.get(key, now)
      if saved != now:
        raise ValueError(
          f'the data position was saved with data.{key}={saved} and this run has {now}: '
          f'restart with {saved} {key.replace("_count", "")}(s) or start the stage afresh'
        )
    self._parent.set_state(state['batches'])
    self.source_tokens = np.asarray(state['source_tokens'], np.int64)

  @property
  def stats(self) -> packing.PackingStats | None:
    return getattr(self._parent, 'stats', None)

  @property
  def skipped_records(self) -> int | None:
    """Bad records the streamed sources skipped so far, restored with the position; None when
    not streaming (the in-memory reader reports its total when it reads the files)."""
    return None if self._documents is None else self._documents.skipped


def packing_stats(batches) -> packing.PackingStats | None:
  """Running totals (rows, padding, loss tokens) of an iterator from `build`.

  None for 'concat', which has no padding. The totals cover every batch the iterator
  has returned, and are restored with its state by `set_state`.
  """
  return getattr(batches, 'stats', None)
