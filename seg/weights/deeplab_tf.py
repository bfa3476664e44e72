"""deeplab-tf: TF1 checkpoints of DeepLab and TF-slim's ImageNet MobileNetV2.

DeepLab's names (`MobilenetV2/Conv/weights`, `MobilenetV2/expanded_conv_N/{expand,depthwise,
project}/...`, `image_pooling`, `aspp0`, `concat_projection`, `logits/semantic/{weights,
biases}`) and TF-slim ImageNet `mobilenet_v2_<width>_224` (backbone only). Kernels are HWIO as
here; depthwise kernels are [kh, kw, channels, 1] and get transposed.
`NAME/ExponentialMovingAverage` replaces `NAME` where present (TF-slim evaluates with the
moving averages). Read with TensorFlow's checkpoint reader (`seg.data.tf_checkpoint`), behind
the data layer. Dense atrous ASPP branches (`aspp1/weights` ...) map onto head 'aspp';
DeepLab's separable ones and its decoder have no counterpart and are reported as not
variables of this network.
"""

import re
from typing import Optional, Tuple

import numpy as np

from seg.model import BACKBONE_SCOPE
from seg.weights.mapping import SourceWeights, variable_path

OPTIMIZER_SLOTS = ('Momentum', 'RMSProp', 'RMSProp_1', 'Adam', 'Adam_1')
EMA_SUFFIX = '/ExponentialMovingAverage'
_BN_TF = {'gamma': ('params', 'scale'), 'beta': ('params', 'bias'),
          'moving_mean': ('batch_stats', 'mean'), 'moving_variance': ('batch_stats', 'var')}

_TF_BACKBONE = re.compile(
    r'^MobilenetV2/(Conv|expanded_conv(?:_\d+)?/(?:expand|depthwise|project))/(.+)$')
_TF_HEAD = re.compile(r'^(image_pooling|aspp\d|concat_projection)/(.+)$')


def _tf_layer(scope: Tuple[str, ...], leaf: str, value: np.ndarray):
  """(path, Flax-layout array) of one TF-slim conv/BatchNorm variable, or (None, None)."""
  if leaf == 'weights':
    return variable_path(scope + ('conv',), 'kernel', 'params'), value
  if leaf == 'depthwise_weights':  # [kh, kw, channels, 1] -> [kh, kw, 1, channels]
    return variable_path(scope + ('depthwise',), 'kernel', 'params'), value.transpose(0, 1, 3, 2)
  parts = leaf.split('/')
  if len(parts) == 2 and parts[0] == 'BatchNorm' and parts[1] in _BN_TF:
    collection, name = _BN_TF[parts[1]]
    return variable_path(scope + ('BatchNorm',), name, collection), value
  return None, None


def _tf_variable(name: str, value: np.ndarray):
  """Maps one DeepLab/TF-slim variable name; (None, None) if it is not a model variable."""
  m = _TF_BACKBONE.match(name)
  if m:
    return _tf_layer((BACKBONE_SCOPE,) + tuple(m.group(1).split('/')), m.group(2), value)
  m = _TF_HEAD.match(name)
  if m:
    return _tf_layer(('head', m.group(1)), m.group(2), value)
  if name == 'logits/semantic/weights':
    return 'params/head/logits/kernel', value
  if name == 'logits/semantic/biases':
    return 'params/head/logits/bias', value
  return None, None


def _tf_skip_reason(name: str) -> Optional[str]:
  if name == 'global_step':
    return 'training step counter'
  if name.split('/')[-1] in OPTIMIZER_SLOTS:
    return 'optimiser slot'
  if name.startswith(('MobilenetV2/Conv_1/', 'MobilenetV2/Logits/')):
    return 'ImageNet classifier (1280-channel conv and logits), not part of DeepLab'
  return None


def read_deeplab_tf(path: str) -> SourceWeights:
  """A DeepLab or TF-slim MobileNetV2 TF1 checkpoint, EMA values preferred."""
  from seg.data import tf_checkpoint  # TensorFlow's reader, behind the data layer
  prefix = tf_checkpoint.resolve_prefix(path)
  reader = tf_checkpoint.load(prefix)
  names = sorted(reader.get_variable_to_shape_map())
  source = SourceWeights(f'TF checkpoint {prefix}')
  present = set(names)
  used_ema = 0
  for name in names:
    if name.endswith(EMA_SUFFIX) and name[:-len(EMA_SUFFIX)] in present:
      continue  # read in place of its variable below
    if name.endswith(EMA_SUFFIX):
      base = name[:-len(EMA_SUFFIX)]  # an average without its variable: still the value
    else:
      base = name
    reason = _tf_skip_reason(base)
    if reason:
      source.skipped[name] = reason
      if base + EMA_SUFFIX in present and name != base + EMA_SUFFIX:
        source.skipped[base + EMA_SUFFIX] = reason
      continue
    ema = base + EMA_SUFFIX
    read = ema if ema in present else name
    if read == ema and name != ema:
      source.skipped[name] = 'replaced by its ExponentialMovingAverage'
      used_ema += 1
    flax_path, value = _tf_variable(base, reader.get_tensor(read))
    source.add(flax_path, value, read)
  source.hints['ema_variables_used'] = used_ema
  logits = source.arrays.get('params/head/logits/bias')
  if logits is not None:
    source.hints['num_classes'] = int(logits.shape[0])
  if any(p.startswith('params/head/aspp1/') for p in source.arrays):
    source.hints['head'] = 'aspp'
  return source
