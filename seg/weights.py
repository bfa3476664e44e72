"""Pretrained weights: TensorFlow DeepLab / TF-slim, Hugging Face and Keras MobileNetV2.

`import_weights` reads a checkpoint in one of `FORMATS`, renames and
transposes every variable onto this project's Flax names (which are DeepLab's,
see `seg.model`), checks the result against the model of a config and writes a
workdir that `eval` and `predict` use directly and that `train` accepts as
initialisation (`config.train.init_from`, see `init_from_workdir`):

    OUTPUT/config.json       the config (model fields taken from the file)
    OUTPUT/checkpoints/0/    orbax, item 'model' = {'params', 'batch_stats'}
    OUTPUT/weights.json      where the weights came from, what was loaded, skipped

Nothing is loaded silently in part: every variable of the model must come from
the file with its exact shape, and every variable of the file must either map
onto the model or be one of the known extras listed as skipped (optimiser
slots, `global_step`, the ImageNet classifier and its 1280-channel conv).
Anything else raises `WeightsMismatchError`, which lists every difference.

Sources and their layouts:
- deeplab-tf: TF1 checkpoints of DeepLab (`MobilenetV2/Conv/weights`,
  `MobilenetV2/expanded_conv_N/{expand,depthwise,project}/...`, `image_pooling`,
  `aspp0`, `concat_projection`, `logits/semantic/{weights,biases}`) and TF-slim
  ImageNet `mobilenet_v2_<width>_224` (backbone only). Kernels are HWIO as
  here; depthwise kernels are [kh, kw, channels, 1] and get transposed.
  `NAME/ExponentialMovingAverage` replaces `NAME` where present (TF-slim
  evaluates with the moving averages). Read with TensorFlow's checkpoint
  reader (`seg/data/tf_checkpoint.py`), behind the data layer. Dense atrous ASPP branches
  (`aspp1/weights`...) map onto head 'aspp'; DeepLab's separable ones
  (`aspp1_depthwise`, `aspp1_pointwise`) and its decoder have no counterpart
  here and are reported as not variables of this network.
- hf: transformers' `MobileNetV2ForSemanticSegmentation`, `MobileNetV2Model`
  and `MobileNetV2ForImageClassification` (`model.safetensors` or
  `pytorch_model.bin`, the latter needs PyTorch), with their config.json.
  Kernels are OIHW. The backbone of the image classifiers only.
- keras: `keras.applications.MobileNetV2` weights, legacy `.h5` (the files
  keras.applications downloads, layers by name) or Keras 3 `.weights.h5`
  (layers stored by class and creation order, mapped back through the
  network's fixed layer order). Backbone only.

All three sources expect images scaled to [-1, 1] (DeepLab's
`_preprocess_zero_mean_unit_range`, transformers' image processor with mean
and std 0.5, `keras.applications.mobilenet_v2.preprocess_input`): the import
records `model.preprocessing = 'zero_mean_unit_range'` in config.json, and
`seg.model.create_model` refuses any convention it does not implement.

How the Hugging Face port differs from DeepLab (transformers 5.24.0,
`models/mobilenet_v2/modeling_mobilenet_v2.py`), and what it means here:
- Its backbone also computes MobileNetV2's final 1x1 conv to 1280 channels
  (`conv_1x1`) that the segmentation head never reads (it takes
  `hidden_states[-1]`, the 320-channel block output). DeepLab has no such
  layer; its weights are skipped.
- Padding: with `tf_padding=True` (the default, and the hub models') it pads
  explicitly as TF 'SAME' does, for strided and dilated layers alike, so it
  equals ours at every input size. `tf_padding=False` (symmetric PyTorch
  padding) differs at stride 2 and is refused.
- Image pooling: `AdaptiveAvgPool2d(1)`, a global mean, then an
  aligned-corner resize of a 1x1 map (a broadcast) - as here, at every input
  size. DeepLab's own graph instead average-pools with a fixed window of
  `crop_size / output_stride` (33x33 for 513 at OS16) and resizes to that
  size; the two agree when the input is the crop size, which is why `eval`
  pads every image to `eval_size` (513) as DeepLab's eval.py does.
- Depth rounding: `make_divisible(round(c * multiplier))` rounds the product
  first; TF-slim and this project round `c * multiplier` itself. The channel
  counts agree for the published multipliers (0.35 to 1.4); the shape check
  would name any layer where they do not.
- BatchNorm: epsilon 1e-3 in the backbone and 1e-5 in the head, as DeepLab;
  the momentum is 0.997 in PyTorch's convention (new = 0.003 * old + 0.997 *
  batch), i.e. TF's decay written into PyTorch's opposite convention. It only
  matters when training there; the statistics stored are used as they are.
- The head is DeepLab's reduced one (image pooling + 1x1, no atrous branches,
  no decoder), with `Dropout2d` (whole channels) where DeepLab drops single
  activations; and its training loss upsamples logits without aligned corners.
  Neither changes inference. Logits come out at the feature resolution.
- The hub checkpoint google/deeplabv3_mobilenet_v2_1.0_513 is configured
  with output_stride 8, the setting of DeepLab's model zoo for its
  multi-scale test results; weights do not depend on the output stride.

Keras MobileNetV2 differs from TF-slim in three ways that matter here: channel
counts are rounded after truncating `int(c * alpha)` (same counts for the
published alphas), its stride-2 depthwise layers pad with `ZeroPadding2D`
(`correct_pad`) and a 'valid' convolution, which equals 'SAME' whenever the
model's input size is fixed - but a model built with an unknown input size
pads (0, 1) always, one pixel off from 'SAME' for odd sizes; and BatchNorm
momentum 0.999 (training only).
"""

import dataclasses
import json
import os
import re
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import ml_collections
import numpy as np

from seg import checkpoint
from seg.model import BACKBONE_SCOPE, DEFAULT_PREPROCESSING, create_model, make_divisible

FORMATS = ('deeplab-tf', 'hf', 'keras')
WEIGHTS_FILE = 'weights.json'
INIT_PARTS = ('auto', 'all', 'backbone')
# Width multipliers of the published MobileNetV2 checkpoints, tried in order when a file
# does not state its own; the channel count of the last block tells them apart.
KNOWN_WIDTHS = (1.0, 0.5, 0.35, 0.75, 1.3, 1.4)
OPTIMIZER_SLOTS = ('Momentum', 'RMSProp', 'RMSProp_1', 'Adam', 'Adam_1')
EMA_SUFFIX = '/ExponentialMovingAverage'
NUM_BLOCKS = 17  # expanded_conv, expanded_conv_1 .. expanded_conv_16

_BN_TF = {'gamma': ('params', 'scale'), 'beta': ('params', 'bias'),
          'moving_mean': ('batch_stats', 'mean'), 'moving_variance': ('batch_stats', 'var')}
_BN_HF = {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
          'running_mean': ('batch_stats', 'mean'), 'running_var': ('batch_stats', 'var')}
_HEAD_SCOPES = ('image_pooling', 'aspp0', 'aspp1', 'aspp2', 'aspp3', 'concat_projection')


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


def _variable_path(module: Tuple[str, ...], leaf: str, collection: str) -> str:
  return '/'.join((collection,) + module + (leaf,))


def _block_name(index: int) -> str:
  return 'expanded_conv' if index == 0 else f'expanded_conv_{index}'


# ---------------------------------------------------------------------------------------------
# deeplab-tf: TF1 checkpoints of DeepLab and TF-slim.

_TF_BACKBONE = re.compile(
    r'^MobilenetV2/(Conv|expanded_conv(?:_\d+)?/(?:expand|depthwise|project))/(.+)$')
_TF_HEAD = re.compile(r'^(image_pooling|aspp\d|concat_projection)/(.+)$')


def _tf_layer(scope: Tuple[str, ...], leaf: str, value: np.ndarray):
  """(path, Flax-layout array) of one TF-slim conv/BatchNorm variable, or (None, None)."""
  if leaf == 'weights':
    return _variable_path(scope + ('conv',), 'kernel', 'params'), value
  if leaf == 'depthwise_weights':  # [kh, kw, channels, 1] -> [kh, kw, 1, channels]
    return _variable_path(scope + ('depthwise',), 'kernel', 'params'), value.transpose(0, 1, 3, 2)
  parts = leaf.split('/')
  if len(parts) == 2 and parts[0] == 'BatchNorm' and parts[1] in _BN_TF:
    collection, name = _BN_TF[parts[1]]
    return _variable_path(scope + ('BatchNorm',), name, collection), value
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


# ---------------------------------------------------------------------------------------------
# hf: transformers' MobileNetV2 models.

# transformers' config fields that change the architecture, and the values DeepLab's has.
HF_REQUIRED = {'model_type': 'mobilenet_v2', 'tf_padding': True, 'hidden_act': 'relu6',
               'first_layer_is_expansion': True, 'expand_ratio': 6.0,
               'depth_divisible_by': 8, 'min_depth': 8, 'layer_norm_eps': 0.001,
               'num_channels': 3}
_HF_HEAD = {'conv_pool': 'image_pooling', 'conv_aspp': 'aspp0',
            'conv_projection': 'concat_projection'}
_HF_STEM = {'first_conv': ('Conv',), 'conv_3x3': ('expanded_conv', 'depthwise'),
            'reduce_1x1': ('expanded_conv', 'project')}
_HF_BLOCK = {'expand_1x1': 'expand', 'conv_3x3': 'depthwise', 'reduce_1x1': 'project'}


def _hf_variable(key: str, value: np.ndarray):
  """Maps one transformers state-dict key; (None, None) if it is not a model variable."""
  parts = key.split('.')
  if parts[0] == 'mobilenet_v2':
    parts = parts[1:]
  if parts[:2] == ['segmentation_head', 'classifier'] and parts[2] == 'convolution':
    if parts[3:] == ['weight']:
      return 'params/head/logits/kernel', value.transpose(2, 3, 1, 0)
    if parts[3:] == ['bias']:
      return 'params/head/logits/bias', value
    return None, None
  if parts[0] == 'conv_stem' and parts[1] in _HF_STEM:
    scope, rest = (BACKBONE_SCOPE,) + _HF_STEM[parts[1]], parts[2:]
  elif parts[0] == 'layer' and len(parts) > 2 and parts[2] in _HF_BLOCK:
    scope = (BACKBONE_SCOPE, _block_name(int(parts[1]) + 1), _HF_BLOCK[parts[2]])
    rest = parts[3:]
  elif parts[0] == 'segmentation_head' and parts[1] in _HF_HEAD:
    scope, rest = ('head', _HF_HEAD[parts[1]]), parts[2:]
  else:
    return None, None
  if rest == ['convolution', 'weight']:  # OIHW (depthwise: [C, 1, kh, kw]) -> HWIO
    leaf = 'depthwise' if scope[-1] == 'depthwise' else 'conv'
    return _variable_path(scope + (leaf,), 'kernel', 'params'), value.transpose(2, 3, 1, 0)
  if len(rest) == 2 and rest[0] == 'normalization' and rest[1] in _BN_HF:
    collection, name = _BN_HF[rest[1]]
    return _variable_path(scope + ('BatchNorm',), name, collection), value
  return None, None


def _hf_skip_reason(key: str) -> Optional[str]:
  parts = key.split('.')
  if parts[-1] == 'num_batches_tracked':
    return 'BatchNorm step counter'
  if parts[0] == 'mobilenet_v2':
    parts = parts[1:]
  if parts[0] == 'conv_1x1':
    return '1280-channel conv of the ImageNet classifier, unused by the segmentation head'
  if parts[0] == 'classifier':
    return 'ImageNet classifier'
  return None


def _read_state_dict(folder: str) -> Tuple[str, Dict[str, np.ndarray]]:
  safetensors = os.path.join(folder, 'model.safetensors')
  if os.path.exists(safetensors):
    from safetensors.numpy import load_file
    return safetensors, load_file(safetensors)
  binary = os.path.join(folder, 'pytorch_model.bin')
  if os.path.exists(binary):
    try:
      import torch  # only for this file format
    except ImportError as e:
      raise ImportError(f'{binary} is a PyTorch pickle: reading it needs torch '
                        f'(pip install torch==2.13.0), or convert it to model.safetensors') from e
    state = torch.load(binary, map_location='cpu', weights_only=True)
    return binary, {k: v.float().numpy() if v.is_floating_point() else v.numpy()
                    for k, v in state.items()}
  raise FileNotFoundError(f'{folder} holds neither model.safetensors nor pytorch_model.bin '
                          '(sharded checkpoints are not supported)')


def read_hf(path: str) -> SourceWeights:
  """A transformers MobileNetV2 folder (config.json + model.safetensors or pytorch_model.bin)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: give the folder of a Hugging Face model')
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  config_path = os.path.join(folder, 'config.json')
  if not os.path.exists(config_path):
    raise FileNotFoundError(f'{config_path} not found: give the folder of a Hugging Face '
                            'model (config.json + model.safetensors or pytorch_model.bin)')
  with open(config_path) as f:
    hf_config = json.load(f)
  file, state = _read_state_dict(folder)
  source = SourceWeights(f'Hugging Face {", ".join(hf_config.get("architectures") or ["model"])} '
                         f'{file}')
  for key, expected in HF_REQUIRED.items():
    value = hf_config.get(key, expected)  # absent = transformers' default, which is DeepLab's
    if value != expected:
      source.problems.append(f'config.json {key}={value!r}: only {expected!r} (DeepLab\'s '
                             'architecture) can be imported')
  for key in sorted(state):
    reason = _hf_skip_reason(key)
    if reason:
      source.skipped[key] = reason
      continue
    flax_path, value = _hf_variable(key, state[key])
    source.add(flax_path, value, key)
  source.hints['width'] = float(hf_config.get('depth_multiplier', 1.0))
  source.hints['output_stride'] = int(hf_config.get('output_stride', 32))
  if source.has_head:
    source.hints['num_classes'] = int(source.arrays['params/head/logits/bias'].shape[0])
  return source


# ---------------------------------------------------------------------------------------------
# keras: keras.applications.MobileNetV2.

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
    scope = (BACKBONE_SCOPE, _block_name(int(m.group(1) or 0)), m.group(2))
    kind = 'bn' if m.group(3) else m.group(2)
  if kind == 'bn':
    if var not in _KERAS_BN:
      return None, None
    collection, name = _KERAS_BN[var]
    return _variable_path(scope + ('BatchNorm',), name, collection), value
  if var != 'kernel':
    return None, None
  if kind == 'depthwise':  # [kh, kw, channels, 1] -> [kh, kw, 1, channels]
    return _variable_path(scope + ('depthwise',), 'kernel', 'params'), value.transpose(0, 1, 3, 2)
  return _variable_path(scope + ('conv',), 'kernel', 'params'), value


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


READERS: Dict[str, Callable[[str], SourceWeights]] = {
    'deeplab-tf': read_deeplab_tf, 'hf': read_hf, 'keras': read_keras}


# ---------------------------------------------------------------------------------------------
# Checking a file against a model.

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


def _model_line(model_config) -> str:
  return (f'width {model_config.width}, {model_config.num_classes} classes, '
          f'head {model_config.head!r}')


def infer_width(source: SourceWeights) -> Optional[float]:
  """The known width multiplier whose last block has the file's channel count."""
  if 'width' in source.hints:
    return source.hints['width']
  last_block = f'params/{BACKBONE_SCOPE}/{_block_name(NUM_BLOCKS - 1)}'
  last = source.arrays.get(f'{last_block}/project/conv/kernel')
  if last is None:
    return None
  for width in KNOWN_WIDTHS:
    if make_divisible(320 * width) == last.shape[-1]:
      return width
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
        f'{source.description} does not fit the model ({_model_line(model_config)}'
        f'{", backbone only" if contents == "backbone" else ""}):\n' + '\n'.join(lines))
  return contents


# ---------------------------------------------------------------------------------------------
# Writing and reading imported workdirs.

def import_weights(fmt: str, src: str, output: str,
                   config: Optional[ml_collections.ConfigDict] = None, log=print) -> Dict:
  """`main.py import-weights`: reads `src`, checks it, writes the workdir `output`.

  Without `config`, experiments/base.py is used with the model fields the
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
    from experiments import base
    config = base.get_config()
    width = infer_width(source)
    if width is not None:
      config.model.width = width
    for field in ('num_classes', 'output_stride', 'head'):
      if field in source.hints:
        config.model[field] = source.hints[field]
  else:
    config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy
  config.model.preprocessing = DEFAULT_PREPROCESSING
  contents = check(source, config.model)

  checkpoint.save_config(output, config)
  manager = checkpoint.create_manager(output, keep=1)
  tree = unflatten(source.arrays)
  checkpoint.save_model_only(manager, 0, {'params': tree['params'],
                                          'batch_stats': tree['batch_stats']})
  manager.wait_until_finished()
  record = {
      'format': fmt, 'source': os.path.abspath(src), 'description': source.description,
      'contents': contents, 'preprocessing': DEFAULT_PREPROCESSING,
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
           f'  model: width {m["width"]}, {m["num_classes"]} classes, output stride '
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
  src, part = config.train.init_from, config.train.get('init_part', 'auto')
  if part not in INIT_PARTS:
    raise ValueError(f'train.init_part must be one of {INIT_PARTS}, got {part!r}')
  src_config = checkpoint.load_config(src)
  wanted = config.model.get('preprocessing', DEFAULT_PREPROCESSING)
  found = src_config.model.get('preprocessing', DEFAULT_PREPROCESSING)
  if wanted != found:
    raise WeightsMismatchError(f'{src} expects {found!r} inputs, the config {wanted!r}')
  loaded = flatten(checkpoint.load_raw_model_variables(src))
  ours = flatten(variables)
  shapes = {p: tuple(v.shape) for p, v in ours.items()}
  backbone_lines = differences({p: s for p, s in shapes.items() if is_backbone(p)},
                               {p: v for p, v in loaded.items() if is_backbone(p)})
  if backbone_lines:
    raise WeightsMismatchError(f'the backbone of {src} does not fit the model '
                               f'({_model_line(config.model)}):\n' + '\n'.join(backbone_lines))
  head_shapes = {p: s for p, s in shapes.items() if not is_backbone(p)}
  head_loaded = {p: v for p, v in loaded.items() if not is_backbone(p)}
  head_lines = differences(head_shapes, head_loaded)
  if part == 'all' and head_lines:
    raise WeightsMismatchError(
        f'train.init_part=all but the head of {src} does not fit the model '
        f'({_model_line(config.model)}); use train.init_part=backbone to initialise a new '
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
