"""Tests for data_pipeline.sources: hub-style files, URLs and bad-input reporting."""

import gzip
import json
import logging
import re

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_pipeline import sources
from data_pipeline.sources import SUFFIXES, check_text, is_url, match_files, read_values

DOCS = [f'document {i} ' + 'word ' * (i % 7) for i in range(50)]
TURNS = [
  [
    {'role': 'user', 'content': 'hi', 'think': None},
    {'role': 'assistant', 'content': 'hello', 'think': 'greet back'},
  ],
  [{'role': 'user', 'content': '2+2?', 'think': None}],
]


def jsonl_bytes(records) -> bytes:
  return b''.join(json.dumps(r).encode() + b'\n' for r in records)


def compress(path, data: bytes) -> bytes:
  if str(path).endswith('.gz'):
    return gzip.compress(data)
  if str(path).endswith('.zst'):
    return zstandard.ZstdCompressor().compress(data)
  return data


def write_jsonl(path, records):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(compress(path, jsonl_bytes(records)))
  return str(path)


def write_docs(path, texts):
  """TxT360-shaped records: `text` plus `meta`."""
  return write_jsonl(path, [{'text': t, 'meta': {'n': i}} for i, t in enumerate(texts)])


def write_parquet(path, columns: dict, **kwargs):
  path.parent.mkdir(parents=True, exist_ok=True)
  pq.write_table(pa.table(columns), str(path), **kwargs)
  return str(path)


@pytest.fixture
def warnings(caplog):
  caplog.set_level(logging.WARNING, logger=sources.__name__)
  return caplog


def test_is_url_and_check_text():
  assert is_url('gs://bucket/a.jsonl') and is_url('memory://x') and is_url('file:///tmp/a')
  assert not is_url('/data/a.jsonl') and not is_url('data/**/*.jsonl')
  assert check_text('doc') == 'doc'
  with pytest.raises(ValueError, match='empty document'):
    check_text(' \n')
  with pytest.raises(ValueError, match='field is int, not a string'):
    check_text(3)


# --- formats -------------------------------------------------------------------


@pytest.mark.parametrize('suffix', ['.jsonl', '.jsonl.gz', '.jsonl.zst'])
def test_jsonl_formats(tmp_path, suffix):
  path = write_docs(tmp_path / f'docs{suffix}', DOCS)
  result = read_values(path, 'text', check_text)
  assert result.values == DOCS and result.skipped == 0 and result.files == [path]
  assert read_values(path, 'meta').values[:2] == [{'n': 0}, {'n': 1}]


def test_zst_with_several_frames(tmp_path):
  path = tmp_path / 'docs.jsonl.zst'
  path.write_bytes(
    compress(path, jsonl_bytes([{'text': 'a'}]))
    + compress(path, jsonl_bytes([{'text': 'b'}, {'text': 'c'}]))
  )
  assert read_values(str(path), 'text').values == ['a', 'b', 'c']


def test_parquet_text_column_in_batches(tmp_path):
  texts = [f'row {i}' for i in range(2500)]  # several row groups and record batches
  path = write_parquet(
    tmp_path / 'a.parquet', {'text': texts, 'id': list(range(2500))}, row_group_size=700
  )
  result = read_values(path, 'text', check_text)
  assert result.values == texts and result.skipped == 0


def test_parquet_conversations(tmp_path):
  path = write_parquet(tmp_path / '3efforts.parquet', {'conversations': TURNS, 'id': [7, 8]})
  assert read_values(path, 'conversations').values == TURNS


# --- layouts and URLs ------------------------------------------------------------


def test_hub_layout(tmp_path):
  cc = tmp_path / 'data' / 'common-crawl'
  a = write_docs(cc / 'CC-MAIN-2024-10' / '1-1' / 'a.jsonl.gz', ['a0', 'a1'])
  b = write_docs(cc / 'CC-MAIN-2024-10' / '2-5' / 'b.jsonl.gz', ['b0'])
  c = write_docs(cc / 'CC-MAIN-2024-18' / '1-1' / 'c.jsonl.gz', ['c0'])
  d = write_docs(tmp_path / 'data' / 'wiki' / 'd.jsonl', ['d0'])
  (tmp_path / 'data' / 'README.md').write_text('not data')
  write_docs(tmp_path / 'data' / '.cache' / 'stale.jsonl', ['hidden'])

  assert match_files(f'{cc}/**/*.jsonl.gz') == [a, b, c]
  assert match_files(f'{tmp_path}/**/*.jsonl*') == [a, b, c, d]
  assert match_files(f'{cc}/CC-MAIN-*/1-1/*.jsonl.gz') == [a, c]
  assert match_files(str(tmp_path / 'data')) == [a, b, c, d]  # README and .cache left out
  assert match_files(f'{tmp_path}/data/wiki, {cc}/CC-MAIN-2024-18/**/*.jsonl.gz') == [c, d]
  assert match_files(f'{a},{cc}/*/1-1/*.jsonl.gz') == [a, c]  # union without repeats

  result = read_values(str(tmp_path / 'data'), 'text', check_text)
  assert result.values == ['a0', 'a1', 'b0', 'c0', 'd0'] and result.files == [a, b, c, d]
  with pytest.raises(FileNotFoundError, match='CC-MAIN-2099'):
    match_files(f'{cc}/CC-MAIN-2024-10/**/*.jsonl.gz,{cc}/CC-MAIN-2099-*/**/*.jsonl.gz')


def test_midas_layout_mixes_parquet_and_jsonl(tmp_path):
  stage = tmp_path / 'stage1'
  p = write_parquet(stage / 'reasoning_behaviors' / 'part-0.parquet', {'text': ['p0', 'p1']})
  j = write_docs(stage / 'math' / 'part-0.jsonl.zst', ['j0'])
  result = read_values(str(stage), 'text', check_text)
  assert result.files == [j, p] and result.values == ['j0', 'p0', 'p1']


@pytest.fixture
def memory_root(tmp_path):
  root = f'memory://sources-test/{tmp_path.name}'
  yield root
  fsspec.filesystem('memory').rm(root, recursive=True)


def test_memory_urls(memory_root):
  with fsspec.open(f'{memory_root}/cc/1-1/a.jsonl.gz', 'wb') as f:
    f.write(gzip.compress(jsonl_bytes([{'text': 'a0'}, {'text': 'a1'}])))
  with fsspec.open(f'{memory_root}/midas/b.parquet', 'wb') as f:
    pq.write_table(pa.table({'text': ['b0'], 'conversations': TURNS[:1]}), f)
  with fsspec.open(f'{memory_root}/notes.txt', 'wb') as f:
    f.write(b'skipped when expanding a directory')

  files = match_files(f'{memory_root}/**/*.jsonl.gz,{memory_root}/midas/*.parquet')
  listed = memory_root.replace('memory://', 'memory:///')  # fsspec's spelling of memory paths
  assert files == [f'{listed}/cc/1-1/a.jsonl.gz', f'{listed}/midas/b.parquet']
  assert match_files(memory_root) == files  # directory form
  assert read_values(memory_root, 'text', check_text).values == ['a0', 'a1', 'b0']
  assert read_values(files[1], 'conversations').values == TURNS[:1]
  with pytest.raises(ValueError, match=r'notes\.txt'):
    match_files(f'{memory_root}/*')
  with pytest.raises(FileNotFoundError, match='nothing'):
    match_files(f'{memory_root}/nothing/*.jsonl')


# --- bad input -------------------------------------------------------------------


def assert_reported(result_or_error, warnings, message, skipped=1):
  """The bad entry was skipped, counted and named in a warning."""
  assert result_or_error.skipped == skipped
  texts = [r.getMessage() for r in warnings.records]
  assert any(message in t for t in texts), texts
  assert f'skipped {skipped} bad record(s)' in texts[-1]


@pytest.mark.parametrize(
  'line, message',
  [
    (b'{"text": "cut', 'malformed JSON at column 10 (Unterminated string starting at)'),
    (b'{"text": "\xff"}', 'invalid UTF-8 (invalid start byte at byte 10)'),
    (b'["a list"]', 'not a JSON object but list'),
    (b'{"meta": {}}', "missing field 'text'"),
    (b'{"text": null}', "field 'text' is null"),
    (b'{"text": 5}', 'field is int, not a string'),
    (b'{"text": " \\n "}', 'empty document'),
  ],
)
def test_bad_jsonl_line(tmp_path, warnings, line, message):
  path = tmp_path / 'docs.jsonl.gz'
  path.write_bytes(gzip.compress(b'{"text": "first"}\n\n' + line + b'\n{"text": "last"}\n'))
  result = read_values(str(path), 'text', check_text)
  assert result.values == ['first', 'last']
  assert_reported(result, warnings, f'{path}:3: {message}')
  with pytest.raises(ValueError, match=re.escape(f'{path}:3: {message}')):
    read_values(str(path), 'text', check_text, strict=True)


def test_bad_parquet_rows(tmp_path, warnings):
  path = write_parquet(tmp_path / 'a.parquet', {'text': ['a', None, ' ', 'b']})
  result = read_values(path, 'text', check_text)
  assert result.values == ['a', 'b']
  assert_reported(result, warnings, f"{path}: row 1: field 'text' is null", skipped=2)
  assert_reported(result, warnings, f'{path}: row 2: empty document', skipped=2)
  with pytest.raises(ValueError, match=re.escape(f"{path}: row 1: field 'text' is null")):
    read_values(path, 'text', check_text, strict=True)


def test_warnings_are_capped(tmp_path, warnings):
  path = write_jsonl(tmp_path / 'a.jsonl', [{'text': 'ok'}] + [{'text': ''}] * 15)
  assert read_values(path, 'text', check_text).skipped == 15
  texts = [r.getMessage() for r in warnings.records]
  assert len(texts) == 11 and texts[9].startswith(f'skipping {path}:11: ')
  assert texts[-1] == f'skipped 15 bad record(s) in files matching {path!r}'


def many_docs(n=20000):
  return [f'document number {i} about topic {i * 7919 % 1009}' for i in range(n)]


@pytest.mark.parametrize('suffix', ['.jsonl.gz', '.jsonl.zst'])
def test_truncated_stream_keeps_earlier_records(tmp_path, warnings, suffix):
  docs = many_docs()
  path = tmp_path / f'cut{suffix}'
  data = compress(path, jsonl_bytes({'text': d} for d in docs))
  path.write_bytes(data[: len(data) * 3 // 4])
  good = write_docs(tmp_path / 'z.jsonl', ['after'])
  result = read_values(str(tmp_path), 'text', check_text)
  kept = len(result.values) - 1
  assert 0 < kept < len(docs) and result.values == docs[:kept] + ['after']
  assert result.files == [str(path), good]
  message = f'{path}: truncated or corrupt compressed data after line {kept} ('
  assert_reported(result, warnings, message)
  with pytest.raises(ValueError, match=re.escape(message)):
    read_values(str(path), 'text', strict=True)


@pytest.mark.parametrize(
  'name, content, message',
  [
    (
      'bad.jsonl.gz',
      b'{"text": "plain, not gzip"}\n',
      'truncated or corrupt compressed data after line 0 (Not a gzipped file',
    ),
    (
      'bad.jsonl.zst',
      b'{"text": "plain, not zstd"}\n',
      'truncated or corrupt compressed data after line 0 (',
    ),
    ('bad.parquet', b'PAR1 but not really', 'not a parquet file ('),
  ],
)
def test_corrupt_file(tmp_path, warnings, name, content, message):
  (tmp_path / name).write_bytes(content)
  write_docs(tmp_path / 'good.jsonl', ['ok'])
  result = read_values(str(tmp_path), 'text', check_text)
  assert result.values == ['ok']
  assert_reported(result, warnings, f'{tmp_path / name}: {message}')
  with pytest.raises(ValueError, match=re.escape(f'{tmp_path / name}: {message}')):
    read_values(str(tmp_path), 'text', strict=True)


def test_parquet_without_the_column(tmp_path, warnings):
  path = write_parquet(tmp_path / 'a.parquet', {'body': ['x'], 'meta': ['m']})
  good = write_parquet(tmp_path / 'b.parquet', {'text': ['ok']})
  result = read_values(f'{tmp_path}/*.parquet', 'text')
  assert result.values == ['ok'] and result.files == [path, good]
  assert_reported(result, warnings, f"{path}: no column 'text' (columns: body, meta)")


def test_unreadable_file(tmp_path, warnings, monkeypatch):
  good = write_docs(tmp_path / 'a.jsonl', ['ok'])
  gone = str(tmp_path / 'gone.jsonl')  # e.g. deleted between listing and reading
  monkeypatch.setattr(sources, 'match_files', lambda pattern: [good, gone])
  result = read_values('any', 'text')
  assert result.values == ['ok']
  assert_reported(result, warnings, f'{gone}: cannot open ([Errno 2]')


def test_unsupported_suffix(tmp_path):
  write_docs(tmp_path / 'a.jsonl', ['ok'])
  (tmp_path / 'b.json').write_text('{"text": "x"}')
  with pytest.raises(ValueError, match=re.escape(f'{tmp_path / "b.json"} (matched by')) as e:
    match_files(f'{tmp_path}/*')
  assert ', '.join(SUFFIXES) in str(e.value)
  assert match_files(str(tmp_path)) == [str(tmp_path / 'a.jsonl')]  # directories skip it


def test_nothing_matched(tmp_path):
  with pytest.raises(FileNotFoundError, match=re.escape(f'{tmp_path}/**/*.jsonl')):
    read_values(f'{tmp_path}/**/*.jsonl', 'text')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match='empty'):
    match_files(str(tmp_path / 'empty'))
  with pytest.raises(FileNotFoundError):
    match_files(' , ')


def test_all_records_bad(tmp_path, warnings):
  path = write_jsonl(tmp_path / 'a.jsonl', [{'text': ''}, {'meta': 1}])
  with pytest.raises(
    ValueError,
    match=re.escape(
      f"no usable 'text' values in files matching {path!r} (2 bad record(s) skipped)"
    ),
  ):
    read_values(path, 'text', check_text)


def test_a_glob_naming_folders_means_the_files_under_them(tmp_path):
  for bucket in ('1-1', '2-5'):
    for snapshot in ('CC-MAIN-2024-10', 'CC-MAIN-2024-18'):
      folder = tmp_path / 'common-crawl' / snapshot / bucket
      folder.mkdir(parents=True)
      (folder / 'part-0.jsonl').write_text('{"text": "x"}\n')
  found = sources.match_files(str(tmp_path / 'common-crawl' / '*' / '1-1'))
  assert found == [
    str(tmp_path / 'common-crawl' / s / '1-1' / 'part-0.jsonl')
    for s in ('CC-MAIN-2024-10', 'CC-MAIN-2024-18')
  ]
