"""Evaluation: one confusion matrix over every pixel of a split, accumulated on the devices."""

import functools
import json
import os
import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from seg import checkpoint, classes, engine, parallel
from seg.metrics import confusion_matrix, format_report, iou_report
from seg.model import AXIS_NAME, create_model, preprocess


def eval_step(variables: Dict[str, Any], batch: Dict[str, jax.Array], *, model_config,
              ignore_label: int) -> jax.Array:
  """Confusion matrix of one batch, summed over every device of the pmap axis.

  The logits come from the inference engine's folded forward pass
  (`seg.engine.forward`, float32), the same function `predict`, `benchmark`
  and `export` run; folding the BatchNorm statistics costs a few small ops.

  Args:
    variables: the model's {'params', 'batch_stats'}.
    batch: image [n, h, w, 3] float in [0, 255] (padding = the mean pixel),
      label [n, h, w], mask [n].
  """
  folded = engine.cast_folded(engine.fold_variables(model_config, variables), jnp.float32)
  logits = engine.forward(folded, preprocess(batch['image']), width=model_config.width,
                          output_stride=model_config.output_stride)
  predictions = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  cm = confusion_matrix(batch['label'], predictions, model_config.num_classes, batch['mask'],
                        ignore_label)
  return lax.psum(cm, AXIS_NAME)


def make_p_eval_step(model, config):
  """The pmapped evaluation step for `config` (`model` is unused: kept for callers).

  Batches of different spatial shapes (e.g. images larger than `eval_size` in
  a larger padded bucket) each compile once; pmap caches them by shape.
  """
  del model  # the engine rebuilds the forward pass from config.model
  return jax.pmap(functools.partial(
      eval_step, model_config=config.model, ignore_label=config.data.ignore_label),
      axis_name=AXIS_NAME)


def evaluate(p_eval_step, variables: Dict[str, Any], config, split: Optional[str] = None,
             log=print) -> Dict:
  """Runs `p_eval_step` over a whole split; `variables` are replicated on the devices.

  Returns the report of `seg.metrics.iou_report`.
  """
  from seg.data import pipeline  # TensorFlow stays out of the import of this module.
  split = split or config.data.eval_split
  batch_size = parallel.local_batch_size(config.eval.batch_size)
  confusion = np.zeros((config.model.num_classes,) * 2, np.int64)
  num_images, start = 0, time.time()
  batches = pipeline.eval_batches(config.data, batch_size, split, jax.process_index(),
                                  jax.process_count())
  for batch in batches:
    num_images += int(batch['mask'].sum())
    confusion += np.asarray(p_eval_step(variables, parallel.shard(batch))[0], np.int64)
  num_images = int(np.asarray(jax.device_get(
      _sum_over_processes(np.int64(num_images)))))
  names = classes.class_names(config.data.dataset, config.model.num_classes)
  report = iou_report(confusion, names, num_images)
  log(f'evaluated {num_images} images of {split!r} in {time.time() - start:.1f}s: '
      f'mIoU {100 * report["miou"]:.2f}%')
  return report


def _sum_over_processes(value):
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(value).sum()


def evaluate_workdir(workdir: str, config=None, output: Optional[str] = None,
                     log=print) -> Dict:
  """`main.py eval`: evaluates the latest checkpoint of `workdir` and prints the table.

  `config` defaults to the one the workdir was trained with; data and eval
  fields of a given config may differ from training (e.g. another split).
  """
  config = config or checkpoint.load_config(workdir)
  model = create_model(config.model)
  variables, step = checkpoint.load_model_variables(workdir, model)
  log(f'evaluating {workdir} at step {step}')
  report = evaluate(make_p_eval_step(model, config), parallel.replicate(variables), config,
                    log=log)
  report['step'] = step
  log(format_report(report))
  if output:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, 'w') as f:
      json.dump(report, f, indent=2)
    log(f'wrote {output}')
  return report
