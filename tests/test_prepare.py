"""Tests for data_pipeline.prepare: offline tokenization to ArrayRecord shards."""

import json
import os
import re

import numpy as np
import pytest

from data_pipeline import chat, prepare, sources
from data_pipeline.tokenizer import load_tokenizer
from tests.conftest import REPO

DEMO = os.path.join(REPO, 'data_pipeline', 'demo')
SP_TOKENIZER = os.path.join(DEMO, 'tokenizer.model')
HF_TOKENIZER = os.path.join(DEMO, 'tokenizer.json')
SFT_EVAL = os.path.join(DEMO, 'sft', 'eval.parquet')


def split_corpus(directory, parts=3, docs=300) -> list[list[str]]:
  """Writes the first `docs` demo documents round-robin into `parts` JSONL files."""
  texts = sources.read_values(os.path.join(DEMO, 'train.jsonl'), 'text').values[:docs]
  os.makedirs(directory, exist_ok=True)
  split = [texts[i::parts] for i in range(parts)]
  for i, part in enumerate(split):
    with open(os.path.join(directory, f'part-{i}.jsonl'), 'w') as f:
      f.writelines(json.dumps({'text': t, 'meta': {}}) + '\n' for t in part)
  return split


def read_records(directory, has_mask=False):
  from array_record.python import array_record_module

  records = []
  for path in prepare.shard_files(directory):
    reader = array_record_module.ArrayRecordReader(path)
    records.append([prepare.decode_record(r, has_mask) for r in reader.read_all()])
    reader.close()
  return records


def request(inputs, tokenizer=SP_TOKENIZER, **kwargs):
  return prepare.Request(inputs=tuple(sources.match_files(inputs)), tokenizer=tokenizer, **kwargs)


@pytest.mark.parametrize('tokenizer_path', [SP_TOKENIZER, HF_TOKENIZER])
def test_text_shards_hold_the_tokenized_documents(tmp_path, tokenizer_path):
  split = split_corpus(tmp_path / 'raw')
  tokenizer = load_tokenizer(tokenizer_path)
  out = str(tmp_path / 'out')
  manifest = prepare.prepare(request(str(tmp_path / 'raw'), tokenizer_path), out, progress=False)
  records = read_records(out)
  for texts, shard, counts in zip(split, records, manifest['shards']):
    expected = [tokenizer.encode(t) + [tokenizer.eos_id] for t in texts]
    assert [list(tokens) for tokens, _ in shard] == expected
    assert all(mask.all() for _, mask in shard)
    assert counts['documents'] == len(texts)
    assert counts['tokens'] == sum(map(len, expected))
  assert manifest['tokens'] == sum(s['tokens'] for s in manifest['shards'])
  assert manifest['documents'] == 300 and manifest['format'] == 'text'
  assert prepare.read_manifest(out) == manifest


def test_chat_shards_hold_one_sample_per_assistant_turn(tmp_path):
  tokenizer = load_tokenizer(SP_TOKENIZER)
  out = str(tmp_path / 'out')
  prepare.prepare(
    request(SFT_EVAL, format='chat', field='conversations', max_len=200), out, progress=False
  )
  [shard] = read_records(out, has_mask=True)
  conversations = sources.read_values(SFT_EVAL, 'conversations').values
  expected = [
    chat.render_sample(c, t, tokenizer, max_len=200)
    for c in conversations
    for t in chat.assistant_turns(c)
  ]
  assert len(shard) == len(expected) > len(conversations)  # some dialogs have several turns
  for (tokens, mask), sample in zip(shard, expected):
    np.testing.assert_array_equal(tokens, sample['tokens'])
    np.testing.assert_array_equal(mask, sample['target_mask'])
  assert max(len(tokens) for tokens, _ in shard) <= 200
  assert prepare.read_manifest(out)['target_mask'] is True


def test_system_prompt_draws_are_seeded(tmp_path):
  kwargs = dict(format='chat', field='conversations', system_prompt_prob=0.5)
  prepare.prepare(request(SFT_EVAL, **kwargs), str(tmp_path / 'a'), progress=False)
  prepare.prepare(request(SFT_EVAL, **kwargs), str(tmp_path / 'b'), progress=False)
  a, b = read_records(tmp_path / 'a', True), read_records(tmp_path / 'b', True)
  assert all((x[0] == y[0]).all() for x, y in zip(a[0], b[0]))
  tokenizer = load_tokenizer(SP_TOKENIZER)
  with_prompt = sum(tokenizer.decode(t).startswith('<|im_start|>system') for t, _ in a[0])
  assert 0.4 < with_prompt / len(a[0]) < 0.85  # half added, plus the dialogs that had one


def test_rerun_skips_finished_shards_and_repairs_a_killed_run(tmp_path):
  split_corpus(tmp_path / 'raw')
  out = str(tmp_path / 'out')
  first = prepare.prepare(request(str(tmp_path / 'raw')), out, progress=False)
  done = prepare.shard_path(out, 0, '.array_record')
  mtime = os.stat(done).st_mtime_ns
  # As a kill would leave it: shard 1 half written, its counts and the manifest missing.
  os.remove(prepare.shard_path(out, 1, '.json'))
  os.rename(
    prepare.shard_path(out, 1, '.array_record'), prepare.shard_path(out, 1, '.array_record.tmp')
  )
  os.remove(os.path.join(out, prepare.MANIFEST))
  with pytest.raises(FileNotFoundError, match='has not finished'):
    prepare.read_manifest(out)
  again = prepare.prepare(request(str(tmp_path / 'raw')), out, progress=False)
  assert again == first
  assert os.stat(done).st_mtime_ns == mtime  # finished shards are not redone
  assert not os.path.exists(prepare.shard_path(out, 1, '.array_record.tmp'))


def test_workers_give_the_same_shards(tmp_path):
  split_corpus(tmp_path / 'raw', parts=2, docs=100)
  one = prepare.prepare(request(str(tmp_path / 'raw')), str(tmp_path / 'one'), progress=False)
  two = prepare.prepare(
    request(str(tmp_path / 'raw')), str(tmp_path / 'two'), workers=2, progress=False
  )
  assert one['shards'] == two['shards']
  for name in ('00000.array_record', '00001.array_record'):
    with (
      open(tmp_path / 'one' / 'shards' / name, 'rb') as a,
      open(tmp_path / 'two' / 'shards' / name, 'rb') as b,
    ):
      assert a.read() == b.read()


def test_a_rerun_with_other_settings_is_refused(tmp_path):
  split_corpus(tmp_path / 'raw')
  out = str(tmp_path / 'out')
  prepare.prepare(request(str(tmp_path / 'raw')), out, progress=False)
  with pytest.raises(ValueError, match=re.escape('different tokenizer')):
    prepare.prepare(request(str(tmp_path / 'raw'), HF_TOKENIZER), out, progress=False)


def test_command_line_errors_exit_2_with_one_line(tmp_path, capsys):
  split_corpus(tmp_path / 'raw')
  assert (
    prepare.main(
      [
        f'--input={tmp_path}/nothing*.jsonl',
        f'--tokenizer={SP_TOKENIZER}',
        f'--output={tmp_path}/out',
      ]
    )
    == 2
  )
  assert 'nothing*.jsonl' in capsys.readouterr().err
  assert (
    prepare.main(
      [
        f'--input={tmp_path}/raw',
        f'--tokenizer={tmp_path}/missing.model',
        f'--output={tmp_path}/out',
      ]
    )
    == 2
  )
  assert 'missing.model' in capsys.readouterr().err
  assert (
    prepare.main(
      [
        f'--input={tmp_path}/raw',
        f'--tokenizer={SP_TOKENIZER}',
        f'--output={tmp_path}/out',
        '--workers=1',
      ]
    )
    == 0
  )
  assert '300 documents' in capsys.readouterr().out


def test_a_file_without_usable_records_is_an_error_naming_it(tmp_path):
  (tmp_path / 'raw').mkdir()
  (tmp_path / 'raw' / 'bad.jsonl').write_text('{"text": ""}\n{oops\n')
  with pytest.raises(ValueError, match='no usable'):
    prepare.prepare(request(str(tmp_path / 'raw')), str(tmp_path / 'out'), progress=False)
