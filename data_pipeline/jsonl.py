"""Reads document texts from TxT360-style JSONL files.

Each line is a JSON object whose text field (usually `text`) is a string.
Bad lines are reported as `file:line` so they can be found and fixed. By
default they are skipped with a warning and a count (one broken line should
not stop a long run); `strict=True` raises on the first one instead.
"""

import glob
import json
import logging

logger = logging.getLogger(__name__)

# Name at most this many bad lines individually; the summary gives the total.
_MAX_REPORTED_LINES = 10


def match_files(pattern: str) -> list[str]:
  """Files matching a glob, sorted so every process sees the same order."""
  files = sorted(glob.glob(pattern))
  if not files:
    raise FileNotFoundError(f'no files match the glob {pattern!r}')
  return files


def _parse_text(raw_line: bytes, text_field: str) -> str:
  """The text of one line; ValueError says what is wrong with it."""
  try:
    record = json.loads(raw_line.decode('utf-8'))
  except UnicodeDecodeError as e:
    raise ValueError(f'not UTF-8 ({e.reason})') from e
  except json.JSONDecodeError as e:
    raise ValueError(f'malformed JSON ({e.msg} at column {e.colno})') from e
  if not isinstance(record, dict):
    raise ValueError(f'expected a JSON object, got {type(record).__name__}')
  if text_field not in record:
    raise ValueError(f'missing field {text_field!r}')
  text = record[text_field]
  if not isinstance(text, str):
    raise ValueError(f'field {text_field!r} is {type(text).__name__}, not a string')
  return text


def read_texts(pattern: str, text_field: str = 'text', *, strict: bool = False) -> list[str]:
  """All texts from the files matching `pattern`, in file then line order."""
  texts, bad_lines = [], 0
  for path in match_files(pattern):
    with open(path, 'rb') as f:
      for line_number, raw_line in enumerate(f, start=1):
        if not raw_line.strip():
          continue
        try:
          texts.append(_parse_text(raw_line, text_field))
        except ValueError as e:
          message = f'{path}:{line_number}: {e}'
          if strict:
            raise ValueError(message) from None
          bad_lines += 1
          if bad_lines <= _MAX_REPORTED_LINES:
            logger.warning('skipping %s', message)
  if bad_lines:
    logger.warning('skipped %d bad line(s) in files matching %r', bad_lines, pattern)
  if not texts:
    raise ValueError(f'no documents with a string {text_field!r} field in {pattern!r}')
  return texts
