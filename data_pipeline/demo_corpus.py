"""Generates the small synthetic corpus bundled for the offline demo.

    python -m data_pipeline.demo_corpus --out=data_pipeline/demo

Writes `train.jsonl` and `eval.jsonl` in the TxT360 layout: one JSON object per
line with a `text` string and a `meta` dict. The text is templated on purpose:
a ~5M-parameter model should see its loss fall within a hundred steps, so the
documents repeat a small vocabulary and regular structure (invented
encyclopedia entries, arithmetic worked out in `<think>` traces, short
stories, lists and a few ChatML dialogs).

It also writes `sft/train.parquet` and `sft/eval.parquet` in the
TxT360-3efforts layout: a `conversations` column, a list of turns
{role, content, tool_calls, think, think_fast, think_faster} (None where a
turn lacks the field; tool_calls a JSON string). They hold single- and
multi-turn arithmetic with worked reasoning in the effort's field, identity
questions and tool calls (get_weather, calculator), effort shares 40/35/25.

Everything comes from `random.Random(seed)`, so the same seed gives
byte-identical JSONL files and the same parquet values (tests check the
committed files against this script).
"""

import argparse
import json
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.chat import DEFAULT_SYSTEM_PROMPT

TRAIN_SEED = 1234
EVAL_SEED = 98765
TRAIN_DOCS = 3000
EVAL_DOCS = 150

_SYLLABLES = [
  'ka',
  'lo',
  'mi',
  'ren',
  'tor',
  'va',
  'shi',
  'dun',
  'bel',
  'or',
  'an',
  'ith',
  'zu',
  'mar',
  'pel',
  'quo',
  'sa',
  'nev',
  'ul',
  'dra',
]
_PLACE_KINDS = [
  'river town',
  'mountain village',
  'port city',
  'desert oasis',
  'island kingdom',
  'forest hamlet',
  'mining town',
  'valley city',
]
_EXPORTS = [
  'copper',
  'salt',
  'wool',
  'glass',
  'tea',
  'timber',
  'silver',
  'honey',
  'paper',
  'rice',
  'iron',
  'olive oil',
]
_CLIMATES = ['cold and windy', 'warm and dry', 'mild and rainy', 'hot and humid']
_ANIMALS = ['fox', 'rabbit', 'owl', 'turtle', 'bear', 'mouse', 'heron', 'wolf', 'goat', 'cat']
_ADJECTIVES = [
  'curious',
  'brave',
  'sleepy',
  'clever',
  'shy',
  'kind',
  'proud',
  'quiet',
  'cheerful',
  'stubborn',
]
_OBJECTS = [
  'a red lantern',
  'an old map',
  'a silver key',
  'a wooden boat',
  'a blue feather',
  'a small drum',
  'a golden apple',
  'a lost letter',
]
_FRIENDS = [
  'a wise old tortoise',
  'a group of singing birds',
  'a lonely giant',
  'a lost little duck',
  'a busy beaver',
  'a friendly dragon',
]
_LESSONS = [
  'that kindness is never wasted',
  'that patience brings its own reward',
  'that friends make every road shorter',
  'that courage grows when it is used',
  'that honesty is the best path home',
]
_FRUITS = [
  'apples',
  'pears',
  'plums',
  'cherries',
  'grapes',
  'figs',
  'lemons',
  'peaches',
  'melons',
  'oranges',
]
_DAYS = ['Monday', 'Tuesday', 'Wednesday', 'Thursday', 'Friday', 'Saturday', 'Sunday']
_COLORS = ['red', 'orange', 'yellow', 'green', 'blue', 'indigo', 'violet']
_NUMBER_WORDS = [
  'zero',
  'one',
  'two',
  'three',
  'four',
  'five',
  'six',
  'seven',
  'eight',
  'nine',
  'ten',
  'eleven',
  'twelve',
]
_SYSTEM_PROMPT = 'You are K2, a helpful assistant.'


def _invented_name(rng: random.Random) -> str:
  return ''.join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def encyclopedia_entry(rng: random.Random) -> str:
  name, province, founder = (_invented_name(rng) for _ in range(3))
  kind = rng.choice(_PLACE_KINDS)
  year = rng.randint(900, 1900)
  population = rng.randint(2, 900) * 100
  exports = rng.sample(_EXPORTS, 2)
  sentences = [
    f'{name} is a {kind} in the province of {province}.',
    f'It was founded in {year} by {founder}.',
    f'The population of {name} is {population:,}.',
    f'The main exports of {name} are {exports[0]} and {exports[1]}.',
    f'The climate of {name} is {rng.choice(_CLIMATES)}.',
  ]
  if rng.random() < 0.5:
    rival = _invented_name(rng)
    sentences.append(f'{name} has long traded with the nearby town of {rival}.')
  if rng.random() < 0.5:
    sentences.append(
      f'Every year in spring, the people of {name} hold a festival in honor of {founder}.'
    )
  return f'{name}\n\n' + ' '.join(sentences) + '\n'


def _addition_trace(a: int, b: int) -> str:
  """Column addition, one digit per line, the way a reasoning trace would do it."""
  lines, carry, digits = [], 0, []
  xs, ys = str(a)[::-1], str(b)[::-1]
  for i in range(max(len(xs), len(ys))):
    x = int(xs[i]) if i < len(xs) else 0
    y = int(ys[i]) if i < len(ys) else 0
    total = x + y + carry
    lines.append(f'{x} + {y} + {carry} = {total}, write {total % 10}, carry {total // 10}.')
    digits.append(str(total % 10))
    carry = total // 10
  if carry:
    lines.append(f'Write the final carry {carry}.')
    digits.append(str(carry))
  lines.append(f'So the result is {"".join(reversed(digits))}.')
  return '\n'.join(lines)


def _arithmetic_problem(rng: random.Random) -> tuple[str, str, int]:
  """Returns (question, reasoning, answer)."""
  kind = rng.choice(['add', 'sub', 'mul'])
  if kind == 'add':
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    return f'What is {a} + {b}?', _addition_trace(a, b), a + b
  if kind == 'sub':
    a, b = sorted((rng.randint(10, 999), rng.randint(10, 999)), reverse=True)
    steps = (
      f'We need {a} - {b}.\nCheck by adding back: {b} + {a - b} = {a}.\nSo the result is {a - b}.'
    )
    return f'What is {a} - {b}?', steps, a - b
  a, b = rng.randint(2, 12), rng.randint(2, 99)
  tens, ones = b // 10 * 10, b % 10
  steps = (
    f'Split {b} into {tens} + {ones}.\n{a} x {tens} = {a * tens}.\n'
    f'{a} x {ones} = {a * ones}.\n{a * tens} + {a * ones} = {a * b}.\n'
    f'So the result is {a * b}.'
  )
  return f'What is {a} x {b}?', steps, a * b


def arithmetic_worksheet(rng: random.Random) -> str:
  parts = ['Arithmetic practice. Think step by step, then answer.\n']
  for number in range(1, rng.randint(3, 5) + 1):
    question, reasoning, answer = _arithmetic_problem(rng)
    parts.append(
      f'Problem {number}: {question}\n<think>\n{reasoning}\n</think>\nAnswer: {answer}\n'
    )
  return '\n'.join(parts)


def short_story(rng: random.Random) -> str:
  name = _invented_name(rng)
  animal, adjective = rng.choice(_ANIMALS), rng.choice(_ADJECTIVES)
  home, thing = _invented_name(rng), rng.choice(_OBJECTS)
  friend, lesson = rng.choice(_FRIENDS), rng.choice(_LESSONS)
  days = rng.randint(2, 9)
  return (
    f'Once upon a time, a {adjective} {animal} named {name} lived near the village '
    f'of {home}. Every morning, {name} walked to the edge of the forest to watch '
    f'the sun rise.\n\n'
    f'One day, {name} found {thing} hidden under a stone. "Where did this come '
    f'from?" asked {name}. Nobody in {home} knew the answer, so {name} decided '
    f'to find out.\n\n'
    f'The journey took {_NUMBER_WORDS[days]} days. On the way, {name} met '
    f'{friend}, who helped the {animal} cross a wide river. At last they found '
    f'the owner of {thing}, who thanked them with a warm meal.\n\n'
    f'When {name} came home to {home}, the {animal} had learned {lesson}.\n'
  )


def list_document(rng: random.Random) -> str:
  kind = rng.choice(['shopping', 'count', 'days', 'colors'])
  if kind == 'shopping':
    items = rng.sample(_FRUITS, rng.randint(3, 6))
    lines = [f'{i}. {rng.randint(1, 12)} {item}' for i, item in enumerate(items, 1)]
    return f'Shopping list for {_invented_name(rng)}:\n' + '\n'.join(lines) + '\n'
  if kind == 'count':
    step, start = rng.randint(2, 9), rng.randint(0, 20)
    numbers = ', '.join(str(start + step * i) for i in range(10))
    return f'Counting by {step} starting at {start}: {numbers}.\n'
  if kind == 'days':
    first = rng.randrange(7)
    order = [_DAYS[(first + i) % 7] for i in range(7)]
    return (
      f'The week starting on {order[0]}:\n'
      + '\n'.join(f'- {d}' for d in order)
      + f'\nThe day after {order[-1]} is {order[0]}.\n'
    )
  return (
    'The colors of the rainbow, in order:\n'
    + '\n'.join(f'{i}. {c}' for i, c in enumerate(_COLORS, 1))
    + '\n'
  )


def chat_dialog(rng: random.Random) -> str:
  """A ChatML dialog; exercises the special tokens the tokenizer keeps whole."""
  question, reasoning, answer = _arithmetic_problem(rng)
  # The three K2-V2 reasoning efforts: long, medium and short traces.
  effort = rng.choice(['think', 'think_fast', 'think_faster'])
  if effort == 'think_faster':
    reasoning = reasoning.splitlines()[-1]
  elif effort == 'think_fast':
    reasoning = '\n'.join(reasoning.splitlines()[-2:])
  system = f'<|im_start|>system\n{_SYSTEM_PROMPT}<|im_end|>\n' if rng.random() < 0.3 else ''
  return (
    f'{system}<|im_start|>user\n{question}<|im_end|>\n'
    f'<|im_start|>assistant\n<{effort}>\n{reasoning}\n</{effort}>\n'
    f'The answer is {answer}.<|im_end|>\n'
  )


# (source name, generator, weight): weights set each kind's share of documents.
_GENERATORS = [
  ('demo/encyclopedia', encyclopedia_entry, 0.30),
  ('demo/arithmetic', arithmetic_worksheet, 0.20),
  ('demo/stories', short_story, 0.20),
  ('demo/lists', list_document, 0.15),
  ('demo/chat', chat_dialog, 0.15),
]


def generate_documents(seed: int, count: int, split: str) -> list[dict]:
  rng = random.Random(seed)
  sources = [source for source, _, _ in _GENERATORS]
  weights = [weight for _, _, weight in _GENERATORS]
  generators = {source: fn for source, fn, _ in _GENERATORS}
  docs = []
  for index in range(count):
    source = rng.choices(sources, weights)[0]
    docs.append(
      {'text': generators[source](rng), 'meta': {'source': source, 'id': f'{split}-{index:05d}'}}
    )
  return docs


def write_jsonl(path: str, docs: list[dict]) -> None:
  # Fixed key order and ASCII escapes keep the bytes identical across platforms.
  with open(path, 'w', encoding='utf-8', newline='\n') as f:
    for doc in docs:
      f.write(json.dumps(doc, ensure_ascii=True) + '\n')


def write_corpus(out_dir: str) -> None:
  os.makedirs(out_dir, exist_ok=True)
  write_jsonl(
    os.path.join(out_dir, 'train.jsonl'), generate_documents(TRAIN_SEED, TRAIN_DOCS, 'train')
  )
  write_jsonl(os.path.join(out_dir, 'eval.jsonl'), generate_documents(EVAL_SEED, EVAL_DOCS, 'eval'))


# --- SFT conversations (TxT360-3efforts layout) -----------------------------

SFT_TRAIN_SEED = 4321
SFT_EVAL_SEED = 56789
SFT_TRAIN_CONVERSATIONS = 1500
SFT_EVAL_CONVERSATIONS = 60

# K2-V2's SFT mixture: each assistant turn's reasoning field and its share.
_EFFORT_SHARES = {'think': 0.40, 'think_fast': 0.35, 'think_faster': 0.25}
_TURN_KEYS = ('role', 'content', 'tool_calls', 'think', 'think_fast', 'think_faster')
_CONDITIONS = ['sunny', 'cloudy', 'rainy', 'windy', 'foggy', 'snowy']
_IDENTITY_QUESTIONS = [
  'Who are you?',
  'What is your name?',
  'Who created you?',
  'Tell me about yourself.',
]
_IDENTITY_ANSWER = (
  'I am K2, a helpful assistant created by the MBZUAI Institute of Foundation Models.'
)


def _turn(role: str, content: str | None, **fields) -> dict:
  """A turn as parquet gives it back: every key present, None where unset."""
  return {key: fields.get(key) for key in _TURN_KEYS} | {'role': role, 'content': content}


def _assistant(
  rng: random.Random, reasoning: str, content: str | None, tool_calls: list | None = None
) -> dict:
  """Lower efforts keep only the last lines: shorter reasoning, same answer."""
  field = rng.choices(list(_EFFORT_SHARES), list(_EFFORT_SHARES.values()))[0]
  lines = reasoning.splitlines()
  keep = {'think': len(lines), 'think_fast': 2, 'think_faster': 1}[field]
  calls = None if tool_calls is None else json.dumps(tool_calls)
  return _turn('assistant', content, tool_calls=calls, **{field: '\n'.join(lines[-keep:])})


def sft_arithmetic(rng: random.Random) -> list[dict]:
  question, reasoning, answer = _arithmetic_problem(rng)
  return [_turn('user', question), _assistant(rng, reasoning, f'The answer is {answer}.')]


def sft_follow_up(rng: random.Random) -> list[dict]:
  """Multi-turn: each follow-up adds to the previous answer."""
  question, reasoning, answer = _arithmetic_problem(rng)
  turns = [_turn('user', question), _assistant(rng, reasoning, f'The answer is {answer}.')]
  for _ in range(rng.randint(1, 2)):
    addend = rng.randint(10, 99)
    turns += [
      _turn('user', f'Now add {addend} to that.'),
      _assistant(
        rng,
        f'The previous answer was {answer}.\n' + _addition_trace(answer, addend),
        f'The answer is {answer + addend}.',
      ),
    ]
    answer += addend
  return turns


def sft_identity(rng: random.Random) -> list[dict]:
  reasoning = 'The user asks who I am.\nI am K2, made by MBZUAI IFM.\nI should answer briefly.'
  return [
    _turn('user', rng.choice(_IDENTITY_QUESTIONS)),
    _assistant(rng, reasoning, _IDENTITY_ANSWER),
  ]


def sft_weather(rng: random.Random) -> list[dict]:
  city, condition = _invented_name(rng), rng.choice(_CONDITIONS)
  degrees = rng.randint(-5, 35)
  result = {'city': city, 'temperature_c': degrees, 'condition': condition}
  return [
    _turn('user', f'What is the weather in {city} today?'),
    _assistant(
      rng,
      f'The user asks about the weather in {city}.\n'
      'I cannot know it without a tool.\n'
      f'I will call get_weather for {city}.',
      None,
      [{'name': 'get_weather', 'arguments': {'city': city}}],
    ),
    _turn('tool', json.dumps(result)),
    _assistant(
      rng,
      f'The tool answered for {city}.\nIt is {condition} and {degrees} degrees.',
      f'It is {condition} in {city} today, {degrees} degrees Celsius.',
    ),
  ]


def sft_calculator(rng: random.Random) -> list[dict]:
  a, b = rng.randint(100, 999), rng.randint(10, 99)
  expression = f'{a} * {b}'
  # OpenAI style with a JSON-string `arguments`, the other shape chat accepts.
  call = {
    'type': 'function',
    'function': {'name': 'calculator', 'arguments': json.dumps({'expression': expression})},
  }
  return [
    _turn('user', f'Use the calculator to compute {expression}.'),
    _assistant(
      rng,
      f'The user wants {expression}.\n'
      'Large products are safer with the tool.\n'
      f'I will call calculator with {expression}.',
      None,
      [call],
    ),
    _turn('tool', json.dumps({'result': a * b})),
    _assistant(rng, f'The calculator returned {a * b}.\nReport it.', f'{expression} = {a * b}.'),
  ]


# (source, generator, weight, chance of a system turn); the chances follow
# K2-V2's data (0.5 for identity sources, 0.1 otherwise), raised to show more.
_SFT_GENERATORS = [
  ('demo/sft-arithmetic', sft_arithmetic, 0.45, 0.2),
  ('demo/sft-follow-up', sft_follow_up, 0.20, 0.2),
  ('demo/sft-identity', sft_identity, 0.10, 0.5),
  ('demo/sft-weather', sft_weather, 0.12, 0.2),
  ('demo/sft-calculator', sft_calculator, 0.13, 0.2),
]


def generate_conversations(seed: int, count: int, split: str) -> list[dict]:
  """Records {id, source, conversations} as pyarrow reads them back."""
  rng = random.Random(seed)
  weights = [weight for _, _, weight, _ in _SFT_GENERATORS]
  records = []
  for index in range(count):
    source, generate, _, system_chance = rng.choices(_SFT_GENERATORS, weights)[0]
    turns = generate(rng)
    if rng.random() < system_chance:
      turns.insert(0, _turn('system', DEFAULT_SYSTEM_PROMPT))
    records.append({'id': f'{split}-{index:05d}', 'source': source, 'conversations': turns})
  return records


_SFT_SCHEMA = pa.schema(
  [
    ('id', pa.string()),
    ('source', pa.string()),
    ('conversations', pa.list_(pa.struct([(key, pa.string()) for key in _TURN_KEYS]))),
  ]
)


def write_sft(out_dir: str) -> None:
  sft_dir = os.path.join(out_dir, 'sft')
  os.makedirs(sft_dir, exist_ok=True)
  for name, seed, count in (
    ('train', SFT_TRAIN_SEED, SFT_TRAIN_CONVERSATIONS),
    ('eval', SFT_EVAL_SEED, SFT_EVAL_CONVERSATIONS),
  ):
    table = pa.Table.from_pylist(generate_conversations(seed, count, name), schema=_SFT_SCHEMA)
    pq.write_table(table, os.path.join(sft_dir, f'{name}.parquet'), compression='zstd')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default='data_pipeline/demo', help='output directory')
  args = parser.parse_args()
  write_corpus(args.out)
  write_sft(args.out)
  print(f'wrote train.jsonl, eval.jsonl and sft/{{train,eval}}.parquet to {args.out}')


if __name__ == '__main__':
  main()
