"""Loading, overriding and validating run configs (ml_collections ConfigDicts).

`--config=configs/midtrain.py:stage3,debug` loads a config file and calls its
`get_config("stage3,debug")`; `--config.optim.peak_lr=3e-4` overrides one field. Validation runs
before anything is compiled or allocated, and every message names the key at fault.
"""

import difflib
import importlib.util
import json
import os

import ml_collections

from k2jax import errors

# Keys other tools and docs rely on (the command-line contract, docs/configs.md).
CONTRACT_KEYS = (
  'total_steps',
  'seed',
  'log_every',
  'eval_every',
  'init_from',
  'mesh.data',
  'mesh.tensor',
  'mesh.sequence',
  'model.preset',
  'model.attention',
  'model.remat',
  'data.seq_len',
  'optim.peak_lr',
  'optim.min_lr',
  'optim.warmup_steps',
)


def load(spec: str) -> ml_collections.ConfigDict:
  """'path/to/file.py[:arg]' -> the ConfigDict returned by that file's get_config(arg)."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file {path!r} does not exist')
  module_spec = importlib.util.spec_from_file_location(f'_k2jax_config_{abs(hash(path))}', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ValueError(f'config file {path!r} defines no get_config()')
  return module.get_config(arg or None)


def all_keys(cfg, prefix: str = '') -> list[str]:
  """Every leaf key of a ConfigDict, dotted ('optim.peak_lr')."""
  keys = []
  for key, value in cfg.items():
    dotted = f'{prefix}{key}'
    if isinstance(value, ml_collections.ConfigDict):
      keys.extend(all_keys(value, dotted + '.'))
    else:
      keys.append(dotted)
  return keys


def has_key(cfg, dotted: str) -> bool:
  node = cfg
  for part in dotted.split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return True


def unknown_override_message(cfg, argv) -> str | None:
  """A readable message for the first `--config.KEY=...` whose KEY the config lacks."""
  for arg in argv:
    if not arg.startswith('--config.'):
      continue
    key = arg[len('--config.') :].split('=', 1)[0]
    if has_key(cfg, key):
      continue
    keys = all_keys(cfg)
    close = difflib.get_close_matches(key, keys, n=5, cutoff=0.6)
    # Also match on the last part alone: `--config.peak_lr` means `optim.peak_lr`.
    close += [k for k in keys if k.split('.')[-1] == key.split('.')[-1] and k not in close]
    hint = f'; did you mean: {", ".join(close)}?' if close else ''
    return f'unknown config key {key!r} in {arg!r}{hint}'
  return None


def config_spec_from_argv(argv) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg.split('=', 1)[1]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def load_error(spec: str) -> str | None:
  """Why `--config=spec` cannot be loaded, in one line, or None if it loads."""
  try:
    load(spec)
  except Exception as error:  # whatever the config file raised
    return f'cannot load --config={spec}: {error}'
  return None


def parse_flags(flag_values, argv):
  """absl flag parsing with one-line errors (exit 2) instead of tracebacks.

  ml_collections' config flag raises AttributeError / KeyError (or absl an unknown-flag error)
  for a misspelt override, embeds a traceback in its message for a config that raises, and
  quietly substitutes a stand-in for a missing file: all become one readable line here.
  """
  spec = config_spec_from_argv(argv)
  try:
    rest = flag_values(argv)
  except Exception as error:  # absl's flags.Error, AttributeError / KeyError, the config's own
    message = load_error(spec) if spec else None
    if spec and message is None:
      message = unknown_override_message(load(spec), argv)
    errors.fail(message or str(error))
  if spec and not isinstance(flag_values['config'].value, ml_collections.ConfigDict):
    errors.fail(load_error(spec) or f'--config={spec} did not return a ConfigDict')
  return rest


MESH_AXES = ('data', 'tensor', 'sequence')  # the same names as sharding.AXES (no JAX import)


def parse_mesh(spec: str) -> dict[str, int]:
  """A --mesh flag, 'data:8,tensor:8' -> {'data': 8, 'tensor': 8}; -1 fills, as in the config.

  Shared by every command line that takes a mesh (estimate, generate, evaluate, convert).
  """
  sizes = {}
  for part in spec.split(','):
    axis, sep, size = part.strip().partition(':')
    if not sep or axis not in MESH_AXES:
      raise ValueError(
        f'--mesh: {part.strip()!r} is not AXIS:SIZE with AXIS one of {"|".join(MESH_AXES)}'
      )
    if axis in sizes:
      raise ValueError(f'--mesh: axis {axis!r} is given twice')
    try:
      sizes[axis] = int(size)
    except ValueError:
      raise ValueError(f'--mesh: size of {axis!r} must be an integer, got {size!r}') from None
  return sizes


def validate(cfg) -> None:
  """Cross-field checks that need no devices. Raises ValueError naming the key."""
  # Imported here so that loading a config stays light.
  from k2jax.model import config as model_config
  from k2jax.training import optim

  missing = [key for key in CONTRACT_KEYS if not has_key(cfg, key)]
  if missing:
    raise ValueError(f'config lacks required key(s): {", ".join(missing)}')
  for key in (
    'total_steps',
    'log_every',
    'data.seq_len',
    'data.global_batch_size',
    'optim.grad_accum_steps',
  ):
    value = _get(cfg, key)
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f'{key} must be a positive integer, got {value!r}')
  if not isinstance(cfg.eval_every, int) or cfg.eval_every < 0:
    raise ValueError(f'eval_every must be >= 0 (0 disables eval), got {cfg.eval_every!r}')
  if cfg.data.global_batch_size % cfg.optim.grad_accum_steps:
    raise ValueError(
      f'data.global_batch_size={cfg.data.global_batch_size} is not divisible by '
      f'optim.grad_accum_steps={cfg.optim.grad_accum_steps}'
    )
  for key, minimum in (
    ('checkpoint.every', 0),
    ('checkpoint.keep', 1),
    ('checkpoint.keep_every', 0),
  ):
    value = _get(cfg, key) if has_key(cfg, key) else None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
      raise ValueError(f'{key} must be an integer >= {minimum}, got {value!r}')
  if has_key(cfg, 'checkpoint.restore_data') and not isinstance(cfg.checkpoint.restore_data, bool):
    raise ValueError(
      f'checkpoint.restore_data must be True or False, got {cfg.checkpoint.restore_data!r}'
    )
  for axis in ('data', 'tensor', 'sequence'):
    value = cfg.mesh[axis]
    if not isinstance(value, int) or (value <= 0 and value != -1):
      raise ValueError(f'mesh.{axis} must be a positive integer or -1 (fill), got {value!r}')
  _validate_fsdp(cfg.mesh)
  if has_key(cfg, 'compile_cache_dir'):
    from k2jax.training import compile_cache

    compile_cache.check_setting(cfg.compile_cache_dir)
  _validate_stability_and_monitor(cfg)
  if has_key(cfg, 'data.stream'):
    from data_pipeline import streaming

    streaming.check_settings(cfg.data)
  model_config.from_config(cfg.model)
  optim.make_schedule(cfg.optim, cfg.total_steps)


def _validate_fsdp(mesh_cfg) -> None:
  """mesh.fsdp is a mode (or an old boolean); mesh.fsdp_group divides a fixed data axis."""
  from k2jax.parallel import mesh

  mesh.fsdp_mode(mesh_cfg.get('fsdp', False))
  data = mesh_cfg.data
  mesh.fsdp_group(mesh_cfg, data if data > 0 else None)  # -1: checked once devices are known


def _validate_stability_and_monitor(cfg) -> None:
  from k2jax.observe import monitor

  checks = (
    ('checkpoint.every_minutes', 0, float),
    ('stability.spike_window', 2, int),
    ('stability.spike_threshold', 0, float),
    ('stability.spike_min_increase', 0, float),
    ('stability.spike_patience', 0, int),
    ('stability.max_rollbacks', 0, int),
    ('monitor.stall_minutes', 0, float),
  )
  for key, minimum, kind in checks:
    if not has_key(cfg, key):
      continue
    value = _get(cfg, key)
    ok_type = isinstance(value, int) if kind is int else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or value < minimum:
      what = 'an integer' if kind is int else 'a number'
      raise ValueError(f'{key} must be {what} >= {minimum}, got {value!r}')
  if has_key(cfg, 'monitor'):
    monitor.check_settings(cfg.monitor)
    spec = cfg.monitor.get('profile_steps', '')
    if spec:
      parts = spec.split(':')
      if (
        len(parts) != 2
        or not all(p.isdigit() for p in parts)
        or not 0 < int(parts[0]) <= int(parts[1])
      ):
        raise ValueError(
          f"monitor.profile_steps must be 'START:STOP' with 0 < START <= STOP, got {spec!r}"
        )


def _get(cfg, dotted: str):
  node = cfg
  for part in dotted.split('.'):
    node = node[part]
  return node


def saved_form(cfg) -> dict:
  """The run config as it is written anywhere (config.json, checkpoints, W&B): plain JSON values,
  and the webhook URL, a credential, redacted."""
  from k2jax.observe import alerts

  return alerts.redacted_config(json.loads(cfg.to_json_best_effort()))
