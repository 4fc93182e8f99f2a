"""`python -m k2jax.train --config=configs/<stage>.py[:args] --workdir=DIR [--config.key=value ...]`

One loop for every stage (k2jax/loop.py): the config decides model, mesh, data, schedule.
This module parses the command line, checks everything that can fail on bad input before
anything is compiled (`prepare`), and restores or initializes the state (`run`).
"""

import os

from absl import app, flags
from ml_collections import config_flags

from k2jax import run_config

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Stage config file[:args].')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for metrics and checkpoints.')
_COORDINATOR = flags.DEFINE_string(
  'coordinator_address',
  None,
  'host:port of process 0, for a multi-host run started by hand (with --num_processes and '
  '--process_id); under SLURM or Kubernetes use --distributed instead',
)
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process: 0..num_processes-1.')
_DISTRIBUTED = flags.DEFINE_bool(
  'distributed',
  False,
  "Initialize jax.distributed from the cluster's environment "
  '(SLURM, Open MPI, Kubernetes), as on every host of a multi-host job.',
)


# Errors that mean "the config or its inputs are wrong": reported in one line, no traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotImplementedError)


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
  from k2jax.training import checkpoint, train_step

  run_config.validate(cfg)
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
  process = dict(process_index=jax.process_index(), process_count=jax.process_count())
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
  )


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
    f'attention {model_cfg.attention}, compute {model_cfg.dtype}'
  )
  batches = prepared['train_batches']
  if len(batches.names) > 1:
    asked = ', '.join(f'{n} {s:.1%}' for n, s in zip(batches.names, batches.requested_shares))
    monitor.info(
      f'data: mixture of {len(batches.names)} sources, token shares asked: {asked} '
      '(realised shares are logged as data_share/<name>)'
    )
  if jax.process_index() == 0:
    with open(os.path.join(prepared['workdir'], 'config.json'), 'w') as f:
      f.write(cfg.to_json_best_effort(indent=2))

  checkpoints = checkpoint.Checkpoints(prepared['workdir'], cfg)
  try:
    with sharding.activate(mesh, cfg.mesh.fsdp):
      state = _restore_or_init(prepared, checkpoints, monitor)
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


def _restore_or_init(prepared, checkpoints, monitor):
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
  """Joins a multi-process run before any JAX computation; a no-op for a single process."""
  given = [v is not None for v in (coordinator, num_processes, process_id)]
  if any(given) and not all(given):
    run_config.fail('--coordinator_address, --num_processes and --process_id go together')
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


def main(argv):
  if len(argv) > 1:
    run_config.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  if _CONFIG.value is None or _WORKDIR.value is None:
    run_config.fail('both --config=configs/<stage>.py[:args] and --workdir=DIR are required')
  start_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _DISTRIBUTED.value)
  try:
    prepared = prepare(_CONFIG.value, _WORKDIR.value)
  except USER_ERRORS as error:
    run_config.fail(str(error))
  run(prepared)


if __name__ == '__main__':
  app.run(main, flags_parser=lambda argv: run_config.parse_flags(flags.FLAGS, argv))
