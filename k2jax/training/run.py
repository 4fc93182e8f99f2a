"""A training run as a library: `prepare` (every check on bad input), `run` (restore or init,
then the loop), `train` (both), and `start_distributed` (multi-host start-up).

`python -m k2jax.train` (k2jax/train.py) is the command line over these. Everything that can
fail on bad input happens in `prepare`, before anything is compiled: the config, the data it
names, the mesh, which rows of the batch this process loads (k2jax/parallel/input.py), and,
when the workdir already has checkpoints, whether this run can resume them (the same model
shape, the same learning-rate schedule, and for the data position the same processes loading
the same rows, unless `checkpoint.restore_data=False`).
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
  from data_pipeline import pipeline
  from k2jax.parallel import input as batch_input
  from k2jax.parallel import sharding
  from k2jax.training import checkpoint, train_step
  from k2jax.training.loop import TrainBatches

  run_config.validate(cfg)
  check_training_data(cfg)
  plan = train_step.plan(cfg)
  # The rows this process loads: processes that hold the same rows load the same ones.
  shard = batch_input.shard_for(plan.batch_sharding, cfg.data.global_batch_size, cfg.data.seq_len)
  resume_notes = check_resume(cfg, workdir, shard)
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
  # pipeline.build's process_index / process_count are the input shard's index and count.
  process = dict(
    process_index=shard.index,
    process_count=shard.count,
    context_shards=sharding.length_shards(plan.mesh),  # rows in zigzag order when > 1
  )
  train_batches = TrainBatches(cfg, shard, process['context_shards'])
  if cfg.eval_every:
    pipeline.build(cfg.data, seed=cfg.seed, split='eval', **process)  # fail now, not at eval
  os.makedirs(workdir, exist_ok=True)
  return dict(
    cfg=cfg,
    workdir=workdir,
    plan=plan,
    train_batches=train_batches,
    shard=shard,
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


def check_resume(cfg, workdir: str, shard=None) -> list[str]:
  """When `workdir` has checkpoints: raises a ValueError naming what differs between them and
  `cfg` (model shape, learning-rate schedule, and, unless `checkpoint.restore_data=False`, the
  process count or input shard of the data position) before any step is tried, so an intact
  checkpoint is never taken for a damaged one. `shard` is this process's InputShard. Returns
  notes for the log (a schedule change accepted by `resume_schedule_change`, a data position
  left behind)."""
  from k2jax.training import checkpoint

  ckpt_dir = checkpoint.directory(workdir)
  steps = checkpoint.committed_steps(ckpt_dir)
  if not steps:
    return []
  notes = []
  if cfg.checkpoint.get('restore_data', True):
    change = checkpoint.data_layout_change(ckpt_dir, steps, shard)
    if not checkpoint.all_hosts_agree(change is None):  # refused on every host, or on none
      change = change or f'step {steps[-1]} has another data layout on another process'
      raise ValueError(f'{ckpt_dir}: {change}{checkpoint.restore_data_hint(steps[-1])}')
  else:
    notes.append(
      'checkpoint.restore_data=False: the data position is not restored; the run goes on from '
      'the restored step with a fresh data order (a function of the seed and that step)'
    )
  step, saved = checkpoint.saved_run_config(ckpt_dir, steps)
  if saved is None:  # no readable config: the restore itself will tell
    return notes
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
    return notes
  rates = _rates_at(saved, cfg, step)
  if not cfg.get('resume_schedule_change', False):
    raise ValueError(
      f'{where} was trained with another learning-rate schedule: {", ".join(changed)} '
      f'(checkpoint -> config){rates}. Set --config.resume_schedule_change=True if '
      'that is intended, or give the saved values'
    )
  return notes + [
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
  monitor.info(f'k2jax: {sharding.devices_summary()}; mesh {sharding.describe(mesh, cfg.mesh)}')
  monitor.info(
    f'model {cfg.model.preset}: {model_cfg.param_count() / 1e6:,.1f}M parameters, '
    f'{model_cfg.num_layers} layers, remat {model_cfg.remat}, '
    f'compute {model_cfg.dtype}'
  )
  monitor.info(f'attention {plan.attention.name}: {plan.attention.reason}')
  monitor.info(prepared['shard'].describe())
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
  batches = prepared['train_batches']
  state = checkpoints.restore_latest(plan, batches, monitor.info)
  if state is not None:
    step = int(state.step)
    monitor.info(f'resumed from {checkpoints.directory}/{step}')
    if not checkpoints.data_restored:
      monitor.info(
        f'data: position not restored; a fresh data order from step {step} '
        f'(data_order_since={step} in the records)'
      )
    elif getattr(batches, 'order_since', 0):
      monitor.info(f'data: position restored, in the order started at step {batches.order_since}')
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
) -> str | None:
  """Joins a multi-process run before any JAX computation; a no-op for a single process.

  The layout comes from the flags, or with `auto` from the environment (k2jax/training/cluster.py:
  K2JAX_* variables, SLURM, a Kubernetes Indexed Job; anything else JAX recognises by itself,
  e.g. Open MPI). JAX's own cluster detection is bypassed whenever the layout is known, because
  under SLURM it would give a process that drives a whole node one GPU. Returns a line for the
  log saying who this process is, or None for a single process.

  Raises ValueError when only some of coordinator / num_processes / process_id are given, or
  when the environment describes a layout that cannot be right.
  """
  from k2jax.training import cluster

  given = [v is not None for v in (coordinator, num_processes, process_id)]
  if any(given) and not all(given):
    raise ValueError('--coordinator_address, --num_processes and --process_id go together')
  if all(given):
    layout = cluster.make(coordinator, num_processes, process_id, None, 'flags', os.environ)
  elif auto:
    layout = cluster.detect(os.environ)
  else:
    return None
  import jax

  if os.environ.get('JAX_PLATFORMS', '') == 'cpu':
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU: tests, rehearsals
  if layout is None:
    jax.distributed.initialize()  # the cluster's environment says who is who
    return f'process {jax.process_index()} of {jax.process_count()} (detected by JAX)'
  jax.distributed.initialize(
    coordinator_address=layout.coordinator,
    num_processes=layout.num_processes,
    process_id=layout.process_id,
    local_device_ids=None if layout.local_device_ids is None else list(layout.local_device_ids),
    cluster_detection_method='deactivate',
    initialization_timeout=layout.init_timeout,
  )
  return layout.describe()
