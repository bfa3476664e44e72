"""A resumed run's changed config: the fields named, the learning rates, the record, `compare`.

No training here (tests/train/test_train.py resumes a real run with more steps)."""

import json
import os

import ml_collections

from seg import checkpoint
from seg.config import default_config
from seg.train import changes, compare, loop


def _previous(**fields):
  """A config.json as an earlier run wrote it (JSON: tuples come back as lists)."""
  config = default_config()
  for field, value in fields.items():
    section, key = field.split('__')
    config[section][key] = value
  return ml_collections.ConfigDict(json.loads(config.to_json()))


def test_the_fields_that_differ_and_whether_they_change_the_training():
  previous = _previous(train__learning_rate=0.007, data__min_scale=0.5)
  config = default_config()
  config.train.learning_rate = 0.01
  config.train.eval_every = 100
  config.data.data_dir = '/elsewhere'
  config.eval.scales = (0.75, 1.0, 1.25)
  found = changes.changed_fields(previous, config)
  assert found == {'data.data_dir': ('', '/elsewhere'), 'eval.scales': ((1.0,), (0.75, 1.0, 1.25)),
                   'train.eval_every': (5000, 100), 'train.learning_rate': (0.007, 0.01)}
  assert [f for f in found if changes.changes_training(f)] == ['train.learning_rate']
  assert changes.changed_fields(previous, default_config()) == {}   # lists read as tuples
  # A config.json written before a field existed reads it at today's default: no change.
  old = previous.to_dict()
  del old['train']['keep_best']
  assert changes.changed_fields(ml_collections.ConfigDict(old), default_config()) == {}


def test_the_learning_rates_at_the_resumed_step_under_both_schedules():
  previous = _previous(train__steps=1000, train__warmup_steps=100)
  config = default_config()
  config.train.steps, config.train.warmup_steps = 3000, 100
  base, power = config.train.learning_rate, config.train.lr_power
  # DeepLab's poly rate after the warm-up, written out: lr * (1 - (s - w) / (steps - w)) ** p.
  old, new = changes.learning_rates_at(previous, config, 550)
  assert abs(old - base * (1 - 450 / 900) ** power) < 1e-9
  assert abs(new - base * (1 - 450 / 2900) ** power) < 1e-9
  # In the warm-up the two schedules agree: nothing to say.
  assert changes.learning_rates_at(previous, config, 50) is None
  lines = changes.describe({'train.steps': (1000, 3000)}, 550, (old, new))
  assert lines == [
      'WARNING: resuming at step 550 with a config that trains otherwise than steps 0-550 did '
      '(kept in config_changes.jsonl; config.json holds the new values):',
      '  train.steps: 1000 -> 3000',
      f'  learning rate at step 550: {old:.3g} under the previous schedule, {new:.3g} now']
  assert changes.describe({'eval.flip': (False, True)}, 550) == [
      'resuming at step 550 with changed settings (kept in config_changes.jsonl):',
      '  eval.flip: False -> True']


def test_a_resumption_is_said_recorded_and_listed_by_compare(tmp_path, capsys):
  workdir = str(tmp_path / 'run')
  previous = default_config()
  checkpoint.save_config(workdir, previous)
  logged = []
  assert changes.previous_config(workdir) is None   # nothing to resume: a new run
  os.makedirs(os.path.join(workdir, 'checkpoints', '2000'))
  config = default_config()
  config.train.learning_rate = 0.001
  loop.report_changes(changes.previous_config(workdir), config, workdir, logged.append)
  assert logged[:2] == [
      'WARNING: resuming at step 2000 with a config that trains otherwise than steps 0-2000 '
      'did (kept in config_changes.jsonl; config.json holds the new values):',
      '  train.learning_rate: 0.007 -> 0.001']
  assert logged[2].startswith('  learning rate at step 2000: ')
  [entry] = changes.read(workdir)
  assert entry['step'] == 2000 and entry['changes'] == {'train.learning_rate': [0.007, 0.001]}
  # Resumed again (train writes the config it resumes with) with the first rate back.
  checkpoint.save_config(workdir, config)
  loop.report_changes(changes.previous_config(workdir), previous, workdir, logged.append)
  assert [e['changes'] for e in changes.read(workdir)] == [
      {'train.learning_rate': [0.007, 0.001]}, {'train.learning_rate': [0.001, 0.007]}]
  checkpoint.save_config(workdir, previous)
  other = str(tmp_path / 'other')
  checkpoint.save_config(other, previous)
  compare.compare([other, workdir])   # config.json alike: only the records tell them apart
  out = capsys.readouterr().out
  assert 'config fields that differ' in out and '  (none)' in out
  assert ('  B resumed at step 2000 with train.learning_rate 0.007 -> 0.001\n'
          '  B resumed at step 2000 with train.learning_rate 0.001 -> 0.007\n') in out
  assert 'A resumed' not in out
