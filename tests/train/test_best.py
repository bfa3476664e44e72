"""WORKDIR/best keeps the weights of the best evaluation of a run, across resumptions."""

import json
import os

import jax
import numpy as np

from seg import checkpoint, parallel
from seg.inference import evaluate
from seg.model import create_model
from seg.train import loop

REAL_EVALUATE = evaluate.evaluate


def _scripted(mious, seen):
  """`evaluate.evaluate` whose mIoUs are `mious` in turn (the rest of each report real);
  `seen` gets the host copy of the weights each evaluation was given."""
  scores = iter(mious)

  def fake(p_eval_step, variables, config, split=None, log=print):
    seen.append(jax.device_get(parallel.unreplicate(variables)))
    return dict(REAL_EVALUATE(p_eval_step, variables, config, split, log), miou=next(scores))
  return fake


def test_best_weights_survive_later_worse_evaluations_and_a_resumption(
    tiny_config, tmp_path, monkeypatch):
  config = tiny_config
  config.train.steps, config.train.eval_every = 6, 2   # evaluations at steps 2, 4, 6
  config.data.eval_split = 'val[:4]'
  workdir = str(tmp_path / 'run')
  seen, logs = [], []
  monkeypatch.setattr(evaluate, 'evaluate', _scripted([0.3, 0.5, 0.4], seen))
  loop.train_and_evaluate(config, workdir, log=logs.append)

  best = os.path.join(workdir, 'best')
  assert json.load(open(os.path.join(best, 'best.json'))) == {'step': 4, 'miou': 0.5}
  model = create_model(config.model)
  restored, step = checkpoint.load_model_variables(best, model)
  assert step == 4 and checkpoint.load_config(best).model.to_dict() == config.model.to_dict()
  # The weights of the step-4 evaluation, not the last ones (which differ from them).
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(seen[1])):
    np.testing.assert_array_equal(np.asarray(got), want)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(seen[1]),
                                                        jax.tree.leaves(seen[2])))
  assert sum('best val mIoU so far' in line for line in logs) == 2   # at steps 2 and 4
  assert logs[-1] == (f'the best evaluation was at step 4 (50.00% val mIoU, 40.00% at the '
                      f'end): its weights are in {best}')

  # Resumed to step 10, evaluated at 8 (0.45: loses to the earlier best, which the resumed
  # run read back) and at 10 (0.7: best/ moves there, keeping one checkpoint).
  config.train.steps = 10
  monkeypatch.setattr(evaluate, 'evaluate', _scripted([0.45, 0.7], seen))
  loop.train_and_evaluate(config, workdir, log=logs.append)
  told = [line for line in logs if 'best val mIoU so far' in line]
  assert len(told) == 3 and told[-1].startswith(   # not at step 8
      'best val mIoU so far: 70.00% at step 10 (was 50.00% at step 4)')
  assert json.load(open(os.path.join(best, 'best.json'))) == {'step': 10, 'miou': 0.7}
  assert os.listdir(os.path.join(best, 'checkpoints')) == ['10']
  restored, step = checkpoint.load_model_variables(best, model)
  assert step == 10
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(seen[-1])):
    np.testing.assert_array_equal(np.asarray(got), want)
