"""Streaming raw sources (data.stream): epochs, order, exact resume, data shards, bad records."""

import collections
import glob
import gzip
import json
import logging
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_pipeline import documents, mixture, pipeline, prepare, sources, stream_files, streaming
from data_pipeline.tokenizer import load_tokenizer
from tests.helpers import DEMO_TOKENIZER, REPO, SMALL_STEPS, exact, small_config

WORDS = 'alpha beta gamma delta river stone cloud light seven ninety market garden'.split()


def write_corpus(directory, files=6, docs=30, seed=0) -> list[str]:
  """`files` files of `docs` unique short documents each, as .jsonl, .jsonl.gz and .parquet."""
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  paths = []
  for f in range(files):
    texts = [
      f'doc {f}-{d}: ' + ' '.join(rng.choice(WORDS, int(rng.integers(3, 40)))) for d in range(docs)
    ]
    kind = ('jsonl', 'jsonl.gz', 'parquet')[f % 3]
    path = os.path.join(directory, f'part-{f:03d}.{kind}')
    if kind == 'parquet':
      pq.write_table(pa.table({'text': texts}), path, row_group_size=7)
    else:
      lines = ''.join(json.dumps({'text': t, 'meta': {}}) + '\n' for t in texts)
      lines = lines.replace('\n', '\n\n', 1)  # a blank line: skipped, still counted as a line
      data = lines.encode()
      with open(path, 'wb') as out:
        out.write(gzip.compress(data, mtime=0) if kind.endswith('gz') else data)
    paths.append(path)
  return paths


def data_cfg(train_files, **overrides) -> ml_collections.ConfigDict:
  fields = dict(
    seq_len=32,
    global_batch_size=4,
    train_files=train_files,
    eval_files='',
    tokenizer=DEMO_TOKENIZER,
    text_field='text',
    worker_count=0,
    packing='concat',
    stream=True,
    shuffle_buffer=16,
    stream_open_files=2,
  )
  return ml_collections.ConfigDict({**fields, **overrides})


@pytest.fixture(scope='module')
def tokenizer():
  return load_tokenizer(DEMO_TOKENIZER)


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp('corpus'))
  write_corpus(directory)
  return directory


def document_stream(cfg, tokenizer, seed=0, shard=0, shards=1):
  source = mixture.Source('corpus', cfg.train_files, 1.0)
  docs, _, _ = streaming.build_documents(
    cfg,
    [source],
    tokenizer,
    seed=seed,
    shuffle=True,
    shard=shard,
    shards=shards,
    need_lengths=False,
  )
  return docs


def token_tuples(stream, n) -> list[tuple]:
  return [tuple(next(stream)['tokens'].tolist()) for _ in range(n)]


def in_memory_documents(cfg, tokenizer) -> list[tuple]:
  opened = documents.open_source(cfg.train_files, 0, cfg, tokenizer, seed=0)
  return [tuple(opened.documents[i]['tokens'].tolist()) for i in range(len(opened.documents))]


def test_each_epoch_holds_the_in_memory_documents_in_a_seeded_order(corpus, tokenizer):
  cfg = data_cfg(corpus)
  expected = collections.Counter(in_memory_documents(cfg, tokenizer))
  n = sum(expected.values())
  assert n == 180
  stream = document_stream(cfg, tokenizer, seed=5)
  first, second = token_tuples(stream, n), token_tuples(stream, n)
  # A window never spans two epochs, so each pass is exactly the corpus...
  assert collections.Counter(first) == expected
  assert collections.Counter(second) == expected
  # ... reshuffled every epoch, the same for the same seed and not for another one.
  assert first != second
  assert token_tuples(document_stream(cfg, tokenizer, seed=5), n) == first
  assert token_tuples(document_stream(cfg, tokenizer, seed=6), n) != first
  # Files are interleaved: the first window mixes documents of two files.
  heads = {tokenizer.decode(list(t)).split('-')[0] for t in first[:16]}
  assert len(heads) == 2, heads


def test_a_chat_epoch_holds_the_in_memory_samples(tokenizer):
  """One sample per assistant turn with its loss mask, as the in-memory reader renders them."""
  sft = os.path.join(REPO, 'data_pipeline', 'demo', 'sft', 'eval.parquet')
  cfg = data_cfg(sft, format='chat', chat_field='conversations', seq_len=256)
  cfg.chat = {'system_prompt_prob': 0.0}
  opened = documents.open_source(sft, 0, cfg, tokenizer, seed=0)
  expected = collections.Counter(
    (tuple(d['tokens'].tolist()), tuple(d['target_mask'].tolist()))
    for d in (opened.documents[i] for i in range(len(opened.documents)))
  )
  stream = document_stream(cfg, tokenizer)
  got = [next(stream) for _ in range(len(opened.documents))]
  assert (
    collections.Counter(
      (tuple(d['tokens'].tolist()), tuple(d['target_mask'].tolist())) for d in got
    )
    == expected
  )
  assert any(not d['target_mask'].all() for d in got)  # prompts carry no loss


def batches_equal(a, b) -> bool:
  return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x) and len(a) == len(b)


@pytest.mark.parametrize('packing', ['concat', 'best_fit'])
def test_resume_mid_file_gives_the_same_later_batches_with_any_worker_count(corpus, packing):
  cfg = data_cfg(corpus, packing=packing, pack_buffer=8)
  batches = pipeline.build(cfg, seed=3, split='train')
  for _ in range(7):
    next(batches)
  state = json.loads(json.dumps(batches.get_state()))  # as the checkpoint stores it
  expected = [next(batches) for _ in range(30)]  # over an epoch boundary (180 documents)
  source = state['batches']['parent_state'] if packing == 'concat' else state['batches']
  assert 'sources' in json.dumps(source)
  resumed = pipeline.build(cfg, seed=3, split='train')
  resumed.set_state(state)
  assert batches_equal([next(resumed) for _ in range(30)], expected)
  if packing == 'concat':
    # Two tokenizing processes give the same documents in the same order.
    cfg.worker_count = 2
    with_workers = pipeline.build(cfg, seed=3, split='train')
    with_workers.set_state(state)
    assert batches_equal([next(with_workers) for _ in range(30)], expected)


def test_a_file_reopened_at_any_saved_position_reads_the_same_rest(corpus, tmp_path):
  """Plain JSONL seeks to the byte, .gz / .zst decompress up to the record, parquet skips whole
  row groups (of 7 rows here) and then rows."""
  plain = sorted(glob.glob(os.path.join(corpus, '*.jsonl')))[0]
  with open(plain, 'rb') as f:
    zst = tmp_path / 'part.jsonl.zst'
    zst.write_bytes(zstandard.ZstdCompressor().compress(f.read()))
  paths = sorted(glob.glob(os.path.join(corpus, '*'))) + [str(zst)]
  for path in paths:
    cursor, positions, records = stream_files.FileCursor(path, 0, 'text'), [], []
    while True:
      positions.append(cursor.position)
      item = cursor.next()
      if item is None:
        break
      records.append(item)
    assert len(records) == 30, path
    for k, position in enumerate(positions):
      reopened = stream_files.FileCursor(path, 0, 'text', position)
      rest = list(iter(reopened.next, None))
      assert rest == records[k:], (path, k)


def test_the_position_names_files_records_and_the_window(corpus):
  cfg = data_cfg(corpus)
  batches = pipeline.build(cfg, seed=0, split='train')
  for _ in range(10):
    next(batches)
  raw = batches.get_state()['batches']['parent_state']['sources'][0]
  assert raw['window'] == 1 and raw['skipped'] == 0
  # Two files open, each part-read: (file id, records read, byte offset for plain JSONL).
  (file_a, records_a, _), (file_b, records_b, byte_b) = raw['start']['slots']
  assert file_a != file_b and 0 < records_a < 31 and 0 < records_b < 31
  assert (byte_b > 0) == (file_b % 3 == 0)


def epoch_files(cfg, tokenizer, shard, shards, n) -> tuple[set, list]:
  stream = document_stream(cfg, tokenizer, seed=1, shard=shard, shards=shards)
  docs = token_tuples(stream, n)
  return {tokenizer.decode(list(d)).split('-')[0] for d in docs}, docs


def test_data_shards_read_disjoint_files_and_the_same_shard_the_same(corpus, tokenizer):
  cfg = data_cfg(corpus)
  files = [{f'doc {i}' for i in range(s, 6, 2)} for s in (0, 1)]
  first, docs0 = epoch_files(cfg, tokenizer, 0, 2, 90)
  second, docs1 = epoch_files(cfg, tokenizer, 1, 2, 90)
  assert (first, second) == tuple(files)
  assert collections.Counter(docs0 + docs1) == collections.Counter(
    in_memory_documents(cfg, tokenizer)
  )
  assert epoch_files(cfg, tokenizer, 1, 2, 90)[1] == docs1


def test_another_process_with_the_same_shard_gets_the_same_batches(corpus, tmp_path):
  cfg = data_cfg(corpus)
  here = pipeline.build(cfg, seed=2, split='train', process_index=1, process_count=2)
  expected = np.stack([next(here)['inputs'] for _ in range(5)])
  other = pipeline.build(cfg, seed=2, split='train', process_index=0, process_count=2)
  assert not np.array_equal(np.stack([next(other)['inputs'] for _ in range(5)]), expected)
  script = (
    'import json, sys, ml_collections, numpy as np\n'
    'from data_pipeline import pipeline\n'
    'cfg = ml_collections.ConfigDict(json.loads(sys.argv[1]))\n'
    "b = pipeline.build(cfg, seed=2, split='train', process_index=1, process_count=2)\n"
    "np.save(sys.argv[2], np.stack([next(b)['inputs'] for _ in range(5)]))\n"
  )
  out = str(tmp_path / 'batches.npy')
  subprocess.run(
    [sys.executable, '-c', script, json.dumps(cfg.to_dict()), out], cwd=REPO, check=True
  )
  np.testing.assert_array_equal(np.load(out), expected)


def test_a_source_with_fewer_files_than_shards_is_split_by_record(tmp_path, tokenizer):
  write_corpus(str(tmp_path), files=1, docs=40)
  cfg = data_cfg(str(tmp_path))
  docs = [epoch_files(cfg, tokenizer, shard, 3, 13)[1] for shard in range(3)]
  everything = collections.Counter(in_memory_documents(cfg, tokenizer))
  assert not set(docs[0]) & set(docs[1]) and not set(docs[1]) & set(docs[2])
  assert sum(len(set(d)) for d in docs) == 39 and all(everything[d] for ds in docs for d in ds)


def test_a_corrupt_line_and_a_truncated_gz_are_reported_and_skipped(tmp_path, tokenizer, caplog):
  rng = np.random.default_rng(0)
  good = [
    json.dumps({'text': f'good document {i} ' + ' '.join(rng.choice(WORDS, 8))}) for i in range(600)
  ]
  with open(tmp_path / 'a.jsonl', 'w') as f:
    f.write('\n'.join(good[:5] + ['{"text": "cut off', *good[5:10]]) + '\n')
  whole = gzip.compress(('\n'.join(good[10:]) + '\n').encode(), mtime=0)
  with open(tmp_path / 'b.jsonl.gz', 'wb') as f:
    f.write(whole[: len(whole) // 2])  # the first part of its lines, then a cut
  cfg = data_cfg(str(tmp_path))
  with caplog.at_level(logging.WARNING):
    stream = document_stream(cfg, tokenizer)
    texts = {tokenizer.decode(list(t[:-1])).split(' ')[2] for t in token_tuples(stream, 500)}
  messages = '\n'.join(r.getMessage() for r in caplog.records)
  assert f'{tmp_path / "a.jsonl"}:6: malformed JSON' in messages
  assert f'{tmp_path / "b.jsonl.gz"}: truncated or corrupt compressed data after line' in messages
  # Both files' good records are kept: those after the bad line, those before the cut.
  assert {'0', '5', '9', '10', '100'} <= texts and '599' not in texts
  assert stream.skipped >= 2
  batches = pipeline.build(cfg, seed=0, split='train')
  for _ in range(3):
    next(batches)
  assert batches.skipped_records >= 1
  with pytest.raises(ValueError, match='a.jsonl:6: malformed JSON'):
    token_tuples(document_stream(data_cfg(str(tmp_path), strict=True), tokenizer), 200)


def test_a_source_without_usable_records_is_an_error(tmp_path, tokenizer):
  with open(tmp_path / 'bad.jsonl', 'w') as f:
    f.write('{"text": ""}\n{"other": "x"}\n')
  with pytest.raises(ValueError, match="source 'corpus': no usable record"):
    next(document_stream(data_cfg(str(tmp_path)), tokenizer))


def test_a_mixture_of_streamed_and_prepared_sources_meets_its_shares(tmp_path):
  write_corpus(str(tmp_path / 'a'), files=3, docs=40, seed=1)
  write_corpus(str(tmp_path / 'b'), files=2, docs=40, seed=2)
  request = prepare.Request(
    inputs=tuple(sources.match_files(str(tmp_path / 'b'))), tokenizer=DEMO_TOKENIZER
  )
  prepare.prepare(request, str(tmp_path / 'b-prepared'), progress=False)
  bank = tmp_path / 'bank.json'
  bank.write_text(
    json.dumps({'a': {'weight': 3, 'path': 'a'}, 'b': {'weight': 1, 'path': 'b-prepared'}})
  )
  cfg = data_cfg('', mixture=str(bank), global_batch_size=8)
  batches = pipeline.build(cfg, seed=0, split='train')
  for _ in range(60):
    next(batches)
  shares = batches.realised_shares()
  assert abs(shares['a'] - 0.75) < 0.03, shares
  state = json.loads(json.dumps(batches.get_state()))
  assert state['batches']['parent_state']['sources'][1].keys() == {'index'}  # the prepared one
  expected = [next(batches) for _ in range(5)]
  resumed = pipeline.build(cfg, seed=0, split='train')
  resumed.set_state(state)
  assert batches_equal([next(resumed) for _ in range(5)], expected)


def test_a_position_of_the_other_reader_is_refused(corpus):
  streamed = pipeline.build(data_cfg(corpus), seed=0, split='train')
  next(streamed)
  in_memory = pipeline.build(data_cfg(corpus, stream=False), seed=0, split='train')
  with pytest.raises(ValueError, match='saved with data.stream=True and this run has False'):
    in_memory.set_state(streamed.get_state())
  with pytest.raises(ValueError, match='data.shuffle_buffer must be an integer >= 1'):
    pipeline.build(data_cfg(corpus, shuffle_buffer=0), seed=0, split='train')


def test_training_on_a_stream_resumes_to_the_same_losses(corpus, tmp_path):
  """The small run of tests/helpers.py (so the suite's compilation cache serves it) on a streamed
  corpus: killed after step 5 and resumed, it logs the uninterrupted run's numbers."""
  from k2jax.training.run import train

  overrides = {
    'data.stream': True,
    'data.train_files': corpus,
    'data.shuffle_buffer': 32,
    'checkpoint.every': 5,
  }
  reference = train(small_config(**overrides), str(tmp_path / 'reference'))
  workdir = str(tmp_path / 'resumed')
  first = train(small_config(**overrides), workdir, stop_after=5)
  second = train(small_config(**overrides), workdir)
  assert [r['step'] for r in second if 'loss' in r] == list(range(6, SMALL_STEPS + 1))
  assert exact(first + second) == exact(reference)
