"""A weights file renamed onto this project's variables, and checked against a model.

Every reader (`deeplab_tf.py`, `hf.py`, `keras.py`) returns a `SourceWeights`: arrays in Flax
layout under this project's variable paths ('params/MobilenetV2/Conv/conv/kernel', which are
DeepLab's names, see `seg.model`), the file's own name of each, and what it skips. `check`
compares them with the model of a config; nothing is ever loaded in part: every difference is
listed in one `WeightsMismatchError`. docs/weights.md explains how each source differs from
DeepLab.
"""

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from seg import checkpoint
from seg.model import (BACKBONE_SCOPE, DIVISIBLE_BY, block_specs, create_model, make_divisible,
                       stem_channels)

# Width multipliers of the published MobileNetV2 checkpoints, tried in order when a file
# does not state its own; the channel count of the last block tells them apart.
KNOWN_WIDTHS = (1.0, 0.5, 0.35, 0.75, 1.3, 1.4)
NUM_BLOCKS = 17  # expanded_conv, expanded_conv_1 .. expanded_conv_16


class WeightsMismatchError(ValueError):
  """A weights file and a model disagree; the message lists every difference."""


@dataclasses.dataclass
class SourceWeights:
  """A weights file, renamed onto this project's variables.

  `arrays` maps 'params/MobilenetV2/Conv/conv/kernel'-style paths to arrays in
  Flax layout; `origins` gives the file's own name of each; `skipped` maps the
  file's known extras to why they are not used; `unknown` lists what neither
  maps nor is known. `hints` holds model fields the file states or implies.
  """
  description: str
  arrays: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  origins: Dict[str, str] = dataclasses.field(default_factory=dict)
  skipped: Dict[str, str] = dataclasses.field(default_factory=dict)
  unknown: List[str] = dataclasses.field(default_factory=list)
  hints: Dict[str, Any] = dataclasses.field(default_factory=dict)
  problems: List[str] = dataclasses.field(default_factory=list)

  def add(self, path: Optional[str], array: np.ndarray, origin: str) -> None:
    if path is None:
      self.unknown.append(origin)
    elif path in self.arrays:
      self.problems.append(f'{origin} and {self.origins[path]} both map to {path}')
    else:
      self.arrays[path] = np.asarray(array, np.float32)
      self.origins[path] = origin

  @property
  def has_head(self) -> bool:
    return any(p.split('/')[1] == 'head' for p in self.arrays)


def variable_path(module: Tuple[str, ...], leaf: str, collection: str) -> str:
  return '/'.join((collection,) + module + (leaf,))


def block_name(index: int) -> str:
  return 'expanded_conv' if index == 0 else f'expanded_conv_{index}'


def flatten(tree: Dict[str, Any], prefix: str = '') -> Dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x}."""
  flat = {}
  for key, value in tree.items():
    path = f'{prefix}/{key}' if prefix else key
    if isinstance(value, dict) or hasattr(value, 'items') and not hasattr(value, 'shape'):
      flat.update(flatten(dict(value), path))
    else:
      flat[path] = value
  return flat


def unflatten(flat: Dict[str, Any]) -> Dict[str, Any]:
  """{'a/b': x} -> {'a': {'b': x}}."""
  tree: Dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split('/')
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return tree


def is_backbone(path: str) -> bool:
  """'params/MobilenetV2/...' or 'batch_stats/MobilenetV2/...'."""
  return path.split('/')[1] == BACKBONE_SCOPE


def expected_shapes(model_config, backbone_only: bool = False) -> Dict[str, Tuple[int, ...]]:
  """Every variable path of the model of `model_config` -> its shape."""
  shapes = checkpoint.abstract_variables(create_model(model_config))
  flat = {p: tuple(v.shape) for p, v in flatten(shapes).items()}
  return {p: s for p, s in flat.items() if is_backbone(p) or not backbone_only}


def differences(expected: Dict[str, Tuple[int, ...]], arrays: Dict[str, Any],
                origins: Optional[Dict[str, str]] = None) -> List[str]:
  """Lines naming every missing, unexpected and mis-shaped variable (empty if they agree)."""
  origins = origins or {}
  name = lambda p: f'{p} ({origins[p]})' if p in origins else p
  shaped = [f'  {name(p)}: file {tuple(arrays[p].shape)}, model {expected[p]}'
            for p in sorted(expected) if p in arrays and tuple(arrays[p].shape) != expected[p]]
  missing = [f'  {p}' for p in sorted(expected) if p not in arrays]
  extra = [f'  {name(p)}' for p in sorted(arrays) if p not in expected]
  lines = []
  for title, items in (('mis-shaped', shaped), ('missing from the file', missing),
                       ('in the file but not in the model', extra)):
    if items:
      lines += [f'{title} ({len(items)}):'] + items
  return lines


def model_line(model_config) -> str:
  return (f'width {model_config.width}, channels rounded to multiples of '
          f'{model_config.divisible_by}, {model_config.num_classes} classes, '
          f'head {model_config.head!r}')


def infer_width(source: SourceWeights) -> Optional[float]:
  """The known width multiplier whose last block has the file's channel count."""
  if 'width' in source.hints:
    return source.hints['width']
  last_block = f'params/{BACKBONE_SCOPE}/{block_name(NUM_BLOCKS - 1)}'
  last = source.arrays.get(f'{last_block}/project/conv/kernel')
  if last is None:
    return None
  for width in KNOWN_WIDTHS:
    if make_divisible(320 * width) == last.shape[-1]:
      return width
  return None


def channel_table(width: float, divisible_by: int) -> List[Tuple[int, int]]:
  """(input, output) channels of the stem and of each block's expansion and projection."""
  stem = stem_channels(width, divisible_by)
  table, channels = [(3, stem)], stem
  for expanded, out, _, _ in block_specs(width, 16, divisible_by):
    if expanded > channels:
      table.append((channels, expanded))
    table.append((expanded, out))
    channels = out
  return table


def file_channel_table(source: SourceWeights) -> Optional[List[Tuple[int, int]]]:
  """The same table read from the file's kernels (None if one of them is missing)."""
  kernel = lambda scope: source.arrays.get(f'params/{BACKBONE_SCOPE}/{scope}/conv/kernel')
  kernels = [kernel('Conv')]
  for i in range(NUM_BLOCKS):
    if kernel(f'{block_name(i)}/expand') is not None:
      kernels.append(kernel(f'{block_name(i)}/expand'))
    kernels.append(kernel(f'{block_name(i)}/project'))
  if any(k is None for k in kernels):
    return None
  return [tuple(int(n) for n in k.shape[-2:]) for k in kernels]


def infer_divisible_by(source: SourceWeights, width: float) -> Optional[int]:
  """The channel rounding (`model.divisible_by`) whose table at `width` the file has.

  TF-slim's ImageNet checkpoints round to multiples of 8, DeepLab's own models of width != 1
  to multiples of 1 (seg/model/mobilenet_v2.py); at width 1.0 both give the same table
  (then 8). None when neither fits (the shape check then names the layers).
  """
  table = file_channel_table(source)
  if table is None:
    return None
  for divisible_by in DIVISIBLE_BY:
    if channel_table(width, divisible_by) == table:
      return divisible_by
  return None


def check(source: SourceWeights, model_config) -> str:
  """'full' or 'backbone' if `source` fits the model; raises listing every difference."""
  contents = 'full' if source.has_head else 'backbone'
  lines = list(source.problems)
  if source.unknown:
    lines += [f'not variables of this network ({len(source.unknown)}):']
    lines += [f'  {n}' for n in source.unknown]
  lines += differences(expected_shapes(model_config, contents == 'backbone'),
                       source.arrays, source.origins)
  if lines:
    raise WeightsMismatchError(
        f'{source.description} does not fit the model ({model_line(model_config)}'
        f'{", backbone only" if contents == "backbone" else ""}):\n' + '\n'.join(lines))
  return contents
