"""What a resumed run changed in its config: said when it starts, kept in the workdir.

`train` resumes whatever config it is given and writes that one to WORKDIR/config.json (a
different model is refused, `seg.checkpoint.save_config`). A run resumed with another
learning rate, augmentation or number of steps (wanted, or an override forgotten) would
otherwise leave no trace: config.json would describe the whole run with the last values.
`train` now compares the config it resumes with the one the workdir holds, logs every field
that differs (a WARNING when the training from this step on changes: every `data` and `train`
field but those in `NOT_TRAINING`), with the learning rate at the resumed step under both
schedules when they differ there, and appends the changes to WORKDIR/config_changes.jsonl
({"step", "time", "changes": {field: [old, new]}}), which `compare` lists.
"""

import datetime
import json
import os
from typing import Dict, List, Optional, Tuple

import ml_collections

from seg import checkpoint
from seg import config as config_lib

RECORD = 'config_changes.jsonl'

# Fields that leave the training of the steps to come as it was: where to read the data, what
# to log, evaluate and keep, and how a new run starts (read at step 0 only).
NOT_TRAINING = ('data.data_dir', 'data.eval_split', 'data.eval_size', 'data.predict_max_side',
                'data.cache', 'train.log_every', 'train.checkpoint_every',
                'train.keep_checkpoints', 'train.eval_every', 'train.keep_best',
                'train.summary_images', 'train.init_from', 'train.init_part',
                'train.from_scratch', 'train.skip_nonfinite')


def flat(tree: Dict, prefix: str = '') -> Dict[str, object]:
  """{'section.field': value} of a nested dict (lists as tuples, comparable with JSON's)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flat(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = tuple(value) if isinstance(value, list) else value
  return out


def changed_fields(previous: ml_collections.ConfigDict,
                   config: ml_collections.ConfigDict) -> Dict[str, Tuple[object, object]]:
  """{field: (previous value, new value)} of the data, train and eval fields that differ
  (the model's are refused elsewhere); `previous` as this version reads it (with_defaults)."""
  old = flat(json.loads(config_lib.with_defaults(previous).to_json()))
  new = flat(json.loads(config.to_json()))
  return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
          if k.split('.')[0] in ('data', 'train', 'eval') and old.get(k) != new.get(k)}


def changes_training(field: str) -> bool:
  """Whether a change of `field` changes the training of the steps to come."""
  return field.split('.')[0] in ('data', 'train') and field not in NOT_TRAINING


def previous_config(workdir: str) -> Optional[ml_collections.ConfigDict]:
  """The config of the run the workdir holds, if it holds a checkpoint to resume; else None."""
  path = os.path.join(workdir, checkpoint.CONFIG_FILE)
  if not os.path.isfile(path) or not checkpoint.latest_step(workdir):
    return None
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def describe(changes: Dict[str, Tuple[object, object]], step: int,
             learning_rates: Optional[Tuple[float, float]] = None) -> List[str]:
  """The log lines of a resumption at `step` with `changes`; `learning_rates`: the rate at
  `step` under the previous and the new schedule, where they differ."""
  text = lambda v: "''" if v == '' else f'{v:g}' if isinstance(v, float) else str(v)
  training = [k for k in changes if changes_training(k)]
  head = (f'WARNING: resuming at step {step} with a config that trains otherwise than steps '
          f'0-{step} did (kept in {RECORD}; config.json holds the new values):' if training else
          f'resuming at step {step} with changed settings (kept in {RECORD}):')
  lines = [head]
  for field, (old, new) in changes.items():
    lines.append(f'  {field}: {text(old)} -> {text(new)}')
  if learning_rates:
    lines.append(f'  learning rate at step {step}: {learning_rates[0]:.3g} under the previous '
                 f'schedule, {learning_rates[1]:.3g} now')
  return lines


def learning_rates_at(previous: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
                      step: int) -> Optional[Tuple[float, float]]:
  """(previous, new) learning rate at `step` if the two schedules differ there, else None."""
  from seg.train.step import create_learning_rate_fn
  old = float(create_learning_rate_fn(config_lib.with_defaults(previous).train)(step))
  new = float(create_learning_rate_fn(config.train)(step))
  return (old, new) if abs(old - new) > 1e-12 * max(abs(old), abs(new), 1.0) else None


def record(workdir: str, changes: Dict[str, Tuple[object, object]], step: int) -> None:
  """Appends one line to WORKDIR/config_changes.jsonl."""
  entry = {'step': step, 'time': datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec='seconds'), 'changes': {k: list(v) for k, v in changes.items()}}
  with open(os.path.join(workdir, RECORD), 'a') as f:
    f.write(json.dumps(entry) + '\n')


def read(workdir: str) -> List[Dict]:
  """The records of WORKDIR/config_changes.jsonl, oldest first ([] without one)."""
  path = os.path.join(workdir, RECORD)
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
