"""Training initialisation from a workdir (`config.train.init_from`): imported or trained weights."""

from typing import Any, Dict

import jax
import numpy as np

from seg import checkpoint
from seg.weights.mapping import (WeightsMismatchError, differences, flatten, is_backbone,
                                 model_line, unflatten)

INIT_PARTS = ('auto', 'all', 'all_but_logits', 'backbone')


def _is_logits(path: str) -> bool:
  """'params/head/logits/...': the last layer, whose shape is the number of classes."""
  parts = path.split('/')
  return len(parts) > 2 and parts[1:3] == ['head', 'logits']


def init_from_workdir(config, variables: Dict[str, Any], log=print) -> Dict[str, Any]:
  """Initial variables for training from `config.train.init_from` (a workdir).

  `config.train.init_part`: 'all' loads the whole network (every variable
  must match); 'all_but_logits' everything but the last layer (DeepLab's
  `initialize_last_layer=False`, for a dataset with other classes: the rest of
  the head must match); 'backbone' loads MobileNetV2 and keeps the fresh head of
  `variables`; 'auto' loads everything when the workdir's head fits the config,
  all but the logits when only the classes differ, else the backbone only. The
  backbone must always match exactly.

  Args:
    variables: freshly initialised {'params', 'batch_stats'} of the config's model.

  Returns:
    {'params', 'batch_stats'} with the loaded parts replaced.
  """
  src, part = config.train.init_from, config.train.init_part
  if part not in INIT_PARTS:
    raise ValueError(f'train.init_part must be one of {INIT_PARTS}, got {part!r}')
  src_config = checkpoint.load_config(src)
  wanted = config.model.preprocessing
  found = src_config.model.preprocessing
  if wanted != found:
    raise WeightsMismatchError(f'{src} expects {found!r} inputs, the config {wanted!r}')
  loaded = flatten(checkpoint.load_raw_model_variables(src))
  ours = flatten(variables)
  shapes = {p: tuple(v.shape) for p, v in ours.items()}
  backbone_lines = differences({p: s for p, s in shapes.items() if is_backbone(p)},
                               {p: v for p, v in loaded.items() if is_backbone(p)})
  if backbone_lines:
    raise WeightsMismatchError(f'the backbone of {src} does not fit the model '
                               f'({model_line(config.model)}):\n' + '\n'.join(backbone_lines))

  def head_differences(keep):
    return differences({p: s for p, s in shapes.items() if keep(p)},
                       {p: v for p, v in loaded.items() if keep(p)})
  head_lines = head_differences(lambda p: not is_backbone(p))
  body_lines = head_differences(lambda p: not is_backbone(p) and not _is_logits(p))
  head_loaded = any(not is_backbone(p) for p in loaded)
  strict = {'all': head_lines, 'all_but_logits': body_lines}
  if strict.get(part):
    what = 'the head' if part == 'all' else 'the head below its logits layer'
    raise WeightsMismatchError(
        f'train.init_part={part} but {what} of {src} does not fit the model '
        f'({model_line(config.model)}); use train.init_part=backbone to initialise a new '
        'head:\n' + '\n'.join(strict[part]))
  if part == 'backbone' or (part == 'auto' and (not head_loaded or body_lines)):
    load = is_backbone
  elif part == 'all_but_logits' or head_lines:
    load = lambda p: not _is_logits(p)
  else:
    load = lambda p: True
  merged = {p: (np.asarray(loaded[p]) if load(p) else v) for p, v in ours.items()}
  fresh = sum(not load(p) for p in ours)
  if not fresh:
    log(f'initialised from {src}: whole network ({len(ours)} variables)')
  elif load is is_backbone:
    why = ('train.init_part=backbone' if part == 'backbone' else
           'it has no head' if not head_loaded else
           f'its head differs ({src_config.model.num_classes} classes, head '
           f'{src_config.model.head!r}; the config: {config.model.num_classes}, '
           f'{config.model.head!r})')
    log(f'initialised from {src}: backbone ({len(ours) - fresh} variables) loaded, head '
        f'({fresh} variables) freshly initialised because {why}')
  else:
    why = ('train.init_part=all_but_logits' if part == 'all_but_logits' else
           f'its classes differ ({src_config.model.num_classes}; the config: '
           f'{config.model.num_classes})')
    log(f'initialised from {src}: all but the logits layer ({len(ours) - fresh} variables) '
        f'loaded, the logits ({fresh} variables) freshly initialised because {why}, as '
        'DeepLab\'s initialize_last_layer=False')
  return jax.tree_util.tree_map(np.asarray, unflatten(merged))
