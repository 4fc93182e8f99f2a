"""Generates the small synthetic corpus bundled for the offline demo.

    python -m data_pipeline.demo_corpus --out=data_pipeline/demo

Writes `train.jsonl` and `eval.jsonl` in the TxT360 layout: one JSON object per
line with a `text` string and a `meta` dict. The text is templated on purpose:
a ~5M-parameter model should see its loss fall within a hundred steps, so the
documents repeat a small vocabulary and regular structure (invented
encyclopedia entries, arithmetic worked out in `<think>` traces, short
stories, lists and a few ChatML dialogs).

Everything comes from `random.Random(seed)`, so the same seed gives
byte-identical files (a test checks the committed files against this script).
"""

import argparse
import json
import os
import random

TRAIN_SEED = 1234
EVAL_SEED = 98765
TRAIN_DOCS = 3000
EVAL_DOCS = 150

_SYLLABLES = ['ka', 'lo', 'mi', 'ren', 'tor', 'va', 'shi', 'dun', 'bel', 'or',
              'an', 'ith', 'zu', 'mar', 'pel', 'quo', 'sa', 'nev', 'ul', 'dra']
_PLACE_KINDS = ['river town', 'mountain village', 'port city', 'desert oasis',
                'island kingdom', 'forest hamlet', 'mining town', 'valley city']
_EXPORTS = ['copper', 'salt', 'wool', 'glass', 'tea', 'timber', 'silver',
            'honey', 'paper', 'rice', 'iron', 'olive oil']
_CLIMATES = ['cold and windy', 'warm and dry', 'mild and rainy', 'hot and humid']
_ANIMALS = ['fox', 'rabbit', 'owl', 'turtle', 'bear', 'mouse', 'heron', 'wolf',
            'goat', 'cat']
_ADJECTIVES = ['curious', 'brave', 'sleepy', 'clever', 'shy', 'kind', 'proud',
               'quiet', 'cheerful', 'stubborn']
_OBJECTS = ['a red lantern', 'an old map', 'a silver key', 'a wooden boat',
            'a blue feather', 'a small drum', 'a golden apple', 'a lost letter']
_FRIENDS = ['a wise old tortoise', 'a group of singing birds', 'a lonely giant',
            'a lost little duck', 'a busy beaver', 'a friendly dragon']
_LESSONS = ['that kindness is never wasted', 'that patience brings its own reward',
            'that friends make every road shorter', 'that courage grows when it is used',
            'that honesty is the best path home']
_FRUITS = ['apples', 'pears', 'plums', 'cherries', 'grapes', 'figs', 'lemons',
           'peaches', 'melons', 'oranges']
_DAYS = ['Monday', 'Tuesday', 'Wednesday', 'Thursday', 'Friday', 'Saturday',
         'Sunday']
_COLORS = ['red', 'orange', 'yellow', 'green', 'blue', 'indigo', 'violet']
_NUMBER_WORDS = ['zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven',
                 'eight', 'nine', 'ten', 'eleven', 'twelve']
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
    sentences.append(f'Every year in spring, the people of {name} hold a festival '
                     f'in honor of {founder}.')
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
  lines.append(f"So the result is {''.join(reversed(digits))}.")
  return '\n'.join(lines)


def _arithmetic_problem(rng: random.Random) -> tuple[str, str, int]:
  """Returns (question, reasoning, answer)."""
  kind = rng.choice(['add', 'sub', 'mul'])
  if kind == 'add':
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    return f'What is {a} + {b}?', _addition_trace(a, b), a + b
  if kind == 'sub':
    a, b = sorted((rng.randint(10, 999), rng.randint(10, 999)), reverse=True)
    steps = (f'We need {a} - {b}.\nCheck by adding back: {b} + {a - b} = {a}.\n'
             f'So the result is {a - b}.')
    return f'What is {a} - {b}?', steps, a - b
  a, b = rng.randint(2, 12), rng.randint(2, 99)
  tens, ones = b // 10 * 10, b % 10
  steps = (f'Split {b} into {tens} + {ones}.\n{a} x {tens} = {a * tens}.\n'
           f'{a} x {ones} = {a * ones}.\n{a * tens} + {a * ones} = {a * b}.\n'
           f'So the result is {a * b}.')
  return f'What is {a} x {b}?', steps, a * b


def arithmetic_worksheet(rng: random.Random) -> str:
  parts = ['Arithmetic practice. Think step by step, then answer.\n']
  for number in range(1, rng.randint(3, 5) + 1):
    question, reasoning, answer = _arithmetic_problem(rng)
    parts.append(f'Problem {number}: {question}\n<think>\n{reasoning}\n</think>\n'
                 f'Answer: {answer}\n')
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
      f"One day, {name} found {thing} hidden under a stone. \"Where did this come "
      f"from?\" asked {name}. Nobody in {home} knew the answer, so {name} decided "
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
    return (f'The week starting on {order[0]}:\n' + '\n'.join(f'- {d}' for d in order)
            + f'\nThe day after {order[-1]} is {order[0]}.\n')
  return ('The colors of the rainbow, in order:\n'
          + '\n'.join(f'{i}. {c}' for i, c in enumerate(_COLORS, 1)) + '\n')


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
  return (f'{system}<|im_start|>user\n{question}<|im_end|>\n'
          f'<|im_start|>assistant\n<{effort}>\n{reasoning}\n</{effort}>\n'
          f'The answer is {answer}.<|im_end|>\n')


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
    docs.append({'text': generators[source](rng),
                 'meta': {'source': source, 'id': f'{split}-{index:05d}'}})
  return docs


def write_jsonl(path: str, docs: list[dict]) -> None:
  # Fixed key order and ASCII escapes keep the bytes identical across platforms.
  with open(path, 'w', encoding='utf-8', newline='\n') as f:
    for doc in docs:
      f.write(json.dumps(doc, ensure_ascii=True) + '\n')


def write_corpus(out_dir: str) -> None:
  os.makedirs(out_dir, exist_ok=True)
  write_jsonl(os.path.join(out_dir, 'train.jsonl'),
              generate_documents(TRAIN_SEED, TRAIN_DOCS, 'train'))
  write_jsonl(os.path.join(out_dir, 'eval.jsonl'),
              generate_documents(EVAL_SEED, EVAL_DOCS, 'eval'))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default='data_pipeline/demo', help='output directory')
  args = parser.parse_args()
  write_corpus(args.out)
  print(f'wrote train.jsonl and eval.jsonl to {args.out}')


if __name__ == '__main__':
  main()
