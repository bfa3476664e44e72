"""hf: transformers' MobileNetV2 models (`MobileNetV2ForSemanticSegmentation`, `MobileNetV2Model`,
`MobileNetV2ForImageClassification`): `model.safetensors` or `pytorch_model.bin` (needs PyTorch)
with their config.json. Kernels are OIHW. The image classifiers give the backbone only.
"""

import json
import os
from typing import Dict, Optional, Tuple

import numpy as np

from seg.model import BACKBONE_SCOPE, make_divisible
from seg.weights.mapping import (NUM_BLOCKS, SourceWeights, block_name, flatten,
                                variable_path)

_BN_HF = {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
          'running_mean': ('batch_stats', 'mean'), 'running_var': ('batch_stats', 'var')}

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
    scope = (BACKBONE_SCOPE, block_name(int(parts[1]) + 1), _HF_BLOCK[parts[2]])
    rest = parts[3:]
  elif parts[0] == 'segmentation_head' and parts[1] in _HF_HEAD:
    scope, rest = ('head', _HF_HEAD[parts[1]]), parts[2:]
  else:
    return None, None
  if rest == ['convolution', 'weight']:  # OIHW (depthwise: [C, 1, kh, kw]) -> HWIO
    leaf = 'depthwise' if scope[-1] == 'depthwise' else 'conv'
    return variable_path(scope + (leaf,), 'kernel', 'params'), value.transpose(2, 3, 1, 0)
  if len(rest) == 2 and rest[0] == 'normalization' and rest[1] in _BN_HF:
    collection, name = _BN_HF[rest[1]]
    return variable_path(scope + ('BatchNorm',), name, collection), value
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


# ----------------------------------------------------------------------------------------------
# The other direction: a model of this project as a transformers folder (`export --format hf`).

HF_HEAD_EPSILON = 1e-5   # transformers' MobileNetV2DeepLabV3Plus hard-codes it
_BN_KEYS = ('weight', 'bias', 'running_mean', 'running_var')


def _hf_layer_keys(scope: str, normalization: bool = True):
  keys = [f'{scope}.convolution.weight']
  return keys + [f'{scope}.normalization.{k}' for k in _BN_KEYS] if normalization else keys


def hf_state_keys() -> list:
  """transformers' state-dict keys of MobileNetV2ForSemanticSegmentation that can carry our
  variables, in its order (every block listed with an expand layer)."""
  keys = []
  for scope in ('first_conv', 'conv_3x3', 'reduce_1x1'):
    keys += _hf_layer_keys(f'mobilenet_v2.conv_stem.{scope}')
  for i in range(1, NUM_BLOCKS):
    for scope in ('expand_1x1', 'conv_3x3', 'reduce_1x1'):
      keys += _hf_layer_keys(f'mobilenet_v2.layer.{i - 1}.{scope}')
  for scope in ('conv_pool', 'conv_aspp', 'conv_projection'):
    keys += _hf_layer_keys(f'segmentation_head.{scope}')
  return keys + ['segmentation_head.classifier.convolution.weight',
                 'segmentation_head.classifier.convolution.bias']


def hf_problems(model_config) -> list:
  """Why a model cannot be written as transformers' MobileNetV2ForSemanticSegmentation."""
  problems = []
  if model_config.head != 'reduced':
    problems.append(f'head {model_config.head!r}: transformers\' DeepLabV3 head has only the '
                    'image pooling and 1x1 branches (head \'reduced\')')
  if model_config.divisible_by != 8 and model_config.width != 1.0:
    problems.append(f'divisible_by {model_config.divisible_by} at width {model_config.width} '
                    '(transformers rounds the expansions with the same divisor, TF-slim and '
                    'DeepLab to multiples of 8; only divisible_by 8 maps)')
  if model_config.backbone_bn_epsilon != HF_REQUIRED['layer_norm_eps']:
    problems.append(f'backbone_bn_epsilon {model_config.backbone_bn_epsilon} (transformers: '
                    f'{HF_REQUIRED["layer_norm_eps"]})')
  if model_config.head_bn_epsilon != HF_HEAD_EPSILON:
    problems.append(f'head_bn_epsilon {model_config.head_bn_epsilon} (transformers: '
                    f'{HF_HEAD_EPSILON})')
  return problems


def hf_config(config, label_names) -> Dict:
  """config.json of transformers' MobileNetV2ForSemanticSegmentation for `config.model`."""
  m = config.model
  return dict(HF_REQUIRED, architectures=['MobileNetV2ForSemanticSegmentation'],
              depth_multiplier=float(m.width), output_stride=int(m.output_stride),
              image_size=int(config.data.eval_size), finegrained_output=True,
              classifier_dropout_prob=0.0, initializer_range=0.02,
              semantic_loss_ignore_index=int(config.data.ignore_label),
              id2label={str(i): name for i, name in enumerate(label_names)},
              label2id={name: i for i, name in enumerate(label_names)})


# The image processor that maps [0, 255] to [-1, 1] (x / 255 - 0.5) / 0.5 with no resizing
# or cropping: the inputs this project's models expect (AutoImageProcessor reads it).
HF_PREPROCESSOR = {
    'image_processor_type': 'MobileNetV2ImageProcessor', 'do_resize': False,
    'do_center_crop': False, 'do_rescale': True, 'rescale_factor': 1 / 255,
    'do_normalize': True, 'image_mean': [0.5, 0.5, 0.5], 'image_std': [0.5, 0.5, 0.5],
    'do_reduce_labels': False}


def write_hf(config, variables: Dict, folder: str, label_names) -> Dict[str, np.ndarray]:
  """Writes config.json, model.safetensors and preprocessor_config.json into `folder`.

  Every key is named by inverting `_hf_variable` (the reader's mapping), so that
  `read_hf` gives back exactly these arrays. The backbone's 1280-channel conv_1x1, which
  transformers builds but the segmentation head never reads, is written as zeros with an
  identity BatchNorm, so that `from_pretrained` finds every weight it expects.
  Returns the state dict written.
  """
  problems = hf_problems(config.model)
  if problems:
    raise ValueError('this model cannot be written as transformers\' '
                     'MobileNetV2ForSemanticSegmentation: ' + '; '.join(problems))
  from safetensors.numpy import save_file
  flat = {k: np.asarray(v, np.float32) for k, v in flatten(variables).items()}
  state = {}
  for key in hf_state_keys():
    path, _ = _hf_variable(key, np.zeros((1, 1, 1, 1), np.float32))
    if path not in flat:
      continue  # the first block has no expand layer
    value = flat.pop(path)
    state[key] = np.ascontiguousarray(value.transpose(3, 2, 0, 1) if key.endswith(
        'convolution.weight') else value)
  if flat:
    raise ValueError(f'variables with no transformers name: {sorted(flat)[:5]}')
  for name in [k for k in state if k.endswith('.running_var')]:
    state[name[:-len('running_var')] + 'num_batches_tracked'] = np.zeros((), np.int64)
  last = state['mobilenet_v2.layer.15.reduce_1x1.convolution.weight'].shape[0]
  conv_1x1 = 1280 if config.model.width < 1 else make_divisible(1280 * config.model.width)
  state['mobilenet_v2.conv_1x1.convolution.weight'] = np.zeros((conv_1x1, last, 1, 1), np.float32)
  for name, value in (('weight', 1), ('bias', 0), ('running_mean', 0), ('running_var', 1)):
    state[f'mobilenet_v2.conv_1x1.normalization.{name}'] = np.full(conv_1x1, value, np.float32)
  state['mobilenet_v2.conv_1x1.normalization.num_batches_tracked'] = np.zeros((), np.int64)
  os.makedirs(folder, exist_ok=True)
  save_file(state, os.path.join(folder, 'model.safetensors'), metadata={'format': 'pt'})
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(hf_config(config, label_names), f, indent=2)
  with open(os.path.join(folder, 'preprocessor_config.json'), 'w') as f:
    json.dump(HF_PREPROCESSOR, f, indent=2)
  return state
