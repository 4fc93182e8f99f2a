"""Renders TxT360-3efforts conversations to token ids for SFT (K2-V2 style).

A conversation is a list of turns `{role, content, [tool_calls],
[think | think_fast | think_faster]}`; data read from parquet carries every key
on every turn, so None means absent everywhere. ChatML template:

    <|im_start|>system\\n{content}<|im_end|>\\n
    <|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n{open}{reasoning}{close}{content}{tool calls}<|im_end|>\\n
    <|im_start|>tool\\n{content}<|im_end|>\\n

`{open}/{close}` are the reasoning-effort tags (EFFORT_TAGS), one token each.
Each tool call is the plain text `<tool_call>\\n{json}\\n</tool_call>`, preceded
by '\\n' when content or an earlier call comes before it. K2-V2's exact
tool-call tags are not public [?]: this layout is our choice, to be replaced
once the released chat template can be checked.

K2-V2's SFT rule: a dialog becomes one sample per assistant turn and only the
target turn keeps its reasoning; earlier assistant turns show content and tool
calls only. The loss covers the target turn from its reasoning (or content,
without reasoning) through its `<|im_end|>`, where the sample ends.

Each tag and each text piece is encoded on its own, never the whole string, so
the mask lines up with the pieces exactly and the special tags stay one token.
"""

import json
from collections.abc import Mapping

import numpy as np

EFFORT_TAGS = {
  'high': ('<think>', '</think>'),
  'medium': ('<think_fast>', '</think_fast>'),
  'low': ('<think_faster>', '</think_faster>'),
}
# Which turn field holds the reasoning of each effort.
REASONING_FIELDS = {'think': 'high', 'think_fast': 'medium', 'think_faster': 'low'}
DEFAULT_SYSTEM_PROMPT = (
  'You are K2, a helpful assistant created by Mohamed bin Zayed University of '
  'Artificial Intelligence (MBZUAI) Institute of Foundation Models (IFM).'
)

ROLES = ('system', 'user', 'assistant', 'tool')
IM_START, IM_END = '<|im_start|>', '<|im_end|>'


def _is_list_like(value) -> bool:
  # pyarrow's to_pylist gives lists, pandas gives 1-D object arrays.
  return isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim == 1)


def _json_default(value):
  # Arguments that came through pandas may hold numpy scalars and arrays.
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f'{type(value).__name__} is not JSON serializable')


def effort_of(turn) -> str | None:
  """'high' | 'medium' | 'low' from the turn's reasoning field, None if none."""
  fields = [f for f in REASONING_FIELDS if turn.get(f) is not None]
  if len(fields) > 1:
    raise ValueError(f'both {fields[0]!r} and {fields[1]!r} set')
  return REASONING_FIELDS[fields[0]] if fields else None


def _tool_call_text(call, index: int) -> str:
  where = f'tool_calls[{index}]'
  if not isinstance(call, Mapping):
    raise ValueError(f'{where}: expected a dict, got {type(call).__name__}')
  if call.get('function') is not None:  # OpenAI style {type, function: {...}}
    call = call['function']
    where += '.function'
    if not isinstance(call, Mapping):
      raise ValueError(f'{where}: expected a dict, got {type(call).__name__}')
  name = call.get('name')
  if not isinstance(name, str) or not name:
    raise ValueError(f"{where}: 'name' must be a non-empty string, got {name!r}")
  arguments = call.get('arguments')
  if arguments is None:
    arguments = {}
  elif isinstance(arguments, str):
    try:
      arguments = json.loads(arguments)
    except json.JSONDecodeError as e:
      raise ValueError(f"{where}: 'arguments' is not valid JSON: {e}") from None
  if not isinstance(arguments, Mapping):
    raise ValueError(f"{where}: 'arguments' must be a JSON object, got {type(arguments).__name__}")
  body = json.dumps(
    {'name': name, 'arguments': dict(arguments)}, ensure_ascii=False, default=_json_default
  )
  return f'<tool_call>\n{body}\n</tool_call>'


def _tool_calls(value) -> list[str]:
  """The rendered text of each call; accepts a list or a JSON string of one."""
  if value is None:
    return []
  if isinstance(value, str):
    if not value.strip():
      return []
    try:
      value = json.loads(value)
    except json.JSONDecodeError as e:
      raise ValueError(f"'tool_calls' is not valid JSON: {e}") from None
  if not _is_list_like(value):
    raise ValueError(f"'tool_calls' must be a list of calls, got {type(value).__name__}")
  return [_tool_call_text(call, j) for j, call in enumerate(value)]


def _parse_turn(turn) -> dict:
  if not isinstance(turn, Mapping):
    raise ValueError(f'expected a dict, got {type(turn).__name__}')
  role = turn.get('role')
  if role is None:
    raise ValueError("missing 'role'")
  if role not in ROLES:
    raise ValueError(f'role {role!r} is not one of {"|".join(ROLES)}')
  content = turn.get('content')
  if content is None and role == 'assistant':
    content = ''
  if not isinstance(content, str):
    raise ValueError(f"'content' must be a string, got {type(content).__name__}")
  effort = effort_of(turn)
  reasoning = None
  if effort is not None:
    field = next(f for f, e in REASONING_FIELDS.items() if e == effort)
    reasoning = turn[field]
    if not isinstance(reasoning, str):
      raise ValueError(f'{field!r} must be a string, got {type(reasoning).__name__}')
  tool_calls = _tool_calls(turn.get('tool_calls'))
  if role != 'assistant':
    if effort is not None:
      raise ValueError(f'{field!r} is only allowed on assistant turns, not {role!r}')
    if tool_calls:
      raise ValueError(f"'tool_calls' is only allowed on assistant turns, not {role!r}")
  elif not (content or tool_calls or effort):
    raise ValueError('assistant turn has no content, tool_calls or reasoning')
  return {
    'role': role,
    'content': content,
    'tool_calls': tool_calls,
    'effort': effort,
    'reasoning': reasoning,
  }


def _parse(value, need_assistant: bool = True) -> list[dict]:
  if not _is_list_like(value):
    raise ValueError(f'conversation must be a list of turns, got {type(value).__name__}')
  turns = []
  for i, turn in enumerate(value):
    try:
      turns.append(_parse_turn(turn))
    except ValueError as e:
      raise ValueError(f'turn {i}: {e}') from None
  if need_assistant and not any(t['role'] == 'assistant' for t in turns):
    raise ValueError('no assistant turn')
  return turns


def check_conversation(value):
  """Validates a record's `conversations` value and returns it unchanged."""
  _parse(value)
  return value


def assistant_turns(conversation) -> list[int]:
  """Indices of the assistant turns: one SFT sample each."""
  return [i for i, t in enumerate(_parse(conversation)) if t['role'] == 'assistant']


# A piece is (text, is_special_tag, is_trained).
def _turn_pieces(turn: dict, target: bool) -> list[tuple[str, bool, bool]]:
  pieces = [(IM_START, True, False), (turn['role'] + '\n', False, False)]
  if target and turn['effort'] is not None:
    open_tag, close_tag = EFFORT_TAGS[turn['effort']]
    pieces += [(open_tag, True, False), (turn['reasoning'], False, True), (close_tag, True, True)]
  body = turn['content']
  pieces.append((body, False, target))
  for call in turn['tool_calls']:
    pieces.append((('\n' if body else '') + call, False, target))
    body = call
  pieces.append((IM_END, True, target))
  if not target:
    pieces.append(('\n', False, False))
  return pieces


def _system_pieces(turns: list[dict], system_prompt) -> list:
  if system_prompt is None or any(t['role'] == 'system' for t in turns):
    return []
  if not isinstance(system_prompt, str):
    raise ValueError(f'system_prompt must be a string, got {type(system_prompt).__name__}')
  system = {'role': 'system', 'content': system_prompt, 'tool_calls': [], 'effort': None}
  return _turn_pieces(system, target=False)


def _sample_pieces(conversation, target_turn, system_prompt) -> list:
  turns = _parse(conversation)
  if (
    not isinstance(target_turn, (int, np.integer))
    or isinstance(target_turn, bool)
    or not 0 <= target_turn < len(turns)
  ):
    raise ValueError(
      f'target_turn {target_turn!r} is not a turn index (the conversation has {len(turns)} turns)'
    )
  if turns[target_turn]['role'] != 'assistant':
    raise ValueError(
      f'target_turn {target_turn} is not an assistant turn '
      f'(role {turns[target_turn]["role"]!r}); assistant turns: '
      f'{[i for i, t in enumerate(turns) if t["role"] == "assistant"]}'
    )
  pieces = _system_pieces(turns, system_prompt)
  for i in range(target_turn + 1):
    pieces += _turn_pieces(turns[i], target=i == target_turn)
  return pieces


def _encode(pieces, tokenizer) -> tuple[list[int], list[bool]]:
  tokens, mask = [], []
  for text, special, trained in pieces:
    ids = [tokenizer.special_token_id(text)] if special else tokenizer.encode(text)
    tokens += ids
    mask += [trained] * len(ids)
  return tokens, mask


def render_sample(
  conversation,
  target_turn: int,
  tokenizer,
  *,
  max_len: int | None = None,
  system_prompt: str | None = None,
) -> dict:
  """The SFT sample for one assistant turn: {'tokens': int32[n], 'target_mask': bool[n]}.

  `target_mask[i]` marks token i as a prediction target. `system_prompt` is
  prepended only when the conversation has no system turn; `max_len` cuts
  both arrays on the right.
  """
  if max_len is not None and (not isinstance(max_len, (int, np.integer)) or max_len < 1):
    raise ValueError(f'max_len must be a positive int or None, got {max_len!r}')
  tokens, mask = _encode(_sample_pieces(conversation, target_turn, system_prompt), tokenizer)
  if max_len is not None:
    tokens, mask = tokens[:max_len], mask[:max_len]
  return {'tokens': np.asarray(tokens, np.int32), 'target_mask': np.asarray(mask, np.bool_)}


def render_text(conversation, target_turn: int, *, system_prompt: str | None = None) -> str:
  """The same sample as render_sample, as one string (untruncated)."""
  return ''.join(text for text, _, _ in _sample_pieces(conversation, target_turn, system_prompt))


def render_prompt(
  messages, tokenizer, reasoning_effort: str = 'high', *, system_prompt: str | None = None
) -> list[int]:
  """Generation prompt: every message, then the assistant header and open tag.

  Assistant messages are rendered without reasoning, as in training samples;
  the model continues with the reasoning, the closing tag and the answer.
  """
  if reasoning_effort not in EFFORT_TAGS:
    raise ValueError(
      f'unknown reasoning_effort {reasoning_effort!r}: expected one of {"|".join(EFFORT_TAGS)}'
    )
  turns = _parse(messages, need_assistant=False)
  pieces = _system_pieces(turns, system_prompt)
  for turn in turns:
    pieces += _turn_pieces(turn, target=False)
  pieces += [
    (IM_START, True, False),
    ('assistant\n', False, False),
    (EFFORT_TAGS[reasoning_effort][0], True, False),
  ]
  return _encode(pieces, tokenizer)[0]
