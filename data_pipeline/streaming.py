"""Streaming raw sources (`data.stream=True`): documents straight from JSONL / parquet files.

The in-memory reader (data_pipeline/documents.py) reads a raw source whole before the first
step, fine for SFT sets and evaluation files. Streaming reads the training sources as it goes,
so host memory is bounded by buffers and does not grow with the corpus. Per source and data
shard:

    ShardReader      the shard's files, `data.stream_open_files` open at once, records
                     round-robin; every epoch in a new seeded file order (stream_files.py)
      -> windows     `data.shuffle_buffer` records at a time, permuted with a seed per window:
                     the bounded stand-in for a global shuffle (a window never spans epochs)
      -> chunks      64 records each, tokenized by `data.worker_count` spawned processes
                     (0: inline), at most ~2 chunks per worker in flight; results are taken
                     in submission order, so the documents do not depend on the worker count
      -> documents   as the in-memory reader's (documents.make_document); bad records are
                     reported as file:line and counted, or stop the run with data.strict

Sources are mixed by a deterministic weighted schedule: the next document comes from the
source furthest behind its share, i.e. the smallest (drawn + 1) / weight, with document
weights from mixture.document_weights (token shares over mean document lengths, estimated
from the first documents of each raw source). Prepared sources stream too: their Grain
dataset, sharded, shuffled and repeated as in the in-memory path, is read by index.

The position is small and JSON-serialisable: per raw source the reader position where the
current window starts (epoch, next file, each open file's record and byte offset, the
round-robin turn), the window's index (it seeds the window's permutation) and how many of its
documents were returned; per prepared source an index; and the count drawn from each source.
A resume re-reads the current window from its start and drops what was already returned, so
it continues with exactly the same documents (the restart cost: one window per source, plus
decompressing each open .gz file up to its position).
"""

import collections
import logging
import math
import weakref
from typing import Any

import grain
import numpy as np

from data_pipeline import documents, mixture, sources, stream_files
from data_pipeline.stream_tokenize import RenderSpec, TokenizerPool, tokenize_items
from data_pipeline.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

CHUNK_RECORDS = 64  # records per tokenizing task
DEFAULT_SHUFFLE_BUFFER = 8192
# Raw sources: records tokenized to estimate the mean document length (mixture weights).
LENGTH_SAMPLE = 128
_MAX_REPORTED = 10  # bad records named one by one (per source); the count covers them all


class RawSourceStream(grain.DatasetIterator):
  """One raw source's documents for one data shard, endless; see the module docstring."""

  def __init__(
    self,
    reader: stream_files.ShardReader,
    pool: TokenizerPool,
    spec: RenderSpec,
    *,
    name: str,
    window: int,
    shuffle_seed: tuple | None,
    inflight: int,
    strict: bool,
  ):
    super().__init__()
    self._reader = reader
    self._pool = pool
    self._spec = spec
    self._name = name
    self._window = window
    self._seed = shuffle_seed  # None: windows in read order (no shuffling)
    self._inflight = inflight
    self._strict = strict
    self._pending = collections.deque()  # (window meta, last chunk of it?, future)
    self.skipped = 0
    self.set_state({'start': reader.snapshot(), 'window': 0, 'emitted': 0, 'skipped': 0})

  # --- producing: windows of records -> tokenizing tasks ------------------------------

  def _read_window(self) -> None:
    start = self._reader.snapshot()
    items, epoch = self._reader.read(self._window)
    meta = {'start': start, 'end': self._reader.snapshot(), 'index': self._next_window}
    meta['epoch'], meta['skipped'] = epoch, None
    if self._seed is not None:
      order = np.random.default_rng([*self._seed, self._next_window]).permutation(len(items))
      items = [items[i] for i in order]
    self._next_window += 1
    chunks = [items[i : i + CHUNK_RECORDS] for i in range(0, len(items), CHUNK_RECORDS)]
    for k, chunk in enumerate(chunks):
      self._to_submit.append((meta, k == len(chunks) - 1, chunk))

  def _fill(self) -> None:
    while len(self._pending) < self._inflight:
      if not self._to_submit:
        self._read_window()
      meta, last, chunk = self._to_submit.popleft()
      self._pending.append((meta, last, self._pool.submit(chunk, self._spec)))

  # --- consuming: documents in order --------------------------------------------------

  def _bad(self, message: str) -> None:
    if self._strict:
      raise ValueError(message)
    self.skipped += 1
    if self.skipped <= _MAX_REPORTED:
      logger.warning('skipping %s', message)
    elif math.log10(self.skipped).is_integer():  # an endless stream has no end to total at
      logger.warning('source %r: %d bad records skipped so far', self._name, self.skipped)

  def _next_chunk(self) -> None:
    self._fill()
    meta, last, future = self._pending.popleft()
    if meta is not self._meta:  # the first chunk of a window
      if self._meta is None or meta['epoch'] != self._meta['epoch']:
        self._new_epoch(meta)
      self._meta, self._emitted = meta, 0
      if meta['skipped'] is None:
        meta['skipped'] = self.skipped
    docs, errors = future.result()
    for message in errors:
      self._bad(message)
    self._docs, self._doc_pos, self._last = docs, 0, last
    self._fill()  # keep the workers busy while these documents are used

  def _new_epoch(self, meta) -> None:
    if self._epoch_docs == 0:
      raise ValueError(
        f'source {self._name!r}: no usable record in a whole pass over the files of this data '
        f'shard ({self.skipped} bad record(s) skipped)'
      )
    at_start = meta['start']['next_file'] == 0 and not meta['start']['slots']
    self._epoch_docs = 0 if at_start else None  # unknown when resumed mid-epoch

  def __next__(self) -> dict[str, np.ndarray]:
    while True:
      if self._doc_pos < len(self._docs):
        tokens, mask = self._docs[self._doc_pos]
        self._doc_pos += 1
        self._emitted += 1
        if self._epoch_docs is not None:
          self._epoch_docs += 1
        if self._skip:  # resuming: already returned before the restart
          self._skip -= 1
          continue
        if mask is None:
          mask = np.ones(len(tokens), bool)
        return documents.make_document(tokens, mask, self._spec.source)
      self._next_chunk()

  # --- position -----------------------------------------------------------------------

  def get_state(self) -> dict[str, Any]:
    if self._meta is None:  # nothing read since the start or the restore
      return dict(self._restored)
    if self._last and self._doc_pos >= len(self._docs):  # between windows
      return {
        'start': self._meta['end'],
        'window': self._meta['index'] + 1,
        'emitted': 0,
        'skipped': self.skipped,
      }
    return {
      'start': self._meta['start'],
      'window': self._meta['index'],
      'emitted': self._emitted,
      'skipped': self._meta['skipped'],
    }

  def set_state(self, state: dict[str, Any]) -> None:
    for _, _, future in self._pending:
      future.cancel()
    self._pending.clear()
    self._to_submit = collections.deque()
    self._reader.restore(state['start'])
    self._next_window = int(state['window'])
    self._skip = int(state['emitted'])
    self.skipped = int(state['skipped'])
    self._restored = {k: state[k] for k in ('start', 'window', 'emitted', 'skipped')}
    self._meta, self._emitted, self._epoch_docs = None, 0, None
    self._docs, self._doc_pos, self._last = [], 0, False

  def close(self) -> None:
    self._reader.close()


class IndexedDocuments(grain.DatasetIterator):
  """A prepared source's endless Grain dataset read by index; the index is the position."""

  def __init__(self, dataset: grain.MapDataset):
    super().__init__()
    self._dataset = dataset
    self._index = 0

  def __next__(self) -> dict[str, np.ndarray]:
    document = self._dataset[self._index]
    self._index += 1
    return document

  def get_state(self) -> dict[str, Any]:
    return {'index': self._index}

  def set_state(self, state: dict[str, Any]) -> None:
    self._index = int(state['index'])


class MixedDocuments(grain.DatasetIterator):
  """Documents from several sources by a deterministic weighted schedule (module docstring)."""

  def __init__(self, streams: list, weights: list[float], pool: TokenizerPool):
    super().__init__()
    self._streams = streams
    self._weights = np.asarray(weights, np.float64)
    self._drawn = np.zeros(len(streams), np.int64)
    self._pool = pool
    # The workers go when the iterator does (the trainer keeps it for the whole run).
    weakref.finalize(self, _close, pool, streams)

  def __next__(self) -> dict[str, np.ndarray]:
    source = int(np.argmin((self._drawn + 1) / self._weights)) if len(self._streams) > 1 else 0
    self._drawn[source] += 1
    return next(self._streams[source])

  @property
  def skipped(self) -> int:
    """Bad records skipped so far, over the raw sources."""
    return sum(getattr(s, 'skipped', 0) for s in self._streams)

  def get_state(self) -> dict[str, Any]:
    return {
      'drawn': self._drawn.tolist(),
      'sources': [stream.get_state() for stream in self._streams],
    }

  def set_state(self, state: dict[str, Any]) -> None:
    if len(state['sources']) != len(self._streams):
      raise ValueError(
        f'the data position holds {len(state["sources"])} source(s) and this run reads '
        f'{len(self._streams)}: the mixture changed'
      )
    self._drawn = np.asarray(state['drawn'], np.int64)
    for stream, saved in zip(self._streams, state['sources']):
      stream.set_state(saved)


def _close(pool: TokenizerPool, streams: list) -> None:
  pool.close()
  for stream in streams:
    if hasattr(stream, 'close'):
      stream.close()


class IteratorDataset(grain.IterDataset):
  """An already built iterator as a Grain IterDataset, so Grain's stages can sit on it."""

  def __init__(self, iterator: grain.DatasetIterator):
    super().__init__()
    self._iterator = iterator

  def __iter__(self) -> grain.DatasetIterator:
    return self._iterator

  def __str__(self) -> str:
    return f'IteratorDataset({type(self._iterator).__name__})'


def check_settings(data_cfg) -> None:
  """The streaming keys' types and ranges; ValueError names the key."""
  stream = data_cfg.get('stream', False)
  if not isinstance(stream, bool):
    raise ValueError(f'data.stream must be True or False, got {stream!r}')
  for key, default in (('shuffle_buffer', DEFAULT_SHUFFLE_BUFFER), ('stream_open_files', 4)):
    value = data_cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f'data.{key} must be an integer >= 1, got {value!r}')


def _spec(data_cfg, source: mixture.Source, index: int, seed: int) -> RenderSpec:
  data_format = data_cfg.get('format', 'text')
  if data_format not in documents.FORMATS:
    raise ValueError(
      f'data.format must be one of {"|".join(documents.FORMATS)}, got {data_format!r}'
    )
  if data_format == 'text':
    return RenderSpec(source=index, field=data_cfg.get('text_field', 'text'))
  chat_cfg = data_cfg.get('chat', {})
  prob = source.system_prompt_prob
  return RenderSpec(
    source=index,
    format='chat',
    field=data_cfg.get('chat_field', 'conversations'),
    seq_len=data_cfg.seq_len,
    seed=seed,
    system_prompt=chat_cfg.get('system_prompt', documents.chat.DEFAULT_SYSTEM_PROMPT),
    system_prompt_prob=prob if prob is not None else chat_cfg.get('system_prompt_prob', 0.0),
  )


def sample_mean_tokens(files: list[str], spec: RenderSpec, tokenizer: Tokenizer) -> float:
  """Mean tokens per document of the first LENGTH_SAMPLE records in sorted file order: the same
  estimate on every process, whatever files its shard holds."""
  lengths, looked_at = [], 0
  for file_id, path in enumerate(files):
    cursor = stream_files.FileCursor(path, file_id, spec.field)
    try:
      while looked_at < 4 * LENGTH_SAMPLE and len(lengths) < LENGTH_SAMPLE:
        item = cursor.next()
        if item is None:
          break
        looked_at += 1
        docs, _ = tokenize_items([item], spec, tokenizer)
        lengths += [len(tokens) for tokens, _ in docs]
    finally:
      cursor.close()
    if len(lengths) >= LENGTH_SAMPLE or looked_at >= 4 * LENGTH_SAMPLE:
      break
  return float(np.mean(lengths)) if lengths else 1.0


def build_documents(
  data_cfg,
  chosen: list[mixture.Source],
  tokenizer: Tokenizer,
  *,
  seed: int,
  shuffle: bool,
  shard: int,
  shards: int,
  need_lengths: bool,
) -> tuple[MixedDocuments, list[float], list[float]]:
  """(the mixed document stream of data shard `shard` of `shards`, document weights, mean
  tokens per document (1.0 each unless `need_lengths`))."""
  check_settings(data_cfg)
  workers = data_cfg.get('worker_count', 0)
  pool = TokenizerPool(tokenizer, data_cfg.tokenizer, workers)
  shares = [s.share for s in chosen]
  window = data_cfg.get('shuffle_buffer', DEFAULT_SHUFFLE_BUFFER)
  open_files = data_cfg.get('stream_open_files', 4)
  streams, lengths = [], []
  for index, source in enumerate(chosen):
    if documents.prepare.is_prepared(source.path):
      opened = documents.open_source(source.path, index, data_cfg, tokenizer, seed=seed)
      docs = opened.documents[shard::shards]
      if len(docs) == 0:
        raise ValueError(
          f'{source.path!r} has {len(opened.documents)} document(s): too few '
          f'to give data shard {shard} of {shards} any'
        )
      if shuffle:
        docs = docs.shuffle(seed=(seed + index) % 2**32)
      streams.append(IndexedDocuments(docs.repeat()))
      lengths.append(opened.mean_tokens() if need_lengths else 1.0)
      continue
    try:
      files = sources.match_files(source.path)
    except FileNotFoundError as e:
      if len(chosen) == 1:
        raise
      raise FileNotFoundError(f'data.mixture source {source.name!r}: {e}') from None
    spec = _spec(data_cfg, source, index, seed)
    reader = stream_files.ShardReader(
      files,
      spec.field,
      shard=shard,
      shards=shards,
      open_files=open_files,
      seed=(seed, 0, index, shard) if shuffle else None,
    )
    inflight = max(2, math.ceil(2 * workers * source.share)) if workers else 1
    streams.append(
      RawSourceStream(
        reader,
        pool,
        spec,
        name=source.name,
        window=window,
        shuffle_seed=(seed, 1, index, shard) if shuffle else None,
        inflight=inflight,
        strict=data_cfg.get('strict', False),
      )
    )
    lengths.append(sample_mean_tokens(files, spec, tokenizer) if need_lengths else 1.0)
  weights = mixture.document_weights(shares, lengths)
  return MixedDocuments(streams, weights, pool), weights, lengths
