"""`main.py import-weights`: a published checkpoint -> a workdir that eval, predict and train use.

    OUTPUT/config.json       the config (model fields taken from the file)
    OUTPUT/checkpoints/0/    orbax, item 'model' = {'params', 'batch_stats'}
    OUTPUT/weights.json      where the weights came from, what was loaded, skipped

Every variable of the model must come from the file with its exact shape, and every variable
of the file must map onto the model or be a known extra (optimiser slots, `global_step`, the
ImageNet classifier and its 1280-channel conv), else `WeightsMismatchError` lists every
difference. All sources expect images scaled to [-1, 1]: the import records
`model.preprocessing = 'zero_mean_unit_range'`.
"""

import json
import os
from typing import Callable, Dict, Optional

import ml_collections

from seg import checkpoint
from seg.config import default_config
from seg.preprocessing import ZERO_MEAN_UNIT_RANGE
from seg.weights import deeplab_tf, hf, keras
from seg.weights.mapping import (SourceWeights, check, infer_divisible_by, infer_width, is_backbone,
                                unflatten)

FORMATS = ('deeplab-tf', 'hf', 'keras')
WEIGHTS_FILE = 'weights.json'
READERS: Dict[str, Callable[[str], SourceWeights]] = {
    'deeplab-tf': deeplab_tf.read_deeplab_tf, 'hf': hf.read_hf, 'keras': keras.read_keras}


def import_weights(fmt: str, src: str, output: str,
                   config: Optional[ml_collections.ConfigDict] = None, log=print) -> Dict:
  """`main.py import-weights`: reads `src`, checks it, writes the workdir `output`.

  Without `config`, the defaults (`seg.config`) are used with the model fields the
  file states (width, classes, output stride for Hugging Face, head). With a
  config, its model must match the file exactly. Returns the weights.json
  record.
  """
  if fmt not in READERS:
    raise ValueError(f'--format must be one of {FORMATS}, got {fmt!r}')
  if os.path.exists(os.path.join(output, checkpoint.CONFIG_FILE)) or \
      os.path.exists(os.path.join(output, 'checkpoints')):
    raise FileExistsError(f'{output} already holds a workdir; choose a new --output')
  log(f'reading {fmt} weights from {src}')
  source = READERS[fmt](src)
  if config is None:
    config = default_config()
    width = infer_width(source)
    if width is not None:
      config.model.width = width
    for field in ('num_classes', 'output_stride', 'head'):
      if field in source.hints:
        config.model[field] = source.hints[field]
  else:
    config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy
  # The channel rounding is a property of the weights (TF-slim's 8, DeepLab's 1 at width
  # != 1): taken from the file's shapes, also over a given config.
  divisible_by = infer_divisible_by(source, config.model.width)
  if divisible_by is not None and divisible_by != config.model.divisible_by:
    log(f'model.divisible_by={divisible_by}: the file\'s channel counts are rounded to '
        f'multiples of {divisible_by}, not {config.model.divisible_by}')
    config.model.divisible_by = divisible_by
  config.model.preprocessing = ZERO_MEAN_UNIT_RANGE
  contents = check(source, config.model)

  checkpoint.save_config(output, config)
  manager = checkpoint.create_manager(output, keep=1)
  tree = unflatten(source.arrays)
  checkpoint.save_model_only(manager, 0, {'params': tree['params'],
                                          'batch_stats': tree['batch_stats']})
  manager.wait_until_finished()
  record = {
      'format': fmt, 'source': os.path.abspath(src), 'description': source.description,
      'contents': contents, 'preprocessing': ZERO_MEAN_UNIT_RANGE,
      'model': config.model.to_dict(),
      'loaded': {p: source.origins[p] for p in sorted(source.arrays)},
      'skipped': dict(sorted(source.skipped.items())),
      'ema_variables_used': source.hints.get('ema_variables_used', 0),
  }
  with open(os.path.join(output, WEIGHTS_FILE), 'w') as f:
    json.dump(record, f, indent=2)
  log(format_import_summary(record, output))
  return record


def format_import_summary(record: Dict, output: str) -> str:
  """The one-screen summary of an import."""
  loaded = record['loaded']
  backbone = sum(is_backbone(p) for p in loaded)
  reasons: Dict[str, int] = {}
  for reason in record['skipped'].values():
    reasons[reason] = reasons.get(reason, 0) + 1
  m = record['model']
  lines = [f'imported {record["description"]}',
           f'  model: width {m["width"]} (channels rounded to multiples of '
           f'{m["divisible_by"]}), {m["num_classes"]} classes, output stride '
           f'{m["output_stride"]}, head {m["head"]!r}, inputs {record["preprocessing"]} ([-1, 1])',
           f'  loaded {len(loaded)} variables: {backbone} backbone, {len(loaded) - backbone} head'
           + (' (backbone only: a head is initialised when training from it)'
              if record['contents'] == 'backbone' else '')]
  if record['ema_variables_used']:
    lines.append(f'  {record["ema_variables_used"]} values taken from ExponentialMovingAverage')
  lines += [f'  skipped {n}: {reason}' for reason, n in sorted(reasons.items())]
  lines.append(f'  wrote {output}: config.json, checkpoints/0, {WEIGHTS_FILE}')
  if record['contents'] == 'full':
    lines.append(f'  next: python main.py eval --workdir {output}')
  else:
    lines.append(f'  next: python main.py train --config ... --workdir RUN '
                 f'--config.train.init_from={output}')
  return '\n'.join(lines)


def read_record(workdir: str) -> Optional[Dict]:
  """weights.json of an imported workdir, or None for a workdir made by training."""
  path = os.path.join(workdir, WEIGHTS_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)
