"""WORKDIR/best: the weights of the evaluation with the highest val mIoU so far.

The training checkpoints keep the last `train.keep_checkpoints` steps, for resuming; a run
that peaks before its end (a small dataset, too many steps) would lose its best weights.
`best/` is a workdir of its own (config.json and a model-only checkpoint, as `import-weights`
writes), so every command that takes `--workdir` takes it, and `best.json` says its step and
mIoU.
"""

import json
import math
import os

import jax

from seg import checkpoint, parallel

FOLDER = 'best'
RECORD = 'best.json'


class BestWeights:
  """Keeps WORKDIR/best at the best evaluation so far (`offer` after each one)."""

  def __init__(self, workdir: str, config, log=print):
    self.path = os.path.join(workdir, FOLDER)
    self.config, self.log = config, log
    self.miou, self.step = -math.inf, None
    record = os.path.join(self.path, RECORD)
    if os.path.exists(record):   # a resumed run competes with its earlier evaluations
      with open(record) as f:
        saved = json.load(f)
      self.miou, self.step = saved['miou'], saved['step']
    self._manager = None

  def offer(self, state, step: int, miou: float) -> bool:
    """Saves the replicated `state`'s weights if `miou` beats the best so far (every process
    calls it: orbax saves collectively); True if it did."""
    if not miou > self.miou:
      return False
    if self._manager is None:
      checkpoint.save_config(self.path, self.config)
      self._manager = checkpoint.create_manager(self.path, keep=1)
    if step in self._manager.all_steps():   # left by a run stopped before its record
      self._manager.delete(step)
    host = parallel.unreplicate(state)
    checkpoint.save_model_only(self._manager, step, {'params': host.params,
                                                     'batch_stats': host.batch_stats})
    self._manager.wait_until_finished()   # the record names a complete checkpoint only
    if jax.process_index() == 0:
      with open(os.path.join(self.path, RECORD + '.tmp'), 'w') as f:
        json.dump({'step': step, 'miou': miou}, f)
      os.replace(os.path.join(self.path, RECORD + '.tmp'), os.path.join(self.path, RECORD))
    previous = '' if self.step is None else f' (was {100 * self.miou:.2f}% at step {self.step})'
    self.miou, self.step = miou, step
    self.log(f'best val mIoU so far: {100 * miou:.2f}% at step {step}{previous}; its weights '
             f'in {self.path}, a workdir that eval, predict and export take')
    return True
