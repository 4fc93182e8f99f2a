"""Raw records of a data shard's files, read lazily from a saved position (the streaming reader).

Two layers, both small enough to checkpoint as a few integers:

  FileCursor   one file's records from a position on. The position is `[records, byte]`:
               the records read (JSONL lines, blank ones included, or parquet rows) and, for
               plain JSONL, the byte offset after them, so a resume seeks straight there.
               Compressed JSONL is decompressed again up to the position (the restart cost
               is at most one file's worth of reading); parquet skips whole row groups.
  ShardReader  a data shard's files, `open_files` of them open at once, records taken
               round-robin from the open files; a finished file's slot takes the next file of
               the epoch. Each epoch visits the shard's files in a fresh seeded order; an
               epoch's last window ends with it, so no window holds two epochs.

An item is `(path, file_id, number, kind, payload)`: kind 'line' (a JSONL line's bytes,
number 1-based), 'value' (a parquet cell, number 0-based) or 'error' (a file that cannot be
read on: the message). Items are parsed and checked later, by the tokenizing workers
(data_pipeline/streaming.py), which report bad ones as file:line.

Files go to data shards whole: shard i of n reads files i, i + n, ... of the source's sorted
files, so shards are disjoint and processes holding the same shard read the same files. A
source with fewer files than shards (an SFT set in one file on many hosts) is read whole by
every shard instead, each keeping every n-th record.
"""

import logging
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline import sources

logger = logging.getLogger(__name__)


class Item(NamedTuple):
  path: str
  file_id: int  # the file's index in the source's sorted file list
  number: int  # JSONL: 1-based line; parquet: 0-based row
  kind: str  # 'line' | 'value' | 'error'
  payload: Any


class FileCursor:
  """The records of one file from a position on; `position` is [records read, byte offset]."""

  def __init__(self, path: str, file_id: int, field: str, position=(0, 0)):
    self.path, self.file_id, self._field = path, file_id, field
    self.records, self.byte = int(position[0]), int(position[1])
    self._done = False
    self._raw = None
    self._parquet = path.endswith('.parquet')
    try:
      self._raw = sources.open_binary(path)
    except OSError as e:
      self._error = f'{path}: cannot open ({e})'
      return
    self._error = None
    if self._parquet:
      self._values = self._parquet_values()
    else:
      self._plain = not path.endswith(('.gz', '.zst'))
      if self._plain:
        self._raw.seek(self.byte)
        self._lines, self._problem = self._raw, 'read error'
      else:
        self._lines, self._problem = sources.line_stream(path, self._raw)
        self._skip_lines()

  @property
  def position(self) -> list[int]:
    return [self.records, self.byte]

  def close(self) -> None:
    if self._raw is not None:
      self._raw.close()
      self._raw = None

  def _skip_lines(self) -> None:
    """Compressed JSONL: decompress again up to the position (no seeking in the stream)."""
    try:
      for _ in range(self.records):
        if not self._lines.readline():
          break
    except sources.READ_ERRORS as e:
      self._error = f'{self.path}: {self._problem} after line {self.records} ({e})'

  def _parquet_values(self):
    skip = self.records
    try:
      parquet = pq.ParquetFile(self._raw)
      names = parquet.schema_arrow.names
      if self._field not in names:
        yield 'error', f'{self.path}: no column {self._field!r} (columns: {", ".join(names)})'
        return
      groups = []
      for group in range(parquet.num_row_groups):  # whole row groups before the position
        rows = parquet.metadata.row_group(group).num_rows
        if not groups and skip >= rows:
          skip -= rows
        else:
          groups.append(group)
      if not groups:
        return
      batches = parquet.iter_batches(
        batch_size=sources.BATCH_ROWS, row_groups=groups, columns=[self._field]
      )
      for batch in batches:
        values = batch.column(0).to_pylist()
        for value in values[skip:]:
          yield 'value', value
        skip = max(0, skip - len(values))
    except (pa.ArrowException, OSError) as e:
      what = 'not a parquet file' if not self.records else 'corrupt parquet data'
      yield 'error', f'{self.path}: {what} after {self.records} row(s) ({e})'

  def next(self) -> Item | None:
    """The next record, or None at the end of the file (after at most one 'error' item)."""
    if self._done:
      return None
    if self._error is not None:
      self._done = True
      return Item(self.path, self.file_id, self.records, 'error', self._error)
    if self._parquet:
      got = next(self._values, None)
      if got is None or got[0] == 'error':
        self._done = True
        if got is None:
          return None
        return Item(self.path, self.file_id, self.records, 'error', got[1])
      number = self.records
      self.records += 1
      return Item(self.path, self.file_id, number, 'value', got[1])
    while True:
      try:
        line = self._lines.readline()
      except sources.READ_ERRORS as e:
        self._done = True
        message = f'{self.path}: {self._problem} after line {self.records} ({e})'
        return Item(self.path, self.file_id, self.records, 'error', message)
      if not line:
        self._done = True
        return None
      self.records += 1
      if self._plain:
        self.byte += len(line)
      if line.strip():
        return Item(self.path, self.file_id, self.records, 'line', line)


def shard_files(files: list[str], shard: int, shards: int) -> tuple[list[int], int]:
  """(ids of the files shard `shard` of `shards` reads, record stride): whole files when
  there are enough (stride 1), else every file with every `shards`-th record (stride n)."""
  if len(files) >= shards:
    return list(range(shard, len(files), shards)), 1
  return list(range(len(files))), shards


_START = {'epoch': 0, 'next_file': 0, 'slots': [], 'turn': 0}


class ShardReader:
  """A shard's records, `open_files` files interleaved; endless over seeded epochs."""

  def __init__(
    self,
    files: list[str],
    field: str,
    *,
    shard: int,
    shards: int,
    open_files: int,
    seed: tuple | None,
  ):
    self._files = files
    self._field = field
    self._mine, self._stride = shard_files(files, shard, shards)
    self._shard = shard
    self._open_files = open_files
    self._seed = seed  # None: file order, no reshuffling (eval)
    self._cursors: list[FileCursor] = []
    self.restore(_START)

  def _order(self, epoch: int) -> list[int]:
    if self._seed is None:
      return self._mine
    perm = np.random.default_rng([*self._seed, epoch]).permutation(len(self._mine))
    return [self._mine[i] for i in perm]

  def snapshot(self) -> dict[str, Any]:
    """The position, JSON-serialisable; restore() returns to it."""
    return {
      'epoch': self._epoch,
      'next_file': self._next_file,
      'slots': [[c.file_id, *c.position] for c in self._cursors],
      'turn': self._turn,
    }

  def restore(self, snapshot: dict[str, Any]) -> None:
    for cursor in self._cursors:
      cursor.close()
    self._epoch = int(snapshot['epoch'])
    self._next_file = int(snapshot['next_file'])
    self._turn = int(snapshot['turn'])
    # Records of the epoch so far; unknown (None) when restored mid-epoch.
    at_start = self._next_file == 0 and not snapshot['slots']
    self._epoch_items = 0 if at_start else None
    self._order_cache = self._order(self._epoch)
    self._cursors = [
      FileCursor(self._files[file_id], file_id, self._field, (records, byte))
      for file_id, records, byte in snapshot['slots']
    ]

  def close(self) -> None:
    for cursor in self._cursors:
      cursor.close()
    self._cursors = []

  def _open_next(self) -> FileCursor | None:
    if self._next_file >= len(self._order_cache):
      return None
    file_id = self._order_cache[self._next_file]
    self._next_file += 1
    return FileCursor(self._files[file_id], file_id, self._field)

  def _keep(self, item: Item) -> bool:
    if self._stride == 1 or item.kind == 'error':
      return True
    index = item.number - 1 if item.kind == 'line' else item.number
    return index % self._stride == self._shard

  def read(self, n: int) -> tuple[list[Item], int]:
    """(up to n items, their epoch): fewer only where the epoch ends."""
    items = []
    while len(items) < n:
      while len(self._cursors) < self._open_files:
        cursor = self._open_next()
        if cursor is None:
          break
        self._cursors.append(cursor)
      if not self._cursors:  # the epoch is over
        if items:
          break
        if self._epoch_items == 0:
          raise ValueError(
            f'no records in the {len(self._mine)} file(s) of data shard {self._shard} '
            f'(first: {self._files[self._mine[0]]})'
          )
        self._epoch_items = 0
        self._epoch += 1
        self._next_file, self._turn = 0, 0
        self._order_cache = self._order(self._epoch)
        continue
      self._turn %= len(self._cursors)
      cursor = self._cursors[self._turn]
      item = cursor.next()
      if item is None:  # the file is done: its slot takes the epoch's next file
        cursor.close()
        replacement = self._open_next()
        if replacement is None:
          del self._cursors[self._turn]
        else:
          self._cursors[self._turn] = replacement
        continue
      self._turn += 1
      if self._keep(item):
        items.append(item)
        if self._epoch_items is not None:
          self._epoch_items += 1
    epoch = self._epoch
    return items, epoch
