"""The workdir of a run: its layout, config.json and orbax checkpoints.

    WORKDIR/config.json       the experiment's config (eval and predict rebuild the model from it)
    WORKDIR/checkpoints/N/    one orbax checkpoint per saved step, items:
        model: {'params', 'batch_stats'}   everything eval and predict need
        train: {'opt_state', 'step'}       what resuming training needs besides
    WORKDIR/eval.json         the last evaluation report
    WORKDIR/weights.json      only in workdirs written by `import-weights` (seg/weights/);
                              the 'model' item then holds only the backbone if it says so

Orbax writes each step to a temporary folder and renames it when complete,
so a crash in the middle of a save never leaves a checkpoint that restores.
"""

import json
import os
import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from seg.config import with_defaults

CONFIG_FILE = 'config.json'
SHARED_MARKER = '.shared_workdir'   # written by process 0 at start, read by the others


class WorkdirNotShared(ValueError):
  """A multi-host run's workdir is not one folder that every host sees."""


def write_marker(workdir: str, token: int) -> str:
  """Process 0's half of `check_shared_workdir`: WORKDIR/.shared_workdir holding `token`."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, SHARED_MARKER)
  with open(path + f'.{token}.tmp', 'w') as f:
    f.write(str(token))
  os.replace(path + f'.{token}.tmp', path)
  return path


def marker_seen(workdir: str, token: int, timeout: float, poll: float = 0.2) -> bool:
  """The other processes' half: whether WORKDIR/.shared_workdir holds `token` within `timeout` s."""
  path = os.path.join(workdir, SHARED_MARKER)
  deadline = time.monotonic() + timeout
  while True:
    try:
      with open(path) as f:
        if f.read().strip() == str(token):
          return True
    except FileNotFoundError:
      pass
    if time.monotonic() >= deadline:
      return False
    time.sleep(poll)


def check_shared_workdir(workdir: str, timeout: float = 60.0) -> None:
  """Stops a multi-host run at start when its workdir is not on a filesystem all hosts see.

  Orbax writes a checkpoint's host arrays from process 0 and the others wait for
  them; on a per-host folder the run would train and then hang or lose its
  checkpoints. Process 0 writes a marker holding a fresh token (broadcast to
  all); every other process must read it within `timeout` seconds (NFS caches
  directory entries for a few seconds). Every process raises `WorkdirNotShared`
  together, naming those that did not see it. One process: nothing to check.
  """
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils
  token = int(multihost_utils.broadcast_one_to_all(
      np.int32(int.from_bytes(os.urandom(4), 'little') >> 1)))
  if jax.process_index() == 0:
    write_marker(workdir, token)
    seen = True
  else:
    seen = marker_seen(workdir, token, timeout)
  flags = np.asarray(multihost_utils.process_allgather(np.int32(seen))).reshape(-1)
  missing = [i for i, ok in enumerate(flags) if not ok]
  if missing:
    raise WorkdirNotShared(
        f'--workdir {workdir} is not shared: process(es) {missing} did not see the file '
        f'{SHARED_MARKER} that process 0 wrote there within {timeout:.0f} s. A multi-host run '
        f'needs a workdir on a filesystem that every host mounts at the same path (NFS, '
        f'Lustre, GPFS): checkpoints are written together by all processes')


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes config.json; refuses a workdir whose existing run has another model."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    # Compared as this version reads it (renamed and added fields translated).
    previous_model = with_defaults(ml_collections.ConfigDict(previous)).model.to_dict()
    if previous_model != config.model.to_dict():
      changed = sorted(k for k in set(previous_model) | set(config.model)
                       if previous_model.get(k) != config.model.get(k))
      raise ValueError(
          f'{workdir} holds a run of a different model ({path}: '
          + ', '.join(f'model.{k}={previous_model.get(k)!r}, not {config.model.get(k)!r}'
                      for k in changed)
          + '); use another --workdir or remove that one')
  if jax.process_index() == 0:
    # Written whole, then renamed: other processes of a multi-host run read it meanwhile.
    with open(path + '.tmp', 'w') as f:
      f.write(config.to_json(indent=2))
    os.replace(path + '.tmp', path)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (fields added since then at their defaults)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: is {workdir} a training workdir?')
  with open(path) as f:
    return with_defaults(ml_collections.ConfigDict(json.load(f)))


def latest_step(workdir: str) -> Optional[int]:
  """The latest complete checkpoint's step in `workdir`, or None; creates nothing."""
  folder = os.path.join(workdir, 'checkpoints')
  steps = [int(n) for n in os.listdir(folder) if n.isdigit()] if os.path.isdir(folder) else []
  return max(steps) if steps else None


def create_manager(workdir: str, keep: int = 3) -> ocp.CheckpointManager:
  """A manager over WORKDIR/checkpoints keeping the last `keep` checkpoints."""
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), 'checkpoints'),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
      item_names=('model', 'train'))


def save(manager: ocp.CheckpointManager, step: int, model_vars: Dict[str, Any],
         train_vars: Dict[str, Any]) -> None:
  """Saves host (unreplicated) pytrees for `step` (asynchronously; see `wait`)."""
  manager.save(step, args=ocp.args.Composite(model=ocp.args.StandardSave(model_vars),
                                             train=ocp.args.StandardSave(train_vars)))


def save_model_only(manager: ocp.CheckpointManager, step: int,
                    model_vars: Dict[str, Any]) -> None:
  """Saves only the 'model' item (imported weights have no training state)."""
  manager.save(step, args=ocp.args.Composite(model=ocp.args.StandardSave(model_vars)))


def restore(manager: ocp.CheckpointManager, model_like: Dict[str, Any],
            train_like: Optional[Dict[str, Any]] = None, step: Optional[int] = None):
  """Restores (model_vars, train_vars or None) at `step` (default: latest), or None.

  `model_like` / `train_like` give the structure, shapes and dtypes expected.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  args = {'model': ocp.args.StandardRestore(model_like)}
  if train_like is not None:
    args['train'] = ocp.args.StandardRestore(train_like)
  restored = manager.restore(step, args=ocp.args.Composite(**args))
  return restored['model'], (restored['train'] if train_like is not None else None)


def abstract_variables(model, image_size: int = 65) -> Dict[str, Any]:
  """Shapes and dtypes of the model's params and batch_stats (nothing computed)."""
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, image_size, image_size, 3), jnp.float32), train=False))
  return {'params': shapes['params'], 'batch_stats': shapes['batch_stats']}


def load_model_variables(workdir: str, model, step: Optional[int] = None):
  """(variables {'params', 'batch_stats'}, step) of the latest (or given) checkpoint."""
  record = os.path.join(workdir, 'weights.json')
  if os.path.exists(record):
    with open(record) as f:
      if json.load(f).get('contents') == 'backbone':
        raise ValueError(f'{workdir} holds imported backbone weights only ({record}): train '
                         f'a head from them with --config.train.init_from={workdir}')
  manager = create_manager(workdir)
  restored = restore(manager, abstract_variables(model), step=step)
  if restored is None:
    raise FileNotFoundError(f'no checkpoint in {os.path.join(workdir, "checkpoints")}: '
                            f'train first (python main.py train --workdir {workdir} ...)')
  return restored[0], manager.latest_step() if step is None else step


def load_raw_model_variables(workdir: str) -> Dict[str, Any]:
  """The 'model' item of the latest checkpoint as saved (NumPy arrays), whatever its structure."""
  manager = create_manager(workdir)
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {os.path.join(workdir, "checkpoints")}')
  return manager.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore()))['model']
