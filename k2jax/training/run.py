"""A training run as a library: `prepare` (every check on bad input), `run` (restore or init,
then the loop), `train` (both), and `start_distributed` (multi-host start-up).

`python -m k2jax.train` (k2jax/train.py) is the command line over these. Everything that can
fail on bad input happens in `prepare`, before anything is compiled: the config, the data it
names, the mesh, and, when the workdir already has checkpoints, whether this run can resume
them (the same process count, the same model shape, the same learning-rate schedule).
"""

import json
import os

import ml_collections

from k2jax import run_config


def train(cfg, workdir: str, stop_after: int | None = None) -> list[dict]:
  """Runs the stage described by `cfg`; returns the records written to metrics.jsonl.

  `stop_after` ends the run early at that step (with a checkpoint), as a kill would: tests only.
  """
  return run(prepare(cfg, workdir), stop_after=stop_after)


def prepare(cfg, workdir: str) -> dict:
  """Everything that can fail on bad input, checked before anything is compiled."""
  # Heavy imports here so that `--help` and config errors are instant.
  import jax

  from data_pipeline import pipeline
  from k2jax.parallel import sharding
  from k2jax.training import checkpoint, train_step

  run_config.validate(cfg)
  check_training_data(cfg)
  resume_notes = check_resume(cfg, workdir)
  plan = train_step.plan(cfg)
  tokenizer = pipeline.tokenizer_for(cfg.data)
  if tokenizer.vocab_size > plan.model_cfg.vocab_size:
    raise ValueError(
      f'data.tokenizer {cfg.data.tokenizer} has {tokenizer.vocab_size} tokens, '
      f'more than model.vocab_size={plan.model_cfg.vocab_size}'
    )
  # A workdir with checkpoints resumes; init_from only starts a stage.
  init_from = None
  if cfg.init_from and not checkpoint.committed_steps(checkpoint.directory(workdir)):
    init_from = checkpoint.resolve_step_dir(cfg.init_from)
    checkpoint.check_params_fit(init_from, plan.abstract_state.params)
    if cfg.get('init_from_optimizer', False) and not os.path.isdir(
      os.path.join(init_from, 'opt_state')
    ):
      raise ValueError(
        f'init_from_optimizer: {init_from} has no opt_state/ (a converted HF '
        'checkpoint carries parameters only)'
      )
  process = dict(
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    context_shards=sharding.length_shards(plan.mesh),  # rows in zigzag order when > 1
  )
  train_batches = pipeline.build(cfg.data, seed=cfg.seed, split='train', **process)
  if cfg.eval_every:
    pipeline.build(cfg.data, seed=cfg.seed, split='eval', **process)  # fail now, not at eval
  os.makedirs(workdir, exist_ok=True)
  return dict(
    cfg=cfg,
    workdir=workdir,
    plan=plan,
    train_batches=train_batches,
    process=process,
    init_from=init_from,
    notes=resume_notes,
  )


def check_training_data(cfg) -> None:
  """Raises a ValueError naming the keys to set when the config names no training data or no
  tokenizer (the full mid-training stages 2-4 leave their data to the user)."""
  missing = []
  if not cfg.data.get('train_files', '') and not cfg.data.get('mixture', ''):
    missing.append(
      'no training data (set data.train_files to a folder or glob of documents or a prepared '
      'directory, or data.mixture to a data-bank JSON)'
    )
  if not cfg.data.get('tokenizer', ''):
    missing.append('no tokenizer (set data.tokenizer to a SentencePiece .model or tokenizer.json)')
  if missing:
    raise ValueError(f'this stage names {" and ".join(missing)}')


def check_resume(cfg, workdir: str) -> list[str]:
  """When `workdir` has checkpoints: raises a ValueError naming what differs between them and
  `cfg` (process count, model shape, learning-rate schedule) before any step is tried, so an
  intact checkpoint is never taken for a damaged one. Returns notes for the log (a schedule
  change accepted by `resume_schedule_change`)."""
  import jax

  from k2jax.training import checkpoint

  ckpt_dir = checkpoint.directory(workdir)
  steps = checkpoint.committed_steps(ckpt_dir)
  if not steps:
    return []
  step, saved_count = checkpoint.saved_process_count(ckpt_dir, steps)
  if saved_count is not None and saved_count != jax.process_count():
    raise ValueError(
      f'{ckpt_dir}: step {step} was saved with {saved_count} process(es), now '
      f'{jax.process_count()}: restart with {saved_count} process(es) to resume it '
      '(the data position is per process; continuing on another process count is not '
      'supported yet). The checkpoints are intact and were left as they are'
    )
  step, saved = checkpoint.saved_run_config(ckpt_dir, steps)
  if saved is None:  # no readable config: the restore itself will tell
    return []
  where = f'{ckpt_dir} (step {step})'
  changed = _shape_changes(saved, cfg)
  if changed:
    raise ValueError(
      f'{where} holds another model shape: {", ".join(changed)} (checkpoint -> config). '
      'Resume with the saved shape, or train the new shape in another --workdir '
      '(--config.init_from takes parameters of the same shape); the checkpoints are intact'
    )
  changed = _schedule_changes(saved, cfg)
  if not changed:
    return []
  rates = _rates_at(saved, cfg, step)
  if not cfg.get('resume_schedule_change', False):
    raise ValueError(
      f'{where} was trained with another learning-rate schedule: {", ".join(changed)} '
      f'(checkpoint -> config){rates}. Set --config.resume_schedule_change=True if '
      'that is intended, or give the saved values'
    )
  return [
    f'learning-rate schedule changed on resume (resume_schedule_change=True): '
    f'{", ".join(changed)}{rates}'
  ]


def _shape_changes(saved: dict, cfg) -> list[str]:
  """'model.num_layers 2 -> 3' for each shape field the saved run config differs in."""
  from k2jax.model import config as model_config

  try:
    old = model_config.from_config(ml_collections.ConfigDict(saved['model']))
  except (KeyError, TypeError, ValueError, AttributeError):
    return []  # a config of an older layout: the restore reports what does not fit
  new = model_config.from_config(cfg.model)
  return [
    f'model.{name} {getattr(old, name)} -> {getattr(new, name)}'
    for name in model_config.SHAPE_FIELDS
    if getattr(old, name) != getattr(new, name)
  ]


def _schedule_changes(saved: dict, cfg) -> list[str]:
  """'total_steps 200 -> 300' for each key either schedule reads whose value differs."""
  from k2jax.training import optim

  keys = set(optim.schedule_keys(saved.get('optim', {}))) | set(optim.schedule_keys(cfg.optim))
  current = cfg.to_dict()
  changed = []
  for key in sorted(keys):
    old, new = _lookup(saved, key), _lookup(current, key)
    if old is not _MISSING and old != new:
      changed.append(f'{key} {old!r} -> {new!r}')
  return changed


_MISSING = object()


def _lookup(tree: dict, dotted: str):
  node = tree
  for part in dotted.split('.'):
    if not isinstance(node, dict) or part not in node:
      return _MISSING
    node = node[part]
  return node


def _rates_at(saved: dict, cfg, step: int) -> str:
  """'; the learning rate at step N goes from A to B', or '' if the old rate is unknown."""
  from k2jax.training import optim

  try:
    old = optim.learning_rate_at(
      ml_collections.ConfigDict(saved['optim']), saved['total_steps'], step
    )
  except (KeyError, TypeError, ValueError):
    return ''
  new = optim.learning_rate_at(cfg.optim, cfg.total_steps, step)
  return f'; the learning rate at step {step} goes from {old:.3e} to {new:.3e}'


def run(prepared: dict, stop_after: int | None = None) -> list[dict]:
  """The training loop over a prepared run."""
  import jax

  from k2jax.observe.monitor import Monitor
  from k2jax.parallel import sharding
  from k2jax.training import checkpoint
  from k2jax.training.loop import TrainLoop

  cfg, plan = prepared['cfg'], prepared['plan']
  mesh, model_cfg = plan.mesh, plan.model_cfg
  global_batch, seq_len = cfg.data.global_batch_size, cfg.data.seq_len
  monitor = Monitor(
    prepared['workdir'],
    cfg.total_steps,
    tokens_per_step=global_batch * seq_len,
    flops_per_token=model_cfg.flops_per_token(seq_len),
    settings=cfg.monitor,
    config=cfg.to_dict(),
  )
  monitor.info(
    f'k2jax: {sharding.devices_summary()}; mesh {sharding.describe(mesh)}'
    f'{" (fsdp)" if cfg.mesh.fsdp else ""}'
  )
  monitor.info(
    f'model {cfg.model.preset}: {model_cfg.param_count() / 1e6:,.1f}M parameters, '
    f'{model_cfg.num_layers} layers, remat {model_cfg.remat}, '
    f'compute {model_cfg.dtype}'
  )
  monitor.info(f'attention {plan.attention.name}: {plan.attention.reason}')
  batches = prepared['train_batches']
  if len(batches.names) > 1:
    asked = ', '.join(f'{n} {s:.1%}' for n, s in zip(batches.names, batches.requested_shares))
    monitor.info(
      f'data: mixture of {len(batches.names)} sources, token shares asked: {asked} '
      '(realised shares are logged as data_share/<name>)'
    )
  for note in prepared.get('notes', ()):
    monitor.info(note)
  if jax.process_index() == 0:
    with open(os.path.join(prepared['workdir'], 'config.json'), 'w') as f:
      json.dump(run_config.saved_form(cfg), f, indent=2)

  checkpoints = checkpoint.Checkpoints(prepared['workdir'], cfg)
  try:
    with sharding.activate(mesh, cfg.mesh.fsdp):
      state = restore_or_init(prepared, checkpoints, monitor)
      records = TrainLoop(prepared, checkpoints, monitor).run(state, stop_after)
  except Exception as error:
    monitor.alert(f'crashed: {type(error).__name__}: {str(error)[:500]}', kind='crash')
    raise
  finally:
    checkpoints.close()
    monitor.close()
  if records and records[-1]['step'] >= cfg.total_steps:
    monitor.info(f'finished: step {cfg.total_steps} of {cfg.total_steps}')
  return records


def restore_or_init(prepared: dict, checkpoints, monitor):
  """Resume from the workdir's newest good checkpoint ▸ init_from's parameters ▸ fresh init."""
  import jax

  from k2jax.training import checkpoint, train_step

  cfg, plan = prepared['cfg'], prepared['plan']
  state = checkpoints.restore_latest(plan, prepared['train_batches'], monitor.info)
  if state is not None:
    step = int(state.step)
    monitor.info(f'resumed from {checkpoints.directory}/{step}')
  elif prepared['init_from']:
    params = checkpoint.load_params(prepared['init_from'], plan)
    fresh = jax.jit(
      train_step.make_state_from_params(plan.tx),
      out_shardings=plan.state_sharding,
      donate_argnums=0,
    )
    state, step = fresh(params), 0
    if cfg.get('init_from_optimizer', False):
      state = state.replace(opt_state=checkpoint.load_opt_state(prepared['init_from'], plan))
      monitor.info(
        f'parameters and optimizer moments from {prepared["init_from"]}; '
        'the schedule starts at step 0'
      )
    else:
      monitor.info(f'parameters from {prepared["init_from"]}; fresh optimizer at step 0')
  else:
    init = jax.jit(
      train_step.make_init_fn(plan.model, plan.tx, cfg.data.seq_len),
      out_shardings=plan.state_sharding,
    )
    state, step = init(jax.random.key(cfg.seed)), 0
  monitor.drop_after(step)  # records past the restored step are about to be redone
  return state


def start_distributed(
  coordinator: str | None, num_processes: int | None, process_id: int | None, auto: bool
) -> None:
  """Joins a multi-process run before any JAX computation; a no-op for a single process.

  Raises ValueError when only some of coordinator / num_processes / process_id are given.
  """
  given = [v is not None for v in (coordinator, num_processes, process_id)]
  if any(given) and not all(given):
    raise ValueError('--coordinator_address, --num_processes and --process_id go together')
  if not (all(given) or auto):
    return
  import jax

  if os.environ.get('JAX_PLATFORMS', '') == 'cpu':
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU: tests, rehearsals
  if all(given):
    jax.distributed.initialize(
      coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )
  else:
    jax.distributed.initialize()  # the cluster's environment says who is who
