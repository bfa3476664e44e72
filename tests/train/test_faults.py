"""Faults: deterministic resumption, SIGTERM/SIGKILL, non-finite steps, a foreign workdir."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from helpers import ROOT, poisoned
from seg import checkpoint, parallel
from seg.train import loop
from seg.train import step as step_lib
from seg.data import pipeline
from seg.model import create_model



def _checkpointed_params(workdir, config):
  variables, _ = checkpoint.load_model_variables(workdir, create_model(config.model))
  return variables


def test_stopped_and_resumed_run_equals_a_straight_run(tiny_config, tmp_path):
  config = tiny_config
  config.train.steps, config.train.checkpoint_every, config.train.summary_images = 6, 100, 0
  config.data.eval_split = 'val[:8]'  # the checkpoints are compared, not the evaluation
  logs = []
  straight = str(tmp_path / 'straight')
  loop.train_and_evaluate(config, straight, log=logs.append)
  resumed = str(tmp_path / 'resumed')
  assert loop.train_and_evaluate(config, resumed, log=logs.append,
                                  stop_at_step=3) == {'stopped_at_step': 3}
  assert checkpoint.create_manager(resumed).all_steps() == [3]
  assert any('Resume with the same command' in line for line in logs)
  loop.train_and_evaluate(config, resumed, log=logs.append)
  assert any('resuming at step 3' in line for line in logs)
  a, b = _checkpointed_params(straight, config), _checkpointed_params(resumed, config)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)


def test_input_stream_depends_on_seed_and_step_only(tiny_config):
  config = tiny_config
  straight = pipeline.train_batches(config.data, 4, seed=7)
  batches = [next(straight) for _ in range(4)]
  resumed = next(pipeline.train_batches(config.data, 4, seed=7, start_step=3))
  np.testing.assert_array_equal(resumed['image'], batches[3]['image'])
  np.testing.assert_array_equal(resumed['label'], batches[3]['label'])
  other = next(pipeline.train_batches(config.data, 4, seed=8, start_step=3))
  assert not np.array_equal(other['image'], batches[3]['image'])


def test_nonfinite_step_stops_naming_it_and_keeps_the_last_checkpoint(tiny_config, tmp_path,
                                                                     monkeypatch):
  config = tiny_config
  config.train.steps, config.train.checkpoint_every, config.train.log_every = 6, 2, 2
  monkeypatch.setattr(pipeline, 'train_batches', poisoned(pipeline.train_batches, 3))
  workdir = str(tmp_path / 'run')
  with pytest.raises(FloatingPointError, match='at step 3'):
    loop.train_and_evaluate(config, workdir, log=lambda _: None)
  assert checkpoint.create_manager(workdir).all_steps() == [2]
  variables = _checkpointed_params(workdir, config)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(variables))


def test_nonfinite_batch_leaves_the_state_unchanged_but_the_counters(tiny_config):
  config = tiny_config
  lr = step_lib.create_learning_rate_fn(config.train)
  state = step_lib.create_train_state(jax.random.key(0), config, create_model(config.model), lr)
  batch = next(pipeline.train_batches(config.data, 4, seed=0))
  batch['image'][1, 5, 5, 2] = np.inf
  new, metrics = step_lib.make_p_train_step(config, lr)(
      parallel.replicate(state), parallel.shard(batch), parallel.replicate(jax.random.key(1)))
  new = parallel.unreplicate(new)
  assert not np.isfinite(float(metrics['loss'][0]))
  # The optimiser's step count moves on with state.step (the schedule follows the step).
  counts = lambda opt_state: [x for path, x in jax.tree_util.tree_flatten_with_path(opt_state)[0]
                              if getattr(path[-1], 'name', None) == 'count']
  assert [int(c) for c in counts(new.opt_state)] == [1]
  without_counts = lambda opt_state: jax.tree_util.tree_map_with_path(
      lambda path, x: 0 if getattr(path[-1], 'name', None) == 'count' else x, opt_state)
  for before, after in zip(
      jax.tree.leaves((state.params, state.batch_stats, without_counts(state.opt_state))),
      jax.tree.leaves((new.params, new.batch_stats, without_counts(new.opt_state)))):
    np.testing.assert_array_equal(np.asarray(after), np.asarray(before))
  assert int(new.step) == 1 and int(new.nonfinite_steps) == 1
  assert int(new.first_nonfinite_step) == 1


def test_workdir_of_another_model_is_refused_before_restoring(tiny_config, tmp_path):
  workdir = str(tmp_path / 'run')
  checkpoint.save_config(workdir, tiny_config)
  other = tiny_config.copy_and_resolve_references()
  other.model.width = 0.5
  with pytest.raises(ValueError, match='different model'):
    loop.train_and_evaluate(other, workdir, log=lambda _: None)
  assert json.load(open(os.path.join(workdir, 'config.json')))['model']['width'] == 0.35
  checkpoint.save_config(workdir, tiny_config)   # the same model is welcome


def _start_training(workdir, data_dir, steps):
  command = [sys.executable, 'main.py', 'train', '--config', 'experiments/tiny.py',
             '--workdir', workdir, f'--config.data.data_dir={data_dir}',
             f'--config.train.steps={steps}', '--config.train.checkpoint_every=1',
             '--config.train.log_every=1', '--config.train.keep_checkpoints=3']
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1',
             TF_CPP_MIN_LOG_LEVEL='2')
  return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _wait_for_line(process, text, timeout=300):
  lines, deadline = [], time.time() + timeout
  while time.time() < deadline:
    line = process.stdout.readline()
    if not line and process.poll() is not None:
      break
    lines.append(line)
    if text in line:
      return lines
  process.kill()
  raise AssertionError(f'{text!r} not seen:\n' + ''.join(lines[-40:]))


def test_sigterm_saves_and_exits_zero_sigkill_mid_save_resumes(data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  checkpoints = os.path.join(workdir, 'checkpoints')
  # SIGTERM: finishes the step, saves, says how to resume, exits 0.
  process = _start_training(workdir, data_dir, 10_000)
  _wait_for_line(process, 'step      2/')
  process.send_signal(signal.SIGTERM)
  output = process.communicate(timeout=300)[0]
  assert process.returncode == 0, output[-3000:]
  assert 'stopped by SIGTERM' in output and 'Resume with the same command' in output
  stopped = int(output.split('stopped by SIGTERM after step ')[1].split('/')[0])
  assert checkpoint.create_manager(workdir).latest_step() == stopped

  # SIGKILL while orbax writes a checkpoint (its temporary folder exists).
  process = _start_training(workdir, data_dir, 10_000)
  _wait_for_line(process, f'resuming at step {stopped}')
  caught, deadline = False, time.time() + 300
  while time.time() < deadline and process.poll() is None:
    if any('tmp' in name for name in os.listdir(checkpoints)):
      process.kill()
      caught = True
      break
    time.sleep(0.002)
  process.wait()
  assert caught, 'never saw a checkpoint being written'
  complete = [int(n) for n in os.listdir(checkpoints) if n.isdigit()]

  # The next start resumes from the newest complete checkpoint.
  process = _start_training(workdir, data_dir, 10_000)
  lines = _wait_for_line(process, 'resuming at step')
  lines += _wait_for_line(process, 'step ')   # the signal handlers are in place
  process.send_signal(signal.SIGTERM)
  output = ''.join(lines) + process.communicate(timeout=300)[0]
  assert process.returncode == 0, output[-3000:]
  assert f'resuming at step {max(complete)}' in output


def test_resuming_a_run_that_skipped_steps_without_skipping_runs_clean(tiny_config, tmp_path,
                                                                       monkeypatch):
  # The first run skips its poisoned step 1 and is stopped at step 2; the resumed run has no
  # non-finite step of its own, so skip_nonfinite=False must let it finish (it raised "at step
  # -1": the count came back from the checkpoint, the step did not).
  config = tiny_config
  config.train.steps, config.train.checkpoint_every, config.train.log_every = 4, 2, 2
  config.train.skip_nonfinite, config.train.summary_images = True, 0
  config.data.eval_split = 'val[:4]'
  real = pipeline.train_batches
  monkeypatch.setattr(pipeline, 'train_batches', poisoned(real, 1))
  workdir, logs = str(tmp_path / 'run'), []
  assert loop.train_and_evaluate(config, workdir, log=logs.append,
                                 stop_at_step=2) == {'stopped_at_step': 2}
  assert any('(1 non-finite steps skipped)' in line for line in logs)
  monkeypatch.setattr(pipeline, 'train_batches', real)
  config.train.skip_nonfinite = False
  report = loop.train_and_evaluate(config, workdir, log=logs.append)
  assert report['step'] == 4
  assert checkpoint.create_manager(workdir).latest_step() == 4


def test_skipped_step_keeps_the_applied_learning_rate_on_the_schedule(tiny_config):
  # Momentum and weight decay off, power 1 over 3 steps: an update is -lr(step) * gradient.
  # After a skipped step 1, step 2 must apply lr(1) = 2/3 of lr(0) to the same gradient (the
  # state is unchanged by the skip), and the schedule must end at 0 after step 3.
  config = tiny_config
  config.train.steps, config.train.lr_power, config.train.warmup_steps = 3, 1.0, 0
  config.train.momentum, config.train.weight_decay = 0.0, 0.0
  lr = step_lib.create_learning_rate_fn(config.train)
  state = step_lib.create_train_state(jax.random.key(0), config, create_model(config.model), lr)
  p_step = step_lib.make_p_train_step(config, lr)
  batch = next(pipeline.train_batches(config.data, 4, seed=0))
  bad = dict(batch, image=batch['image'].copy())
  bad['image'][0, 0, 0, 0] = np.nan
  rng = parallel.replicate(jax.random.key(1))
  run = lambda s, b: p_step(s, parallel.shard(b), rng)
  fresh, _ = run(parallel.replicate(state), batch)
  skipped, _ = run(parallel.replicate(state), bad)
  assert int(parallel.unreplicate(skipped.nonfinite_steps)) == 1
  after, metrics = run(skipped, batch)   # (donates `skipped`)
  assert np.isclose(float(metrics['learning_rate'][0]), float(lr(1)))
  ratio = float(lr(1)) / float(lr(0))
  assert np.isclose(ratio, 2 / 3)
  before = jax.tree.leaves(state.params)
  for p0, p_fresh, p_after in zip(before, jax.tree.leaves(parallel.unreplicate(fresh).params),
                                  jax.tree.leaves(parallel.unreplicate(after).params)):
    np.testing.assert_allclose(np.asarray(p_after) - np.asarray(p0),
                               ratio * (np.asarray(p_fresh) - np.asarray(p0)),
                               rtol=1e-4, atol=1e-7)
  last, metrics = run(after, batch)   # step 3 applies lr(2); a step after it would get lr(3)
  assert np.isclose(float(metrics['learning_rate'][0]), float(lr(2)))
  host = parallel.unreplicate(last)
  assert int(host.step) == 3 and float(lr(host.step)) == 0.0
  counts = [x for path, x in jax.tree_util.tree_flatten_with_path(host.opt_state)[0]
            if getattr(path[-1], 'name', None) == 'count']
  assert [int(c) for c in counts] == [3]   # the schedule's count follows state.step
