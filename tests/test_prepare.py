"""Tests for data_pipeline.prepare: offline tokenization to ArrayRecord shards."""

import json
import os
import re
import shutil

import numpy as np
import pytest

from data_pipeline import chat, prepare, sources
from data_pipeline.tokenizer import load_tokenizer
from tests.helpers import REPO

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
  manifest = prepare.read_manifest(out)
  assert manifest['target_mask'] is True
  assert manifest['max_len'] == 200
  assert manifest['max_tokens'] == max(len(tokens) for tokens, _ in shard) == 200  # some were cut
  assert manifest['tokenizer_identity'] == tokenizer.identity()


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


def test_a_rerun_after_the_tokenizer_file_changed_is_refused(tmp_path):
  # The same path, other contents: the shards already written came from the old tokenizer.
  split_corpus(tmp_path / 'raw', parts=2, docs=20)
  tokenizer = tmp_path / 'tok' / 'tokenizer.json'
  tokenizer.parent.mkdir()
  shutil.copyfile(HF_TOKENIZER, tokenizer)
  out = str(tmp_path / 'out')
  asked = request(str(tmp_path / 'raw'), str(tokenizer))
  prepare.prepare(asked, out, progress=False)
  os.remove(os.path.join(out, prepare.MANIFEST))  # as a kill would leave it
  with open(tokenizer, 'w') as f:
    json.dump(json.loads(open(HF_TOKENIZER).read()), f, indent=1)
  with pytest.raises(ValueError, match=re.escape(f'the file at {tokenizer} has changed')):
    prepare.prepare(asked, out, progress=False)


def test_a_rerun_records_the_identity_a_manifest_lacks(tmp_path):
  # A preparation made before identities were recorded: rerunning the same command adds it,
  # without redoing the shards.
  split_corpus(tmp_path / 'raw', parts=2, docs=20)
  out = str(tmp_path / 'out')
  first = prepare.prepare(request(str(tmp_path / 'raw')), out, progress=False)
  for name in (prepare.MANIFEST, prepare.REQUEST):
    with open(os.path.join(out, name)) as f:
      old = json.load(f)
    del old['tokenizer_identity']
    with open(os.path.join(out, name), 'w') as f:
      json.dump(old, f)
  shard = prepare.shard_path(out, 0, '.array_record')
  mtime = os.stat(shard).st_mtime_ns
  assert prepare.prepare(request(str(tmp_path / 'raw')), out, progress=False) == first
  assert prepare.read_manifest(out)['tokenizer_identity'] == load_tokenizer(SP_TOKENIZER).identity()
  assert os.stat(shard).st_mtime_ns == mtime


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


def error_line(err: str) -> str:
  """The one error line of a failed command (stderr also holds the progress bar)."""
  [line] = [line for line in err.splitlines() if line.startswith('error: ')]
  return line


def prepare_cli(tmp_path, inputs, *extra):
  """`python -m data_pipeline.prepare`, in-process, in one process (workers are tested above)."""
  return prepare.main(
    [
      f'--input={inputs}',
      f'--tokenizer={SP_TOKENIZER}',
      f'--output={tmp_path}/out',
      '--workers=1',
      *extra,
    ]
  )


@pytest.mark.parametrize(
  'files, message',
  [
    ({}, 'no supported files match'),  # a glob matching nothing
    ({'a.jsonl': ''}, 'a.jsonl: the file is empty'),  # found before anything is written
    ({'a.jsonl': '\n \n'}, "no usable 'text' values in files matching '{raw}/a.jsonl'"),
    ({'a.jsonl': '{"text": " "}\n', 'b.parquet': ''}, 'b.parquet: the file is empty'),
  ],
)
def test_empty_input_exits_2_leaving_no_output_and_the_fixed_rerun_works(
  tmp_path, capsys, files, message
):
  raw = tmp_path / 'raw'
  raw.mkdir()
  for name, content in files.items():
    (raw / name).write_text(content)
  assert prepare_cli(tmp_path, f'{raw}/*') == 2
  assert message.format(raw=raw) in error_line(capsys.readouterr().err)
  assert not (tmp_path / 'out').exists()
  for name in files:
    os.remove(raw / name)
  split_corpus(raw, parts=2, docs=10)
  assert prepare_cli(tmp_path, f'{raw}/*') == 0
  assert '10 documents' in capsys.readouterr().out


def test_a_folder_left_by_a_run_that_finished_nothing_takes_other_inputs(tmp_path, capsys):
  # The output folder was there before (made by hand): a failed run leaves it as it found it.
  (tmp_path / 'out').mkdir()
  (tmp_path / 'blank.jsonl').write_text('\n')
  assert prepare_cli(tmp_path, tmp_path / 'blank.jsonl') == 2
  assert os.listdir(tmp_path / 'out') == []
  # A run killed before finishing a shard leaves prepare.json: other inputs are still taken.
  split_corpus(tmp_path / 'raw', parts=2, docs=10)
  prepare._check_request(str(tmp_path / 'out'), request(str(tmp_path / 'blank.jsonl')), None)
  capsys.readouterr()
  assert prepare_cli(tmp_path, tmp_path / 'raw') == 0
  assert prepare.read_manifest(str(tmp_path / 'out'))['documents'] == 10


def test_a_bad_file_after_finished_shards_keeps_them_for_the_rerun(tmp_path, capsys):
  split_corpus(tmp_path / 'raw', parts=2, docs=10)
  bad = tmp_path / 'raw' / 'part-2.jsonl'
  bad.write_text('{"text": ""}\n')
  assert prepare_cli(tmp_path, tmp_path / 'raw') == 2
  err = error_line(capsys.readouterr().err)
  assert f'{bad}' in err and '2 finished shard(s) kept' in err
  done = prepare.shard_path(str(tmp_path / 'out'), 0, '.array_record')
  mtime = os.stat(done).st_mtime_ns
  bad.write_text('{"text": "fixed in place"}\n')
  assert prepare_cli(tmp_path, tmp_path / 'raw') == 0
  assert '11 documents' in capsys.readouterr().out
  assert os.stat(done).st_mtime_ns == mtime


def test_an_empty_tokenizer_is_named(tmp_path, capsys):
  split_corpus(tmp_path / 'raw', parts=1, docs=5)
  assert prepare.main([f'--input={tmp_path}/raw', '--tokenizer=', f'--output={tmp_path}/out']) == 2
  assert '--tokenizer is empty' in capsys.readouterr().err
  assert not (tmp_path / 'out').exists()
