"""Held-out evaluation of a checkpoint, and the lm-eval adapter against direct computation."""

import dataclasses
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from data_pipeline import pipeline
from data_pipeline.tokenizer import load_tokenizer
from k2jax import evaluate as evaluate_cli
from k2jax.infer import evaluation, generation, load
from k2jax.infer import lm_eval as lme
from k2jax.model.transformer import Transformer
from k2jax.training import train_step
from tests.helpers import (
  DEMO_EVAL,
  DEMO_TOKENIZER,
  TINY,
  make_checkpoint,
  random_params,
  require_oracle,
)

EVAL_FILE = DEMO_EVAL
TOKENIZER = load_tokenizer(DEMO_TOKENIZER)
CFG = dataclasses.replace(TINY, vocab_size=TOKENIZER.vocab_size)  # the demo tokenizer's ids
PARAMS = random_params(CFG, seed=1, std=0.1)
MAX_LENGTH = 16


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  path = tmp_path_factory.mktemp('evaluate')
  make_checkpoint(path)
  return path


def test_evaluate_equals_the_training_loss(workdir, capsys):
  loaded = load.load(str(workdir), mesh_spec='data:4,tensor:2')
  data_cfg = evaluation.eval_data_config(loaded, EVAL_FILE, seq_len=32, batch_size=8)
  result = evaluation.evaluate(loaded, data_cfg, batches=3)

  # Directly: train_step's loss on the same pipeline batches, on one device.
  params = jax.device_get(loaded.params)
  model = Transformer(loaded.model_cfg)
  loss_sums = jax.jit(lambda p, b: train_step.loss_sums(model, p, b))
  total = count = 0.0
  batches = pipeline.build(data_cfg, seed=0, split='eval')
  for _, batch in zip(range(3), batches):
    loss, tokens = loss_sums(params, {k: batch[k] for k in train_step.BATCH_KEYS})
    total, count = total + float(loss), count + float(tokens)
  assert result['tokens'] == count == 3 * 8 * 32
  np.testing.assert_allclose(result['loss'], total / count, rtol=1e-6)
  np.testing.assert_allclose(result['perplexity'], np.exp(total / count), rtol=1e-6)

  # The command line, in-process: one line with tokens, loss and perplexity.
  evaluate_cli.main(
    [
      f'--checkpoint={workdir}',
      f'--data={EVAL_FILE}',
      '--batches=3',
      '--seq_len=32',
      '--batch_size=8',
      '--mesh=data:4,tensor:2',
    ]
  )
  line = capsys.readouterr().out
  assert f'{3 * 8 * 32:,} tokens evaluated' in line, line
  assert f'perplexity {result["perplexity"]:.3f}' in line, line


def test_evaluate_cli_json_and_errors(workdir, capsys):
  evaluate_cli.main(
    [f'--checkpoint={workdir}', f'--data={EVAL_FILE}', '--batches=1', '--output=json']
  )
  out = json.loads(capsys.readouterr().out)
  assert out['tokens'] == 8 * 64 and out['batch_size'] == 8 and out['seq_len'] == 64
  assert out['perplexity'] == pytest.approx(np.exp(out['loss']))
  with pytest.raises(SystemExit) as exit_info:
    evaluate_cli.main([f'--checkpoint={workdir}', '--data=/nonexistent/*.jsonl'])
  err = capsys.readouterr().err
  assert exit_info.value.code == 2 and err.count('\n') == 1, err
  assert err.startswith('error: ') and "'/nonexistent/*.jsonl'" in err, err


def test_a_checkpoint_without_tokenizer_says_how_to_give_one(tmp_path):
  """The run config of a converted HF folder without tokenizer files names
  none: the message says what needs one and how to give it, never an empty name."""
  loaded = load.Loaded(
    params=None,
    model_cfg=TINY,
    run_cfg=ml_collections.ConfigDict({'data': {'tokenizer': '', 'seq_len': 64}}),
    step_dir=str(tmp_path),
    mesh=None,
  )
  with pytest.raises(ValueError) as error:
    evaluation.eval_data_config(loaded, EVAL_FILE)
  assert str(error.value) == (
    f'encoding the data needs a tokenizer, and the run config of {tmp_path} names none '
    f'(data.tokenizer is empty): pass --tokenizer=PATH ({load.TOKENIZER_FORMS})'
  )
  data_cfg = evaluation.eval_data_config(
    loaded, EVAL_FILE, tokenizer=os.path.dirname(DEMO_TOKENIZER)
  )
  assert data_cfg.tokenizer == os.path.join(os.path.dirname(DEMO_TOKENIZER), 'tokenizer.json')


# --- the lm-eval adapter's functions -------------------------------------------------------

_FORWARD = jax.jit(lambda params, tokens: Transformer(CFG).apply({'params': params}, tokens))


def direct_logits(inputs):
  """Logits of one unpadded row, computed right-padded to 32 tokens (a single compile):
  causal attention keeps the padding out of the earlier positions."""
  tokens = np.zeros((1, 32), np.int32)
  tokens[0, : len(inputs)] = inputs
  return np.asarray(_FORWARD(PARAMS, tokens)[0, : len(inputs)])


def direct_logprobs(ids):
  """log p(ids[i] | ids[:i]) for i >= 1, and the logits."""
  logits = direct_logits(ids[:-1])
  logp = np.asarray(jax.nn.log_softmax(logits))
  return logp[np.arange(len(ids) - 1), ids[1:]], logits


REQUESTS = [
  ('The cat sat on the', ' mat.'),
  ('Once upon a time ', 'there was'),
  ('', 'Hello world'),
  ('a b c d e f g h i j k l m n o p', ' q r s'),
]


def test_loglikelihood_is_the_sum_of_token_logprobs():
  got = lme.loglikelihood(PARAMS, CFG, TOKENIZER, REQUESTS, max_length=MAX_LENGTH, batch_size=4)
  for (context, continuation), (logp, greedy) in zip(REQUESTS, got):
    if context.endswith(' '):  # the space belongs to the continuation's first word
      context, continuation = context[:-1], ' ' + continuation
    if context:
      ctx = TOKENIZER.encode(context)
      cont = TOKENIZER.encode(context + continuation)[len(ctx) :]
    else:
      ctx, cont = [TOKENIZER.eos_id], TOKENIZER.encode(continuation)
    ids = (ctx + cont)[-(MAX_LENGTH + 1) :]  # truncated on the left to the window
    token_logp, logits = direct_logprobs(ids)
    np.testing.assert_allclose(logp, token_logp[-len(cont) :].sum(), rtol=1e-5)
    assert greedy == bool(np.all(logits.argmax(-1)[-len(cont) :] == ids[-len(cont) :]))
  assert len(TOKENIZER.encode(REQUESTS[3][0] + REQUESTS[3][1])) > MAX_LENGTH + 1

  # is_greedy: the model's own greedy continuation is, one changed token is not.
  context = TOKENIZER.encode('The cat sat')
  greedy_ids = []
  for _ in range(4):
    greedy_ids.append(int(direct_logits(context + greedy_ids)[-1].argmax()))
  changed = greedy_ids[:-1] + [(greedy_ids[-1] + 1) % CFG.vocab_size]
  (_, yes), (_, no) = lme.score_pairs(
    PARAMS, CFG, [(context, greedy_ids), (context, changed)], max_length=MAX_LENGTH, batch_size=4
  )
  assert yes and not no


def test_rolling_loglikelihood_over_a_long_text():
  text = (
    'It was the best of times, it was the worst of times, it was the age of wisdom, '
    'it was the age of foolishness.'
  )
  tokens = TOKENIZER.encode(text)
  n, window, prefix = len(tokens), 8, TOKENIZER.eos_id
  assert n > 2 * window + 1
  # Every token predicted once: [prefix] + t[:7] -> t[:8]; t[7:15] -> t[8:16]; ...; the
  # last window keeps a full 8-token input and scores only the tokens still unpredicted.
  expected_windows, start = [([prefix] + tokens[: window - 1], 0)], window
  while start < n:
    end = min(start + window, n)
    expected_windows.append((tokens[end - 1 - window : end - 1], start))
    start = end
  expected = 0.0
  for inputs, first in expected_windows:
    targets = tokens[first : first + window]
    full = np.asarray(jax.nn.log_softmax(direct_logits(inputs)))
    scored = full[len(inputs) - len(targets) :]
    expected += float(scored[np.arange(len(targets)), targets].sum())
  got = lme.loglikelihood_rolling(
    PARAMS, CFG, TOKENIZER, [text, 'Short.'], max_length=window, batch_size=4
  )
  np.testing.assert_allclose(got[0], expected, rtol=1e-5)
  short = [prefix] + TOKENIZER.encode('Short.')
  np.testing.assert_allclose(got[1], direct_logprobs(short)[0].sum(), rtol=1e-5)

  predicted = [t for _, cont in lme.rolling_windows(tokens, prefix, window) for t in cont]
  assert predicted == tokens
  require_oracle('lm_eval')  # lm-eval's own windows agree
  import lm_eval.utils as lm_utils

  theirs = [
    lm_utils.make_disjoint_window(w)
    for w in lm_utils.get_rolling_token_windows(tokens, prefix, window, 1)
  ]
  assert [tuple(map(list, w)) for w in theirs] == lme.rolling_windows(tokens, prefix, window)


def test_generate_until_stops_at_the_until_strings():
  contexts = ['The cat sat', 'Once upon a time there was a']
  # The same shapes as generate_until's below (2 rows, prompts padded to 16): one compile.
  full = [
    TOKENIZER.decode(ids)
    for ids in generation.generate(
      PARAMS, CFG, [TOKENIZER.encode(c) for c in contexts], max_new_tokens=10, pad_multiple=16
    )
  ]
  # A multi-character stop string taken from inside the first completion, and one that never
  # appears; then a single-token stop ('\n' is one piece), which also ends the row early.
  stop = full[0][3:6]
  requests = [
    (contexts[0], {'until': [stop, 'never'], 'max_gen_toks': 10}),
    (contexts[1], {'until': ['never'], 'max_gen_toks': 10}),
    (contexts[1], {'until': '\n', 'max_gen_toks': 10}),
  ]
  got = lme.generate_until(PARAMS, CFG, TOKENIZER, requests, max_length=26, batch_size=2)
  assert got[0] == full[0][: full[0].index(stop)] and len(got[0]) < len(full[0])
  assert got[1] == full[1]
  assert got[2] == full[1].split('\n')[0]


def test_lm_eval_model_class():
  require_oracle('lm_eval')
  from lm_eval.api.instance import Instance
  from lm_eval.api.registry import get_model

  assert get_model('k2jax') is lme.K2JaxLM
  lm = lme.K2JaxLM(
    params=PARAMS, model_cfg=CFG, tokenizer=TOKENIZER, max_length=MAX_LENGTH, batch_size='4'
  )

  def instances(kind, args):
    return [Instance(kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]

  settings = dict(max_length=MAX_LENGTH, batch_size=4)
  assert lm.loglikelihood(instances('loglikelihood', REQUESTS)) == lme.loglikelihood(
    PARAMS, CFG, TOKENIZER, REQUESTS, **settings
  )
  texts = ['A short text.', 'A longer text that needs more than one window of sixteen tokens.']
  assert lm.loglikelihood_rolling(
    instances('loglikelihood_rolling', [(t,) for t in texts])
  ) == lme.loglikelihood_rolling(PARAMS, CFG, TOKENIZER, texts, **settings)
  gen_args = [('The cat sat', {'until': ['\n'], 'max_gen_toks': 4})]
  assert lm.generate_until(instances('generate_until', gen_args)) == lme.generate_until(
    PARAMS, CFG, TOKENIZER, gen_args, **settings
  )
