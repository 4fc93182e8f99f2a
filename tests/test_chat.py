"""Tests for data_pipeline.chat and the demo SFT conversations."""

import collections
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_pipeline import chat, demo_corpus
from data_pipeline.tokenizer import SPECIAL_TOKENS, load_tokenizer

DEMO_DIR = os.path.join(os.path.dirname(__file__), '..', 'data_pipeline', 'demo')
SFT_DIR = os.path.join(DEMO_DIR, 'sft')
FIELDS = {'high': 'think', 'medium': 'think_fast', 'low': 'think_faster'}
TAGS = {
  'high': ('<think>', '</think>'),
  'medium': ('<think_fast>', '</think_fast>'),
  'low': ('<think_faster>', '</think_faster>'),
}
F, T = False, True


@pytest.fixture(scope='module')
def tok():
  return load_tokenizer(os.path.join(DEMO_DIR, 'tokenizer.model'))


def expected(tok, *pieces):
  """Tokens and mask from (piece, trained) pairs; tags one token, text encoded alone."""
  tokens, mask = [], []
  for piece, trained in pieces:
    ids = [tok.special_token_id(piece)] if piece in SPECIAL_TOKENS else tok.encode(piece)
    tokens += ids
    mask += [trained] * len(ids)
  return tokens, mask


def check_sample(sample, tokens, mask):
  assert sample['tokens'].dtype == np.int32 and sample['target_mask'].dtype == np.bool_
  assert sample['tokens'].tolist() == tokens
  assert sample['target_mask'].tolist() == mask


def trained_text(tok, sample):
  return tok.decode(sample['tokens'][sample['target_mask']])


def user(text):
  return {'role': 'user', 'content': text}


def header(role):
  return [('<|im_start|>', F), (role + '\n', F)]


def closed_turn(role, text):
  return header(role) + [(text, F), ('<|im_end|>', F), ('\n', F)]


QUESTION = 'What is 12 + 30?'
REASONING = '2 + 0 = 2.\n1 + 3 = 4.\nSo the result is 42.'
ANSWER = 'The answer is 42.'
WEATHER_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lomi"}}\n</tool_call>'


# --- samples -----------------------------------------------------------------


@pytest.mark.parametrize('effort', ['high', 'medium', 'low'])
def test_single_turn_each_effort(tok, effort):
  conversation = [
    user(QUESTION),
    {'role': 'assistant', 'content': ANSWER, FIELDS[effort]: REASONING},
  ]
  open_tag, close_tag = TAGS[effort]
  sample = chat.render_sample(conversation, 1, tok)
  check_sample(
    sample,
    *expected(
      tok,
      *closed_turn('user', QUESTION),
      *header('assistant'),
      (open_tag, F),
      (REASONING, T),
      (close_tag, T),
      (ANSWER, T),
      ('<|im_end|>', T),
    ),
  )
  assert trained_text(tok, sample) == REASONING + close_tag + ANSWER + '<|im_end|>'
  # The opening tag is the last untrained token: the prompt supplies it.
  first = int(np.argmax(sample['target_mask']))
  assert sample['tokens'][first - 1] == tok.special_token_id(open_tag)
  assert chat.effort_of(conversation[1]) == effort


def test_target_without_reasoning(tok):
  conversation = [user(QUESTION), {'role': 'assistant', 'content': ANSWER}]
  sample = chat.render_sample(conversation, 1, tok)
  check_sample(
    sample,
    *expected(
      tok, *closed_turn('user', QUESTION), *header('assistant'), (ANSWER, T), ('<|im_end|>', T)
    ),
  )
  assert trained_text(tok, sample) == ANSWER + '<|im_end|>'
  assert chat.effort_of(conversation[1]) is None


def tool_conversation():
  return [
    user('Weather in Lomi?'),
    {
      'role': 'assistant',
      'content': None,
      'think_fast': 'Call the tool.',
      'tool_calls': [{'name': 'get_weather', 'arguments': {'city': 'Lomi'}}],
    },
    {'role': 'tool', 'content': '{"temp": 20}'},
    {'role': 'assistant', 'content': 'It is 20 degrees.', 'think': 'The tool said 20.'},
  ]


def test_tool_call_turn_is_trained(tok):
  sample = chat.render_sample(tool_conversation(), 1, tok)
  check_sample(
    sample,
    *expected(
      tok,
      *closed_turn('user', 'Weather in Lomi?'),
      *header('assistant'),
      ('<think_fast>', F),
      ('Call the tool.', T),
      ('</think_fast>', T),
      (WEATHER_CALL, T),
      ('<|im_end|>', T),
    ),
  )
  assert trained_text(tok, sample) == 'Call the tool.</think_fast>' + WEATHER_CALL + '<|im_end|>'


def test_tool_result_turn_is_context(tok):
  sample = chat.render_sample(tool_conversation(), 3, tok)
  check_sample(
    sample,
    *expected(
      tok,
      *closed_turn('user', 'Weather in Lomi?'),
      # The earlier assistant turn keeps its call but loses its reasoning.
      *closed_turn('assistant', WEATHER_CALL),
      *closed_turn('tool', '{"temp": 20}'),
      *header('assistant'),
      ('<think>', F),
      ('The tool said 20.', T),
      ('</think>', T),
      ('It is 20 degrees.', T),
      ('<|im_end|>', T),
    ),
  )
  assert 'Call the tool.' not in chat.render_text(tool_conversation(), 3)


def test_tool_call_shapes(tok):
  openai_call = {
    'type': 'function',
    'function': {'name': 'get_weather', 'arguments': '{"city": "Zürich", "days": 2}'},
  }
  plain_call = {'name': 'calculator', 'arguments': {'expression': '2 * 3'}}
  turn = {'role': 'assistant', 'content': 'Let me check.', 'tool_calls': [openai_call, plain_call]}
  conversation = [user('Hi'), turn]
  calls = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", '
    '"days": 2}}\n</tool_call>\n<tool_call>\n{"name": "calculator", '
    '"arguments": {"expression": "2 * 3"}}\n</tool_call>'
  )
  text = chat.render_text(conversation, 1)
  assert text.endswith('<|im_start|>assistant\nLet me check.\n' + calls + '<|im_end|>')
  sample = chat.render_sample(conversation, 1, tok)
  assert trained_text(tok, sample) == 'Let me check.\n' + calls + '<|im_end|>'
  # A JSON string of calls (the demo parquet's shape) renders the same.
  as_json = dict(turn, tool_calls=json.dumps([openai_call, plain_call]))
  assert chat.render_text([user('Hi'), as_json], 1) == text
  # Missing arguments mean no arguments.
  bare = [user('Hi'), {'role': 'assistant', 'content': '', 'tool_calls': [{'name': 'now'}]}]
  assert chat.render_text(bare, 1).endswith(
    'assistant\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call><|im_end|>'
  )


def multi_turn():
  return [
    user('What is 1 + 1?'),
    {'role': 'assistant', 'content': 'It is 2.', 'think': 'one plus one'},
    user('Add 3.'),
    {'role': 'assistant', 'content': 'It is 5.', 'think_faster': 'two plus three'},
    user('Add 4.'),
    {'role': 'assistant', 'content': 'It is 9.', 'think_fast': 'five plus four'},
  ]


def test_multi_turn_one_sample_per_assistant_turn(tok):
  conversation = multi_turn()
  assert chat.assistant_turns(conversation) == [1, 3, 5]
  sample = chat.render_sample(conversation, 5, tok)
  check_sample(
    sample,
    *expected(
      tok,
      *closed_turn('user', 'What is 1 + 1?'),
      *closed_turn('assistant', 'It is 2.'),
      *closed_turn('user', 'Add 3.'),
      *closed_turn('assistant', 'It is 5.'),
      *closed_turn('user', 'Add 4.'),
      *header('assistant'),
      ('<think_fast>', F),
      ('five plus four', T),
      ('</think_fast>', T),
      ('It is 9.', T),
      ('<|im_end|>', T),
    ),
  )
  texts = {t: chat.render_text(conversation, t) for t in (1, 3, 5)}
  assert texts[1] == (
    '<|im_start|>user\nWhat is 1 + 1?<|im_end|>\n<|im_start|>assistant\n'
    '<think>one plus one</think>It is 2.<|im_end|>'
  )
  assert texts[3] == (
    '<|im_start|>user\nWhat is 1 + 1?<|im_end|>\n<|im_start|>assistant\n'
    'It is 2.<|im_end|>\n<|im_start|>user\nAdd 3.<|im_end|>\n'
    '<|im_start|>assistant\n<think_faster>two plus three</think_faster>'
    'It is 5.<|im_end|>'
  )
  assert 'plus' not in texts[5].split('<think_fast>')[0]
  trained = {
    1: 'one plus one</think>It is 2.<|im_end|>',
    3: 'two plus three</think_faster>It is 5.<|im_end|>',
    5: 'five plus four</think_fast>It is 9.<|im_end|>',
  }
  for target, text in trained.items():
    assert trained_text(tok, chat.render_sample(conversation, target, tok)) == text


def test_system_prompt_prepended_only_without_system_turn(tok):
  conversation = [user(QUESTION), {'role': 'assistant', 'content': ANSWER}]
  system = '<|im_start|>system\n' + chat.DEFAULT_SYSTEM_PROMPT + '<|im_end|>\n'
  plain = chat.render_text(conversation, 1)
  assert plain.startswith('<|im_start|>user\n')
  with_prompt = chat.render_text(conversation, 1, system_prompt=chat.DEFAULT_SYSTEM_PROMPT)
  assert with_prompt == system + plain
  sample = chat.render_sample(conversation, 1, tok, system_prompt=chat.DEFAULT_SYSTEM_PROMPT)
  check_sample(
    sample,
    *expected(
      tok,
      *closed_turn('system', chat.DEFAULT_SYSTEM_PROMPT),
      *closed_turn('user', QUESTION),
      *header('assistant'),
      (ANSWER, T),
      ('<|im_end|>', T),
    ),
  )
  own = [{'role': 'system', 'content': 'Be brief.'}] + conversation
  assert (
    chat.render_text(own, 2, system_prompt=chat.DEFAULT_SYSTEM_PROMPT)
    == '<|im_start|>system\nBe brief.<|im_end|>\n' + plain
  )


def test_truncation_cuts_both_arrays(tok):
  conversation = tool_conversation()
  full = chat.render_sample(conversation, 3, tok)
  for max_len in (1, 7, len(full['tokens']) - 1):
    cut = chat.render_sample(conversation, 3, tok, max_len=max_len)
    assert cut['tokens'].tolist() == full['tokens'][:max_len].tolist()
    assert cut['target_mask'].tolist() == full['target_mask'][:max_len].tolist()
  long = chat.render_sample(conversation, 3, tok, max_len=10_000)
  assert long['tokens'].tolist() == full['tokens'].tolist()
  for bad in (0, -3, 2.5):
    with pytest.raises(ValueError, match='max_len must be a positive int'):
      chat.render_sample(conversation, 3, tok, max_len=bad)


def test_render_text_is_decoded_sample(tok):
  conversations = [multi_turn(), tool_conversation()] + [
    r['conversations'] for r in pq.read_table(os.path.join(SFT_DIR, 'eval.parquet')).to_pylist()
  ]
  for conversation in conversations:
    for target in chat.assistant_turns(conversation):
      for system_prompt in (None, chat.DEFAULT_SYSTEM_PROMPT):
        sample = chat.render_sample(conversation, target, tok, system_prompt=system_prompt)
        assert tok.decode(sample['tokens']) == chat.render_text(
          conversation, target, system_prompt=system_prompt
        )


def test_parquet_shaped_turns(tok):
  keys = ('role', 'content', 'tool_calls', 'think', 'think_fast', 'think_faster')
  sparse = tool_conversation()
  full = [{key: turn.get(key) for key in keys} for turn in sparse]
  assert all(len(turn) == 6 for turn in full)
  as_array = np.array(full, dtype=object)
  assert chat.check_conversation(as_array) is as_array
  assert chat.assistant_turns(as_array) == [1, 3]
  # pandas gives nested lists as object arrays too.
  full[1]['tool_calls'] = np.array(full[1]['tool_calls'], dtype=object)
  for target in (1, 3):
    reference = chat.render_sample(sparse, target, tok)
    for variant in (full, as_array):
      sample = chat.render_sample(variant, target, tok)
      assert sample['tokens'].tolist() == reference['tokens'].tolist()
      assert sample['target_mask'].tolist() == reference['target_mask'].tolist()


def test_render_sample_rejects_bad_targets(tok):
  conversation = tool_conversation()
  with pytest.raises(ValueError, match=r"target_turn 2 is not an assistant turn \(role 'tool'\)"):
    chat.render_sample(conversation, 2, tok)
  with pytest.raises(ValueError, match=r'target_turn 0 is not an assistant turn'):
    chat.render_text(conversation, 0)
  for bad in (4, -1, True, '1'):
    with pytest.raises(ValueError, match='is not a turn index'):
      chat.render_sample(conversation, bad, tok)


# --- prompts -----------------------------------------------------------------


@pytest.mark.parametrize('effort', ['high', 'medium', 'low'])
def test_render_prompt_ends_with_open_tag(tok, effort):
  messages = multi_turn()[:5]
  ids = chat.render_prompt(messages, tok, effort)
  open_tag = TAGS[effort][0]
  tail = (
    [tok.special_token_id('<|im_start|>')]
    + tok.encode('assistant\n')
    + [tok.special_token_id(open_tag)]
  )
  assert ids[-len(tail) :] == tail
  # Same context as the training sample of turn 5, reasoning of history dropped.
  assert tok.decode(ids) == chat.render_text(multi_turn(), 5).split('<think_fast>')[0] + open_tag
  with_system = chat.render_prompt(
    [user('Hi')], tok, effort, system_prompt=chat.DEFAULT_SYSTEM_PROMPT
  )
  assert tok.decode(with_system) == (
    f'<|im_start|>system\n{chat.DEFAULT_SYSTEM_PROMPT}<|im_end|>\n'
    f'<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n{open_tag}'
  )


def test_render_prompt_defaults_and_errors(tok):
  ids = chat.render_prompt([user('Hi')], tok)
  assert ids[-1] == tok.special_token_id('<think>')
  with pytest.raises(
    ValueError, match=r"unknown reasoning_effort 'max': expected one of high\|medium\|low"
  ):
    chat.render_prompt([user('Hi')], tok, 'max')


# --- validation --------------------------------------------------------------

ASSISTANT = {'role': 'assistant', 'content': 'ok'}


def bad_call(call):
  return [user('x'), {'role': 'assistant', 'content': '', 'tool_calls': [call]}]


@pytest.mark.parametrize(
  'value, message',
  [
    ('hello', 'conversation must be a list of turns, got str'),
    ({'role': 'user'}, 'conversation must be a list of turns, got dict'),
    ([], 'no assistant turn'),
    ([user('hi'), {'role': 'tool', 'content': 'x'}], 'no assistant turn'),
    ([user('hi'), 'oops'], 'turn 1: expected a dict, got str'),
    ([{'content': 'hi'}, ASSISTANT], "turn 0: missing 'role'"),
    (
      [user('hi'), {'role': 'bot', 'content': 'x'}],
      "turn 1: role 'bot' is not one of system|user|assistant|tool",
    ),
    (
      [{'role': 'user', 'content': None}, ASSISTANT],
      "turn 0: 'content' must be a string, got NoneType",
    ),
    (
      [user('hi'), {'role': 'assistant', 'content': 3}],
      "turn 1: 'content' must be a string, got int",
    ),
    (
      [user('hi'), dict(ASSISTANT, think='a', think_fast='b')],
      "turn 1: both 'think' and 'think_fast' set",
    ),
    (
      [user('hi'), dict(ASSISTANT, think_fast='a', think_faster='b')],
      "turn 1: both 'think_fast' and 'think_faster' set",
    ),
    ([user('hi'), dict(ASSISTANT, think=5)], "turn 1: 'think' must be a string, got int"),
    (
      [dict(user('hi'), think='a'), ASSISTANT],
      "turn 0: 'think' is only allowed on assistant turns, not 'user'",
    ),
    (
      [dict(user('hi'), tool_calls=[{'name': 'f'}]), ASSISTANT],
      "turn 0: 'tool_calls' is only allowed on assistant turns, not 'user'",
    ),
    (
      [user('hi'), {'role': 'assistant', 'content': None}],
      'turn 1: assistant turn has no content, tool_calls or reasoning',
    ),
    ([user('hi'), dict(ASSISTANT, tool_calls='[{')], "turn 1: 'tool_calls' is not valid JSON"),
    (
      [user('hi'), dict(ASSISTANT, tool_calls={'name': 'f'})],
      "turn 1: 'tool_calls' must be a list of calls, got dict",
    ),
    (bad_call('f'), 'turn 1: tool_calls[0]: expected a dict, got str'),
    (
      bad_call({'arguments': {}}),
      "turn 1: tool_calls[0]: 'name' must be a non-empty string, got None",
    ),
    (
      bad_call({'name': '', 'arguments': {}}),
      "tool_calls[0]: 'name' must be a non-empty string, got ''",
    ),
    (
      bad_call({'name': 'f', 'arguments': '{bad'}),
      "turn 1: tool_calls[0]: 'arguments' is not valid JSON",
    ),
    (
      bad_call({'name': 'f', 'arguments': '[1, 2]'}),
      "turn 1: tool_calls[0]: 'arguments' must be a JSON object, got list",
    ),
    (bad_call({'name': 'f', 'arguments': 7}), "'arguments' must be a JSON object, got int"),
    (
      bad_call({'type': 'function', 'function': 'f'}),
      'turn 1: tool_calls[0].function: expected a dict, got str',
    ),
    (
      bad_call({'type': 'function', 'function': {'arguments': '{}'}}),
      "turn 1: tool_calls[0].function: 'name' must be a non-empty string",
    ),
  ],
)
def test_check_conversation_errors(value, message):
  with pytest.raises(ValueError) as error:
    chat.check_conversation(value)
  assert message in str(error.value)


def test_check_conversation_accepts_and_returns():
  conversation = tool_conversation()
  assert chat.check_conversation(conversation) is conversation
  # Empty tool_calls in any shape mean none; a reasoning-only turn is allowed.
  for empty in (None, [], '', '[]'):
    chat.check_conversation([user('hi'), dict(ASSISTANT, tool_calls=empty)])
  chat.check_conversation([user('hi'), {'role': 'assistant', 'content': '', 'think': 'hm'}])
  with pytest.raises(ValueError, match="both 'think' and 'think_faster' set"):
    chat.effort_of({'think': 'a', 'think_fast': None, 'think_faster': 'b'})
  assert chat.effort_of({'think': None, 'think_fast': None, 'think_faster': None}) is None


# --- demo SFT data -----------------------------------------------------------


def read_records(name):
  return pq.read_table(os.path.join(SFT_DIR, f'{name}.parquet')).to_pylist()


def test_demo_conversations_are_valid_and_mixed():
  train, held_out = read_records('train'), read_records('eval')
  assert (len(train), len(held_out)) == (1500, 60)
  efforts = collections.Counter()
  for record in train + held_out:
    conversation = chat.check_conversation(record['conversations'])
    efforts.update(chat.effort_of(conversation[i]) for i in chat.assistant_turns(conversation))
  total = sum(efforts.values())
  assert efforts[None] == 0
  for effort, share in (('high', 0.40), ('medium', 0.35), ('low', 0.25)):
    assert abs(efforts[effort] / total - share) < 0.03, (effort, efforts)
  roles = [[turn['role'] for turn in r['conversations']] for r in train]
  assert 100 < sum(r[0] == 'system' for r in roles) < 600
  assert sum('tool' in r for r in roles) > 200
  assert sum(r.count('assistant') > 1 and 'tool' not in r for r in roles) > 200
  size = sum(os.path.getsize(os.path.join(SFT_DIR, f'{n}.parquet')) for n in ('train', 'eval'))
  assert size < 300_000


def test_demo_sft_regenerates(tmp_path):
  demo_corpus.write_sft(str(tmp_path))
  for name in ('train', 'eval'):
    new = pq.read_table(tmp_path / 'sft' / f'{name}.parquet').to_pylist()
    assert new == read_records(name), f'sft/{name}.parquet is stale: rerun demo_corpus'
  assert new == demo_corpus.generate_conversations(
    demo_corpus.SFT_EVAL_SEED, demo_corpus.SFT_EVAL_CONVERSATIONS, 'eval'
  )
