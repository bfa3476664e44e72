"""Training initialisation from a workdir (`config.train.init_from`): imported or trained weights."""

from typing import Any, Dict

import jax
import numpy as np

from seg import checkpoint
from seg.weights.mapping import (WeightsMismatchError, differences, flatten, is_backbone,
                                 model_line, unflatten)

INIT_PARTS = ('auto', 'all', 'backbone')


def init_from_workdir(config, variables: Dict[str, Any], log=print) -> Dict[str, Any]:
  """Initial variables for training from `config.train.init_from` (a workdir).

  `config.train.init_part`: 'all' loads the whole network (every variable
  must match); 'backbone' loads MobileNetV2 and keeps the fresh head of
  `variables`; 'auto' loads everything when the workdir's head fits the
  config (same classes and head type), else the backbone only. The backbone
  must always match exactly.

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
  head_shapes = {p: s for p, s in shapes.items() if not is_backbone(p)}
  head_loaded = {p: v for p, v in loaded.items() if not is_backbone(p)}
  head_lines = differences(head_shapes, head_loaded)
  if part == 'all' and head_lines:
    raise WeightsMismatchError(
        f'train.init_part=all but the head of {src} does not fit the model '
        f'({model_line(config.model)}); use train.init_part=backbone to initialise a new '
        'head:\n' + '\n'.join(head_lines))
  load_head = part != 'backbone' and not head_lines
  merged = {p: (np.asarray(loaded[p]) if is_backbone(p) or load_head else v)
            for p, v in ours.items()}
  num_backbone = sum(is_backbone(p) for p in ours)
  if load_head:
    log(f'initialised from {src}: whole network ({len(ours)} variables)')
  else:
    why = ('train.init_part=backbone' if part == 'backbone' else
           'it has no head' if not head_loaded else
           f'its head differs ({src_config.model.num_classes} classes, head '
           f'{src_config.model.head!r}; the config: {config.model.num_classes}, '
           f'{config.model.head!r})')
    log(f'initialised from {src}: backbone ({num_backbone} variables) loaded, head '
        f'({len(ours) - num_backbone} variables) freshly initialised because {why}')
  return jax.tree_util.tree_map(np.asarray, unflatten(merged))
