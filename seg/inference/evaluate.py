"""Evaluation: one confusion matrix over every pixel of a split, accumulated on the devices."""

import functools
import json
import os
import time
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from seg import checkpoint, classes, parallel
from seg.inference import fold, metrics
from seg.inference.forward import forward, multi_scale_logits
from seg.model import create_model
from seg.parallel import AXIS_NAME
from seg.preprocessing import preprocess_padded


def eval_step(variables: Dict[str, Any], batch: Dict[str, jax.Array], *, model_config,
              ignore_label: int, scales=(1.0,), flip: bool = False,
              dtype=jnp.float32, upsample_argmax: str = 'xla') -> Dict[str, jax.Array]:
  """The confusion matrix of one batch, summed over every device of the pmap axis
  ('confusion'), and each of this device's examples' `metrics.class_counts` ('counts').

  The logits come from the inference engine's folded forward pass
  (`seg.inference.forward.forward`, float32), the same function `predict`, `benchmark`
  and `export` run; folding the BatchNorm statistics costs a few small ops.
  `scales`/`flip`: multi-scale and flipped evaluation (`multi_scale_logits`).
  `upsample_argmax='kernel'`: one scale without flip takes its logits to the image's size
  and their argmax in the CPU kernel (`forward.class_map`'s, as the engine does).

  Args:
    variables: the model's {'params', 'batch_stats'} (folded here, XLA's float32: training's
      evaluation), or the engine's prepared weights (`seg.inference.engine.Engine.folded`:
      `main.py eval`, any dtype, in the CPU's formulation).
    batch: image [n, h, w, 3] uint8 with size [n, 2] (each image's height and width; the
      rest is padding, `preprocess_padded`), label [n, h, w], mask [n]
      (`seg.data.pipeline.eval_batches`).
  """
  if 'params' in variables:
    folded = fold.cast_folded(fold.fold_variables(model_config, variables), jnp.float32)
  else:
    folded = variables
  images = preprocess_padded(batch['image'], batch['size'])
  if upsample_argmax == 'kernel' and tuple(scales) == (1.0,) and not flip:
    from seg.inference import float_kernel
    features = forward(folded, images, width=model_config.width, upsample=False,
                       output_stride=model_config.output_stride, dtype=dtype)
    predictions = float_kernel.upsampled_argmax(features, *images.shape[1:3])
  else:
    scores = multi_scale_logits(folded, images, width=model_config.width,
                                output_stride=model_config.output_stride, scales=scales,
                                flip=flip, dtype=dtype)
    predictions = jnp.argmax(scores, axis=-1)
  predictions = predictions.astype(jnp.int32)
  matrices = metrics.confusion_matrices(batch['label'], predictions, model_config.num_classes,
                                        batch['mask'], ignore_label)
  return {'confusion': lax.psum(matrices.sum(0), AXIS_NAME),
          'counts': metrics.class_counts(matrices)}


def make_p_eval_step(model, config, dtype=jnp.float32, upsample_argmax: str = 'xla'):
  """The pmapped evaluation step for `config` (`model` is unused: kept for callers);
  `dtype`, `upsample_argmax`: `eval_step`'s.

  Batches of different spatial shapes (e.g. images larger than `eval_size` in
  a larger padded bucket) each compile once; pmap caches them by shape.
  `config.eval.scales` / `config.eval.flip` (absent in older configs: one
  scale, no flip) select multi-scale / flipped evaluation.
  """
  del model  # the engine rebuilds the forward pass from config.model
  scales = tuple(float(s) for s in config.eval.scales)
  if not scales or min(scales) <= 0:
    raise ValueError(f'config.eval.scales must be positive numbers, got {scales}')
  return jax.pmap(functools.partial(
      eval_step, model_config=config.model, ignore_label=config.data.ignore_label,
      scales=scales, flip=bool(config.eval.flip), dtype=dtype,
      upsample_argmax=upsample_argmax), axis_name=AXIS_NAME)


def evaluate(p_eval_step, variables: Dict[str, Any], config, split: Optional[str] = None,
             log=print) -> Dict:
  """Runs `p_eval_step` over a whole split; `variables` are replicated on the devices.

  Returns the report of `seg.inference.metrics.iou_report` with 'images': every image's
  scores, worst first (`metrics.image_rows`; the split's ids, gathered from every process).
  """
  from seg.data import pipeline  # TensorFlow stays out of the import of this module.
  split = split or config.data.eval_split
  batch_size = parallel.local_batch_size(config.eval.batch_size)
  confusion = np.zeros((config.model.num_classes,) * 2, np.int64)
  indices, counts, start = [], [], time.time()
  batches = pipeline.eval_batches(config.data, batch_size, split, jax.process_index(),
                                  jax.process_count(), num_classes=config.model.num_classes)
  for batch in batches:
    indices.append(batch.pop('index'))
    out = p_eval_step(variables, parallel.shard(batch))
    confusion += parallel.unreplicate(out['confusion']).astype(np.int64)
    counts.append(parallel.local_rows(out['counts']))
  indices, counts = _gather_over_processes(np.concatenate(indices),
                                           np.concatenate(counts).astype(np.int64))
  real = indices >= 0   # padding examples are -1
  names = classes.class_names(config.data.dataset, config.model.num_classes,
                              config.data.class_names)
  report = metrics.iou_report(confusion, names, int(real.sum()))
  ids = pipeline.split_ids(config.data, split)
  report['images'] = metrics.image_rows([ids[i] for i in indices[real]], counts[real], names)
  log(f'evaluated {report["num_images"]} images of {split!r} in {time.time() - start:.1f}s: '
      f'mIoU {100 * report["miou"]:.2f}%')
  return report


def _gather_over_processes(*arrays):
  """Each array's rows from every process, concatenated (all processes hold equal shapes:
  `eval_batches` gives each as many batches)."""
  if jax.process_count() == 1:
    return arrays
  from jax.experimental import multihost_utils
  return tuple(np.concatenate(list(np.asarray(multihost_utils.process_allgather(a))))
               for a in arrays)


WORST_IN_JSON = 20


def write_report(report: Dict, path: str, charts: str, log=print) -> None:
  """`report` (`evaluate`'s) as files: the JSON at `path` (the images left to the CSV but the
  WORST_IN_JSON lowest-scoring), every image's scores in PATH_STEM_images.csv (worst first),
  and two charts, CHARTSper_class_iou.png and CHARTSconfusion_matrix.png."""
  from seg import plots
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  images = report.get('images', [])
  summary = {k: v for k, v in report.items() if k != 'images'}
  summary['worst_images'] = [{k: r[k] for k in ('id', 'miou', 'pixel_accuracy')}
                             for r in images[:WORST_IN_JSON]]
  with open(path, 'w') as f:
    json.dump(summary, f, indent=2)
  table = os.path.splitext(path)[0] + '_images.csv'
  metrics.write_image_csv(images, list(report['per_class_iou']), table)
  plots.plot_per_class_iou(report, charts + 'per_class_iou.png')
  plots.plot_confusion_matrix(report, charts + 'confusion_matrix.png')
  log(f'wrote {path}, {table} (every image, worst first) and the charts '
      f'{charts}per_class_iou.png, {charts}confusion_matrix.png')


def write_panels(rows, count: int, folder: str, example, ignore_label: int = 255,
                 class_colours: str = '', log=print) -> List[str]:
  """PNG panels, image | label | prediction (`classes.example_panels`), of the `count`
  lowest-scoring images of `rows` (a report's 'images', worst first) into `folder`, named
  RANK_ID.png (a '/' in an id as '__'); `example(id)` gives (image [h, w, 3], label [h, w],
  prediction [h, w]). Returns the paths."""
  from PIL import Image
  chosen = [r['id'] for r in rows if r['miou'] is not None][:count]
  os.makedirs(folder, exist_ok=True)
  paths = []
  for rank, name in enumerate(chosen, 1):
    image, label, mask = example(name)
    panel = classes.example_panels(image[None], label[None], mask[None], ignore_label,
                                   class_colours)[0]
    paths.append(os.path.join(folder, f'{rank:02d}_{name.replace("/", "__")}.png'))
    Image.fromarray(panel).save(paths[-1])
  log(f'wrote {len(paths)} panels (image | label | prediction) of the lowest-scoring images '
      f'to {folder}')
  return paths


def write_worst_panels(eng, config, rows, count: int, folder: str, log=print) -> List[str]:
  """`write_panels` of a dataset split's images: the predictions are the engine's (`eng`,
  built with `config.eval.scales` and `flip`: what `predict` writes by default)."""
  from seg.data import pipeline
  chosen = [r['id'] for r in rows if r['miou'] is not None][:count]
  examples = pipeline.named_examples(config.data, config.data.eval_split, chosen)
  masks = dict(zip(chosen, eng.predict([examples[name][0] for name in chosen])))
  return write_panels(rows, count, folder, lambda name: (*examples[name], masks[name]),
                      config.data.ignore_label, config.data.class_colours, log)


def engine_dtype(name: str):
  from seg.inference.engine import DTYPES
  return DTYPES[name]


def evaluate_workdir(workdir: str, config=None, output: Optional[str] = None,
                     log=print, dtype: str = 'float32', calibration: Optional[str] = None,
                     calibration_count: Optional[int] = None, worst: int = 0) -> Dict:
  """`main.py eval`: evaluates the latest checkpoint of `workdir` and prints the table.

  `config` defaults to the one the workdir was trained with; data and eval
  fields of a given config may differ from training (e.g. another split).
  `dtype`: the engine's compute dtype (int8: scales from `workdir/int8_scales.json`, or
  calibrated on the training split, or `calibration`'s images, and stored there).
  `output` (report JSON) gets the image CSV and the charts beside it (`write_report`), and
  with `worst` the panels of that many lowest-scoring images in OUTPUT_STEM_worst/
  (`write_worst_panels`).
  """
  if worst and not output:
    raise ValueError('--worst writes its panels beside the report: give --output too')
  config = config or checkpoint.load_config(workdir)
  model = create_model(config.model)
  variables, step = checkpoint.load_model_variables(workdir, model)
  log(f'evaluating {workdir} at step {step}' + (f' in {dtype}' if dtype != 'float32' else ''))
  # The engine's weights, as predict runs them: the CPU's kernels, int8's calibration.
  from seg.inference import engine
  scales = engine.int8_scales_for(workdir, config, variables, log, calibration,
                                  calibration_count) if dtype == 'int8' else None
  eng = engine.Engine(config, variables, dtype=dtype, int8_scales=scales, log=log,
                      scales=config.eval.scales, flip=config.eval.flip)  # --worst's panels
  if eng.int8_formulation:
    loop = ''
    if eng.int8_formulation == 'kernel':
      from seg.inference import int8_kernel, quantize
      where = lambda choice: 'the kernel' if choice == 'kernel' else "XLA's"
      loop = (f', its {int8_kernel.isa()} loop, depthwise layers in '
              f'{where(quantize.depthwise_choice())}, stem in {where(quantize.stem_choice())}')
    log(f'int8 products: the {eng.int8_formulation!r} formulation{loop} (seg.inference.quantize)')
  if eng.bf16_formulation == 'kernel':
    from seg.inference import float_kernel
    log(f'bfloat16 products: the project\'s kernel, its {float_kernel.isa()} loop '
        f'(seg.inference.float_kernel)')
  if eng.f32_formulation == 'kernel':
    from seg.inference import float_kernel
    log(f'float32 products: the project\'s kernel, its {float_kernel.f32_isa()} loop '
        '(seg.inference.float_kernel)')
  variables = jax.device_get(eng.folded)
  if eng.upsample_argmax == 'kernel' and tuple(config.eval.scales) == (1.0,) and \
      not config.eval.flip:
    log("upsampling and argmax: the project's kernel, row by row (seg.inference.float_kernel)")
  report = evaluate(make_p_eval_step(model, config, engine_dtype(dtype), eng.upsample_argmax),
                    parallel.replicate(variables), config, log=log)
  report['step'] = step
  report['dtype'] = dtype
  log(metrics.format_report(report))
  if output and jax.process_index() == 0:
    write_report(report, output, os.path.splitext(output)[0] + '_', log)
    if worst:
      write_worst_panels(eng, config, report['images'], worst,
                         os.path.splitext(output)[0] + '_worst', log)
  return report
