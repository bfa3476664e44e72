"""keras: `keras.applications.MobileNetV2` weights, legacy `.h5` (the files keras.applications
downloads, layers by name) or Keras 3 `.weights.h5` (layers stored by class and creation order,
mapped back through the network's fixed layer order). Backbone only.
"""

import os
import re
from typing import Dict, List, Optional, Tuple

import numpy as np

from seg.model import BACKBONE_SCOPE
from seg.weights.mapping import (NUM_BLOCKS, SourceWeights, WeightsMismatchError, block_name,
                                 variable_path)

_KERAS_BN = {'gamma': ('params', 'scale'), 'beta': ('params', 'bias'),
             'moving_mean': ('batch_stats', 'mean'), 'moving_variance': ('batch_stats', 'var')}
_KERAS_VARS = {'Conv2D': ('kernel', 'bias'), 'DepthwiseConv2D': ('kernel', 'bias'),
               'BatchNormalization': ('gamma', 'beta', 'moving_mean', 'moving_variance'),
               'Dense': ('kernel', 'bias')}


def keras_layer_order(include_top: bool = False) -> List[Tuple[str, str]]:
  """(name, class) of keras MobileNetV2's layers with weights, in creation order."""
  layers = [('Conv1', 'Conv2D'), ('bn_Conv1', 'BatchNormalization')]
  for i in range(NUM_BLOCKS):
    prefix = 'expanded_conv_' if i == 0 else f'block_{i}_'
    if i:
      layers += [(prefix + 'expand', 'Conv2D'), (prefix + 'expand_BN', 'BatchNormalization')]
    layers += [(prefix + 'depthwise', 'DepthwiseConv2D'),
               (prefix + 'depthwise_BN', 'BatchNormalization'),
               (prefix + 'project', 'Conv2D'), (prefix + 'project_BN', 'BatchNormalization')]
  layers += [('Conv_1', 'Conv2D'), ('Conv_1_bn', 'BatchNormalization')]
  if include_top:
    layers.append(('predictions', 'Dense'))
  return layers


def _keras_variable(layer: str, var: str, value: np.ndarray):
  """Maps one keras layer variable; (None, None) if it is not a model variable."""
  if layer in ('Conv1', 'bn_Conv1'):
    scope = (BACKBONE_SCOPE, 'Conv')
    kind = 'bn' if layer.startswith('bn_') else 'conv'
  else:
    m = re.match(r'^(?:expanded_conv_|block_(\d+)_)(expand|depthwise|project)(_BN)?$', layer)
    if not m or (m.group(1) is None and m.group(2) == 'expand'):
      return None, None
    scope = (BACKBONE_SCOPE, block_name(int(m.group(1) or 0)), m.group(2))
    kind = 'bn' if m.group(3) else m.group(2)
  if kind == 'bn':
    if var not in _KERAS_BN:
      return None, None
    collection, name = _KERAS_BN[var]
    return variable_path(scope + ('BatchNorm',), name, collection), value
  if var != 'kernel':
    return None, None
  if kind == 'depthwise':  # [kh, kw, channels, 1] -> [kh, kw, 1, channels]
    return variable_path(scope + ('depthwise',), 'kernel', 'params'), value.transpose(0, 1, 3, 2)
  return variable_path(scope + ('conv',), 'kernel', 'params'), value


def _keras_skip_reason(layer: str) -> Optional[str]:
  if layer in ('Conv_1', 'Conv_1_bn'):
    return '1280-channel conv of the ImageNet classifier, not part of DeepLab'
  if layer == 'predictions':
    return 'ImageNet classifier'
  return None


def _read_keras_legacy(f) -> List[Tuple[str, str, np.ndarray]]:
  """(layer, variable, value) from a Keras 2 / legacy HDF5 weights file."""
  group = f['model_weights'] if 'model_weights' in f else f  # whole-model .h5 files
  found = []
  for layer in group.attrs['layer_names']:
    layer = layer.decode() if isinstance(layer, bytes) else layer
    for weight in group[layer].attrs.get('weight_names', []):
      weight = weight.decode() if isinstance(weight, bytes) else weight
      var = weight.split('/')[-1].split(':')[0]
      found.append((layer, var, np.asarray(group[layer][weight])))
  return found


def _read_keras3(f) -> List[Tuple[str, str, np.ndarray]]:
  """(layer, variable, value) from a Keras 3 `.weights.h5` of keras.applications.MobileNetV2.

  Keras 3 stores layers under generated names (`conv2d_3`, `batch_normalization_7`):
  the n-th layer of each class, in creation order, which is fixed for this network.
  """
  layers = f['layers']
  by_class: Dict[str, List[Tuple[int, str]]] = {}
  for name in layers:
    if 'vars' not in layers[name] or not len(layers[name]['vars']):
      continue
    m = re.match(r'^([a-z_0-9]+?)(?:_(\d+))?$', name)
    by_class.setdefault(m.group(1), []).append((int(m.group(2) or 0), name))
  stored = {cls: [n for _, n in sorted(items)] for cls, items in by_class.items()}
  include_top = 'dense' in stored
  snake = {'Conv2D': 'conv2d', 'DepthwiseConv2D': 'depthwise_conv2d',
           'BatchNormalization': 'batch_normalization', 'Dense': 'dense'}
  expected: Dict[str, List[Tuple[str, str]]] = {}
  for layer, cls in keras_layer_order(include_top):
    expected.setdefault(snake[cls], []).append((layer, cls))
  if {c: len(v) for c, v in stored.items()} != {c: len(v) for c, v in expected.items()}:
    raise WeightsMismatchError(
        'this .weights.h5 does not hold keras.applications.MobileNetV2 weights: layers per class '
        f'{ {c: len(v) for c, v in stored.items()} }, expected '
        f'{ {c: len(v) for c, v in expected.items()} }')
  found = []
  for cls, names in stored.items():
    for stored_name, (layer, layer_cls) in zip(names, expected[cls]):
      group = layers[stored_name]['vars']
      values = [np.asarray(group[str(i)]) for i in range(len(group))]
      for var, value in zip(_KERAS_VARS[layer_cls], values):
        found.append((layer, var, value))
  return found


def read_keras(path: str) -> SourceWeights:
  """keras.applications.MobileNetV2 weights: legacy `.h5` or Keras 3 `.weights.h5`."""
  import h5py  # conversion only
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} not found: give a keras .h5 or .weights.h5 file')
  source = SourceWeights(f'Keras MobileNetV2 weights {path}')
  with h5py.File(path, 'r') as f:
    found = _read_keras3(f) if 'layers' in f and 'layer_names' not in f.attrs \
        else _read_keras_legacy(f)
  for layer, var, value in found:
    origin = f'{layer}/{var}'
    reason = _keras_skip_reason(layer)
    if reason:
      source.skipped[origin] = reason
      continue
    flax_path, value = _keras_variable(layer, var, value)
    source.add(flax_path, value, origin)
  return source
