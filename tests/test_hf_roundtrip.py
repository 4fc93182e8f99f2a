"""Issue 5's round trip from the command line: train the demo model, export it to HF, load it
in transformers, and generate the same text as `k2jax.generate`."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

PROMPTS = ['Tomadun is a river town in the province of', 'What is 12 + 30?']


def cli(*args):
  result = subprocess.run(
    [sys.executable, '-m', *args], cwd=REPO, capture_output=True, text=True, timeout=600
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_demo_model_exports_to_hf_and_generates_the_same_text(tmp_path):
  run = tmp_path / 'run'
  cli(
    'k2jax.train',
    '--config=configs/pretrain.py:debug',
    f'--workdir={run}',
    '--config.total_steps=30',
    '--config.eval_every=0',
    '--config.optim.warmup_steps=3',
    '--config.checkpoint.every=30',
  )
  hf_dir = tmp_path / 'hf'
  cli('k2jax.convert', 'to-hf', f'--checkpoint={run}', f'--out={hf_dir}', '--dtype=float32')

  out = cli(
    'k2jax.generate',
    f'--checkpoint={run}',
    *[f'--prompt={p}' for p in PROMPTS],
    '--max_new_tokens=24',
    '--output=json',
    '--dtype=float32',
  )
  ours = json.loads(out)

  tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
  model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
  model.eval()
  for prompt, result in zip(PROMPTS, ours):
    ids = tokenizer(prompt, add_special_tokens=False)['input_ids']
    assert ids == result['prompt_ids']  # the exported tokenizer encodes as k2jax's
    with torch.no_grad():
      generated = model.generate(
        torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=1, pad_token_id=1
      )
    theirs = generated[0, len(ids) :].tolist()
    assert theirs == result['ids'], (prompt, theirs, result['ids'])
    text = tokenizer.decode([t for t in theirs if t != 1])
    assert text == result['text'] and len(text) > 10
