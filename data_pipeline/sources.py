"""Readers for raw training data as laid out on the HF hub.

TxT360 is JSONL (`text`, `meta`) under `data/common-crawl/CC-MAIN-*/<bucket>/`,
TxT360-Midas is parquet or JSONL under `stage<N>/<subset>/`, and TxT360-3efforts
is parquet with a `conversations` column (a list of turn structs, read as a
list of dicts per row). Files may be local or on any fsspec filesystem (gs://,
s3://, memory://, ...), plain or .gz/.zst compressed.

`read_values` returns every value in memory: it is meant for moderately sized
data read on the fly. The big corpora are streamed record by record
(data_pipeline/stream_files.py, on the helpers below) or go through an offline
preparation into ArrayRecord instead.

Bad records are reported as `path:line: message` (JSONL, 1-based lines) or
`path: row N: message` (parquet, 0-based rows, as Arrow indexes them) so they
can be found and fixed. By default they are skipped with a warning and a count,
since one broken record should not stop a long run; `strict=True` raises on the
first one instead. A file that cannot be read to the end (truncated stream, not
parquet, missing column) keeps the records read before the problem and counts
the rest as one bad entry.
"""

import glob
import gzip
import io
import json
import logging
import os
import re
import zlib
from typing import Callable, NamedTuple

import fsspec
import zstandard

logger = logging.getLogger(__name__)

SUFFIXES = ('.jsonl', '.jsonl.gz', '.jsonl.zst', '.parquet')

# Name at most this many bad records individually; the summary gives the total.
_MAX_REPORTED = 10
# Parquet rows per record batch: bounds the Arrow copy held next to the values.
BATCH_ROWS = 1024
_CHUNK_BYTES = 1 << 16
_URL = re.compile(r'^[A-Za-z][A-Za-z0-9+.-]*://')
_MAGIC = re.compile(r'[*?[]')


class ReadResult(NamedTuple):
  values: list
  skipped: int  # bad records and unreadable file remainders
  files: list[str]


def is_url(path) -> bool:
  """Whether `path` names a scheme (gs://, s3://, memory://, file://, ...)."""
  return bool(_URL.match(str(path)))


def check_text(value) -> str:
  """A document text: a string with something besides whitespace."""
  if not isinstance(value, str):
    raise ValueError(f'field is {type(value).__name__}, not a string')
  if not value.strip():
    raise ValueError('empty document')
  return value


# --- finding files -----------------------------------------------------------


def _check_suffixes(paths: list[str], pattern: str) -> None:
  for path in paths:
    if not path.endswith(SUFFIXES):
      raise ValueError(
        f'{path} (matched by {pattern!r}) is not a supported file; '
        f'supported suffixes: {", ".join(SUFFIXES)}'
      )


def _files_under(directory: str) -> list[str]:
  # glob's ** skips dot-folders such as a hub snapshot's .cache/.
  found = glob.glob(os.path.join(glob.escape(directory), '**', '*'), recursive=True)
  return [p for p in found if p.endswith(SUFFIXES) and os.path.isfile(p)]


def _match_local(pattern: str) -> list[str]:
  if os.path.isdir(pattern):
    return _files_under(pattern)
  matched = glob.glob(pattern, recursive=True)
  found = [p for p in matched if os.path.isfile(p)]
  _check_suffixes(found, pattern)
  if not pattern.rstrip('/').endswith('**'):
    # A glob naming folders (`CC-MAIN-*/1-1`) means the files under them, as a folder does;
    # `dir/**` would name every folder level and is left to the file rule above.
    for folder in matched:
      if os.path.isdir(folder):
        found += _files_under(folder)
  return found


def _match_url(pattern: str) -> list[str]:
  fs, path = fsspec.core.url_to_fs(pattern)
  if not _MAGIC.search(path) and fs.isdir(path):
    root = path.rstrip('/') + '/'
    found = [
      p
      for p in fs.find(path)
      if p.endswith(SUFFIXES)
      and not any(part.startswith('.') for part in p[len(root) :].split('/'))
    ]
  else:
    try:
      infos = fs.glob(path, detail=True)
    except ValueError as e:  # fsspec rejects e.g. `a**b`
      raise ValueError(f'bad pattern {pattern!r}: {e}') from None
    found = [p for p, info in infos.items() if info.get('type') == 'file']
    _check_suffixes(found, pattern)
  # With the protocol put back, each path works with fsspec.open on any host.
  return [fs.unstrip_protocol(p) for p in found]


def match_files(pattern: str) -> list[str]:
  """Files for a glob, a directory or a comma-separated list of either.

  `**` matches any number of folders. A directory, or a glob matching directories,
  means every supported file under them. The result is sorted so every host sees the same order.
  """
  parts = [part.strip() for part in pattern.split(',') if part.strip()]
  if not parts:
    raise FileNotFoundError(f'no files match the empty pattern {pattern!r}')
  files = set()
  for part in parts:
    matched = _match_url(part) if is_url(part) else _match_local(part)
    if not matched:
      where = f' (in {pattern!r})' if len(parts) > 1 else ''
      raise FileNotFoundError(f'no supported files match {part!r}{where}')
    files.update(matched)
  return sorted(files)


# --- reading -----------------------------------------------------------------


class ZstdReader(io.RawIOBase):
  """Decompresses a .zst stream and raises EOFError if it ends inside a frame.

  zstandard's own stream_reader ends cleanly on a cut-off file, which would
  silently drop its tail.
  """

  def __init__(self, raw):
    super().__init__()
    self._raw = raw
    self._frame = None  # decompressobj of the current frame
    self._input = b''  # compressed bytes after the end of the last frame
    self._output = memoryview(b'')

  def readable(self):
    return True

  def readinto(self, buffer):
    while not self._output:
      data = self._input or self._raw.read(_CHUNK_BYTES)
      self._input = b''
      if not data:
        if self._frame is not None and not self._frame.eof:
          raise EOFError('zstd stream ends inside a frame')
        return 0
      if self._frame is None or self._frame.eof:  # files may hold several frames
        self._frame = zstandard.ZstdDecompressor().decompressobj()
      self._output = memoryview(self._frame.decompress(data))
      if self._frame.eof:
        self._input = self._frame.unused_data
    n = min(len(buffer), len(self._output))
    buffer[:n] = self._output[:n]
    self._output = self._output[n:]
    return n


class _Collector:
  """Keeps the good values and applies the bad-record policy."""

  def __init__(self, field: str, check: Callable, strict: bool):
    self.field, self.check, self.strict = field, check, strict
    self.values, self.skipped = [], 0

  def add(self, value, where: str) -> None:
    """Checks one record's value; `where` is how a problem names the record."""
    try:
      if value is None:
        raise ValueError(f'field {self.field!r} is null')
      value = self.check(value)
    except ValueError as e:
      self.bad(f'{where}: {e}')
      return
    self.values.append(value)

  def bad(self, message: str) -> None:
    if self.strict:
      raise ValueError(message) from None  # the message says it all
    self.skipped += 1
    if self.skipped <= _MAX_REPORTED:
      logger.warning('skipping %s', message)


def json_field(raw_line: bytes, field: str):
  """One JSONL line's `field`; ValueError says what is wrong with the line."""
  try:
    # Without the line end, a cut-off line is reported as such, not as a raw newline.
    record = json.loads(raw_line.rstrip(b'\r\n').decode('utf-8'))
  except UnicodeDecodeError as e:
    raise ValueError(f'invalid UTF-8 ({e.reason} at byte {e.start})') from None
  except json.JSONDecodeError as e:
    raise ValueError(f'malformed JSON at column {e.colno} ({e.msg})') from None
  if not isinstance(record, dict):
    raise ValueError(f'not a JSON object but {type(record).__name__}')
  if field not in record:
    raise ValueError(f'missing field {field!r}')
  return record[field]


# What reading a file can raise once it is open (a cut-off or corrupt stream).
READ_ERRORS = (OSError, EOFError, zlib.error, zstandard.ZstdError)


def open_binary(path: str):
  """The file at a local path or URL, opened for binary reading."""
  return fsspec.open(path, 'rb').open() if is_url(path) else open(path, 'rb')


def line_stream(path: str, raw):
  """(binary line stream, how a failure while reading it is described) of a JSONL file."""
  if path.endswith('.gz'):
    return gzip.GzipFile(fileobj=raw), 'truncated or corrupt compressed data'
  if path.endswith('.zst'):
    return io.BufferedReader(ZstdReader(raw), _CHUNK_BYTES), 'truncated or corrupt compressed data'
  return raw, 'read error'


def _read_jsonl(path: str, raw, out: _Collector) -> None:
  lines, problem = line_stream(path, raw)
  line_number = 0
  try:
    # A line is only yielded once complete; a cut-off last line raises instead.
    for line_number, raw_line in enumerate(lines, start=1):
      if not raw_line.strip():
        continue
      try:
        value = json_field(raw_line, out.field)
      except ValueError as e:
        out.bad(f'{path}:{line_number}: {e}')
        continue
      out.add(value, f'{path}:{line_number}')
  except READ_ERRORS as e:
    out.bad(f'{path}: {problem} after line {line_number} ({e})')


def _read_parquet(path: str, raw, out: _Collector) -> None:
  # Imported here: the streaming tokenizer workers import this module and read no parquet.
  import pyarrow as pa
  import pyarrow.parquet as pq

  try:
    parquet = pq.ParquetFile(raw)
  except (pa.ArrowException, OSError) as e:
    out.bad(f'{path}: not a parquet file ({e})')
    return
  names = parquet.schema_arrow.names
  if out.field not in names:
    out.bad(f'{path}: no column {out.field!r} (columns: {", ".join(names)})')
    return
  row = 0
  try:
    # Only the needed column, a batch at a time, to bound memory.
    for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=[out.field]):
      for value in batch.column(0).to_pylist():
        out.add(value, f'{path}: row {row}')
        row += 1
  except (pa.ArrowException, OSError) as e:
    out.bad(f'{path}: corrupt parquet data after {row} row(s) ({e})')


def read_values(
  pattern: str, field: str, check: Callable | None = None, *, strict: bool = False
) -> ReadResult:
  """`field` of every record in the files matching `pattern`, in file then record order.

  `check(value)` returns the value to keep or raises ValueError saying what is
  wrong (see `check_text`); the default keeps any non-null value.
  """
  files = match_files(pattern)
  out = _Collector(field, check or (lambda value: value), strict)
  for path in files:
    try:
      raw = open_binary(path)
    except OSError as e:
      out.bad(f'{path}: cannot open ({e})')
      continue
    with raw:
      if path.endswith('.parquet'):
        _read_parquet(path, raw, out)
      else:
        _read_jsonl(path, raw, out)
  if out.skipped:
    logger.warning('skipped %d bad record(s) in files matching %r', out.skipped, pattern)
  if not out.values:
    raise ValueError(
      f'no usable {field!r} values in files matching {pattern!r} '
      f'({out.skipped} bad record(s) skipped)'
    )
  return ReadResult(out.values, out.skipped, files)
