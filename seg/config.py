"""Experiment configuration: every field with its default, loading experiment files, overrides.

An experiment is a Python file (`experiments/*.py`) whose `get_config()` returns an
`ml_collections.ConfigDict`, usually `default_config()` with a few fields changed. Fields
mirror DeepLab's `train.py` flags where one exists. Configs are locked after loading, so a
misspelt field is an error, and any field can be overridden on the command line
(`--config.train.steps=100`, `apply_overrides`). A workdir's config.json written by an older
version gets the fields it lacks from here (`with_defaults`), so code never repeats a default.
"""

import ast
import importlib.util
import math
import os
import sys
from typing import Any, Iterable, Tuple

import ml_collections

from seg.classes import parse_colours, parse_names
from seg.preprocessing import ZERO_MEAN_UNIT_RANGE


def default_config() -> ml_collections.ConfigDict:
  """Every field with its default: DeepLab's recipe for MobileNetV2 on PASCAL VOC."""
  config = ml_collections.ConfigDict()

  config.model = ml_collections.ConfigDict()
  config.model.num_classes = 21
  config.model.width = 1.0             # MobileNetV2 width (depth) multiplier
  config.model.output_stride = 16      # 8, 16 or 32
  config.model.head = 'reduced'        # 'reduced' (image pooling + 1x1) or 'aspp'
  config.model.dropout_rate = 0.1      # DeepLab's keep probability 0.9
  # BatchNorm decay (TF's convention: new = decay * old + (1 - decay) * batch) and epsilon:
  # DeepLab builds its MobileNetV2 under TF-slim's mobilenet_v2.training_scope (decay 0.997,
  # slim.batch_norm's epsilon 1e-3) and its head with its own (decay 0.9997, epsilon 1e-5).
  config.model.backbone_bn_momentum = 0.997
  config.model.head_bn_momentum = 0.9997
  config.model.backbone_bn_epsilon = 1e-3
  config.model.head_bn_epsilon = 1e-5
  # Rounding of the width-multiplied channel counts (seg/model/mobilenet_v2.py DIVISIBLE_BY):
  # 8 as TF-slim's ImageNet checkpoints, 1 as DeepLab's own models of width != 1.
  config.model.divisible_by = 8
  config.model.preprocessing = ZERO_MEAN_UNIT_RANGE  # inputs [-1, 1] (seg.preprocessing)

  config.data = ml_collections.ConfigDict()
  config.data.dataset = 'embedded'     # 'embedded', 'voc2012', 'train_aug' or 'folder'
  config.data.folder = ''              # dataset 'folder': your own, in the VOC layout (data.md)
  # Class names, comma-separated, for reports and exports; '' = the dataset's (VOC's, the
  # embedded's, a folder's labelmap.txt; else the class ids). `train` stores a folder's here.
  config.data.class_names = ''
  # Their colours in `predict`'s masks, 'r,g,b;r,g,b;...'; '' = VOC's colour map. `train`
  # stores a folder's labelmap.txt colours here.
  config.data.class_colours = ''
  config.data.data_dir = ''            # TFDS data_dir; '' = TFDS's default (~/tensorflow_datasets)
  config.data.train_split = 'train'
  config.data.eval_split = 'val'
  config.data.crop_size = 513          # training crop (k * 16 + 1 keeps grids aligned)
  config.data.eval_size = 513          # evaluation pads every image to this size
  # `predict`'s default --max-side (inputs with a larger side are downscaled to it); 0 =
  # data.eval_size. `train` sets a folder's largest eval image side here when it is above
  # eval_size, so that `predict` runs images like those whole, as `eval` does.
  config.data.predict_max_side = 0
  config.data.min_scale = 0.5
  config.data.max_scale = 2.0
  config.data.scale_step = 0.25
  config.data.ignore_label = 255
  config.data.shuffle_buffer = 1000
  config.data.cache = 'decoded'        # 'decoded' | 'encoded' | 'none' (seg/data/pipeline.py)
  # How training crops travel to the device: 'uint8' (4x fewer bytes; the padding as a box,
  # normalised on the device), 'float32', or 'auto': uint8 on accelerators, float32 on a CPU
  # (no transfer there, and the CPU's numbers stay those measured before uint8 existed).
  config.data.transfer = 'auto'

  config.train = ml_collections.ConfigDict()
  config.train.steps = 30_000
  config.train.batch_size = 16         # global, split across every device
  config.train.learning_rate = 0.007   # base of the poly schedule
  config.train.lr_power = 0.9
  config.train.warmup_steps = 0
  config.train.optimizer = 'sgd'       # DeepLab's SGD with momentum; 'adam' (experiments/quickstart.py)
  config.train.momentum = 0.9          # SGD's momentum
  config.train.weight_decay = 4e-5     # on conv kernels except depthwise, as TF-slim
  config.train.seed = 0
  config.train.log_every = 50
  config.train.checkpoint_every = 1000
  config.train.keep_checkpoints = 3
  config.train.eval_every = 5000       # 0 = only at the end
  config.train.keep_best = True        # WORKDIR/best: the weights of the best evaluation
  # Initialisation of a new run (not of a resumed one) from a workdir, e.g. one written by
  # `import-weights`: init_part 'all' (whole network), 'all_but_logits' (a fresh last layer,
  # DeepLab's initialize_last_layer=False: other classes), 'backbone' (fresh head) or 'auto'
  # (whole network if its head fits, all but the logits if only the classes differ, else
  # backbone).
  config.train.init_from = ''
  config.train.init_part = 'auto'
  # DeepLab always starts from ImageNet weights: a new run with an empty init_from is an
  # error unless from_scratch allows random weights (experiments/quickstart.py and tiny.py
  # do, by design). init_from, when given, is used either way.
  config.train.from_scratch = False
  # The loss and the gradients as DeepLab's train.py shapes them (docs/training.md, "The loss"):
  # label_weights, one per class, weigh each pixel's loss by its label (() = all 1); with
  # top_k_percent_pixels < 1 only that share of the batch's pixels with the largest losses
  # count (hard pixel mining), reached linearly over hard_example_mining_step steps (0: at
  # once). Gradients are multiplied by bias_gradient_multiplier for conv biases (DeepLab: 2,
  # the logits') and by last_layer_gradient_multiplier in the head (or, with
  # last_layers_contain_logits_only, the logits alone): DeepLab's get_model_gradient_multipliers.
  config.train.label_weights = ()
  config.train.top_k_percent_pixels = 1.0
  config.train.hard_example_mining_step = 0
  config.train.bias_gradient_multiplier = 2.0
  config.train.last_layer_gradient_multiplier = 1.0
  config.train.last_layers_contain_logits_only = False
  config.train.compute_dtype = 'float32'  # 'bfloat16': mixed precision (params, loss stay f32)
  config.train.skip_nonfinite = False  # True: skip (and count) steps with a NaN/inf loss or grad
  config.train.summary_images = 3      # validation images sent to TensorBoard at each eval

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 8           # global; the last batch is padded and masked
  config.eval.scales = (1.0,)          # DeepLab's eval_scales; e.g. (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
  config.eval.flip = False             # also the left-right flipped image (DeepLab's add_flipped_images)

  return config


# Allowed values of the enumerated fields, checked by `validate` before anything is built.
# The modules that own them define them too (seg.model, seg.data.pipeline, seg.weights,
# which this module cannot import: the CLI loads configs before any of them);
# tests/train/test_recipe.py checks that the two agree.
CHOICES = {
    'model.output_stride': (8, 16, 32),
    'model.head': ('reduced', 'aspp'),
    'model.divisible_by': (8, 1),
    'model.preprocessing': (ZERO_MEAN_UNIT_RANGE,),
    'data.cache': ('decoded', 'encoded', 'none'),
    'train.init_part': ('auto', 'all', 'all_but_logits', 'backbone'),
    'train.compute_dtype': ('float32', 'bfloat16'),
    'train.optimizer': ('sgd', 'adam'),
}


def _get(config, field: str):
  node = config
  for key in field.split('.'):
    node = node[key]
  return node


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first field whose value cannot work (before anything is
  built or compiled)."""
  for field, allowed in CHOICES.items():
    if _get(config, field) not in allowed:
      raise ValueError(f'config.{field} must be one of {allowed}, got {_get(config, field)!r}')
  positive = ('model.width', 'model.num_classes', 'data.crop_size', 'data.eval_size',
              'data.min_scale', 'data.scale_step', 'data.shuffle_buffer', 'train.steps',
              'train.batch_size', 'train.log_every', 'train.checkpoint_every',
              'train.keep_checkpoints', 'eval.batch_size')
  for field in positive:
    if not _get(config, field) > 0:
      raise ValueError(f'config.{field} must be positive, got {_get(config, field)!r}')
  unit = ('model.dropout_rate', 'model.backbone_bn_momentum', 'model.head_bn_momentum')
  for field in unit:
    if not 0 <= _get(config, field) < 1:
      raise ValueError(f'config.{field} must be in [0, 1), got {_get(config, field)!r}')
  if config.data.dataset == 'folder' and not config.data.folder:
    raise ValueError("config.data.dataset='folder' needs config.data.folder, the dataset's "
                     'folder (--config.data.folder=DIR; its layout: docs/data.md)')
  if config.data.folder and config.data.dataset != 'folder':
    raise ValueError(f'config.data.folder is read only with config.data.dataset=\'folder\', '
                     f'not {config.data.dataset!r}')
  names = parse_names(config.data.class_names)
  if names and len(names) != config.model.num_classes:
    raise ValueError(f'config.data.class_names has {len(names)} names, '
                     f'config.model.num_classes is {config.model.num_classes}')
  colours = parse_colours(config.data.class_colours)
  if colours and len(colours) != config.model.num_classes:
    raise ValueError(f'config.data.class_colours has {len(colours)} colours, '
                     f'config.model.num_classes is {config.model.num_classes}')
  if config.data.predict_max_side < 0:
    raise ValueError('config.data.predict_max_side must not be negative (0: data.eval_size), '
                     f'got {config.data.predict_max_side}')
  if config.data.max_scale < config.data.min_scale:
    raise ValueError(f'config.data.max_scale ({config.data.max_scale}) is below '
                     f'config.data.min_scale ({config.data.min_scale})')
  if config.train.learning_rate < 0 or config.train.weight_decay < 0:
    raise ValueError('config.train.learning_rate and weight_decay must not be negative')
  _validate_loss(config.train, config.model.num_classes)
  scales = tuple(config.eval.scales)
  if not scales or min(float(x) for x in scales) <= 0:
    raise ValueError(f'config.eval.scales must be positive numbers, got {scales}')


def _validate_loss(train, num_classes: int) -> None:
  """The loss and gradient-multiplier fields of `config.train` (see default_config)."""
  weights = tuple(train.label_weights)
  if weights:
    try:
      values = [float(w) for w in weights]
    except (TypeError, ValueError):
      raise ValueError(f'config.train.label_weights must be numbers, got {weights}') from None
    if len(values) != num_classes:
      raise ValueError(f'config.train.label_weights has {len(values)} weights, '
                       f'config.model.num_classes is {num_classes} (one weight per class, '
                       "in class order, e.g. --config.train.label_weights='(1, 1, 5)')")
    if min(values) < 0 or not max(values) > 0 or not all(math.isfinite(v) for v in values):
      raise ValueError(f'config.train.label_weights must be finite, not negative and not all '
                       f'zero, got {weights}')
  if not 0 < train.top_k_percent_pixels <= 1:
    raise ValueError('config.train.top_k_percent_pixels must be in (0, 1] (a share of the '
                     f'pixels, 0.25 for the hardest quarter), got {train.top_k_percent_pixels!r}')
  if train.hard_example_mining_step < 0:
    raise ValueError('config.train.hard_example_mining_step must not be negative, got '
                     f'{train.hard_example_mining_step!r}')
  for field in ('bias_gradient_multiplier', 'last_layer_gradient_multiplier'):
    value = train[field]
    if not (value >= 0 and math.isfinite(value)):
      raise ValueError(f'config.train.{field} must be a finite number >= 0, got {value!r}')


def load_experiment(path: str, overrides: Iterable[Tuple[str, str]] = ()) -> ml_collections.ConfigDict:
  """The locked config of an experiment file (its `get_config()`), with `overrides` applied.

  overrides: (dotted field, value text) pairs, e.g. ('train.steps', '100').
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'experiment file {path} not found (e.g. experiments/quickstart.py)')
  spec = importlib.util.spec_from_file_location(
      'experiment_' + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  # An experiment may import its siblings (`from experiments import voc_mnv2_os16`): the
  # folder above a package of experiment files is importable while the file runs.
  folder = os.path.dirname(os.path.abspath(path))
  root = os.path.dirname(folder) if os.path.exists(os.path.join(folder, '__init__.py')) else None
  if root and root not in sys.path:
    sys.path.insert(0, root)
    try:
      spec.loader.exec_module(module)
    finally:
      sys.path.remove(root)
  else:
    spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ValueError(f'{path} defines no get_config()')
  config = module.get_config()
  _check_fields(config, path)
  config.lock()
  apply_overrides(config, overrides)
  validate(config)
  return config


# Fields that were renamed: old name -> what replaced it.
RENAMED = {'model.bn_momentum': 'model.backbone_bn_momentum and model.head_bn_momentum'}


def _check_fields(config: ml_collections.ConfigDict, path: str) -> None:
  """Refuses fields that `default_config()` lacks: an experiment that sets a misspelt or
  renamed field (an unlocked ConfigDict would simply grow it) would otherwise be ignored."""
  def unknown(node, known, prefix=''):
    for key, value in node.items():
      name = prefix + key
      if key not in known:
        yield name
      elif isinstance(value, ml_collections.ConfigDict) and isinstance(
          known[key], ml_collections.ConfigDict):
        yield from unknown(value, known[key], name + '.')
  extra = list(unknown(config, default_config()))
  if extra:
    notes = [f'{name} (now {RENAMED[name]})' if name in RENAMED else name for name in extra]
    raise ValueError(f'{path} sets fields that do not exist: {", ".join(notes)} '
                     f'(every field: seg/config.py default_config)')


def _parse(field: str, current: Any, text: str) -> Any:
  """`text` as a value of the type of `current` (the field's present value)."""
  try:
    if isinstance(current, bool):
      lowered = text.strip().lower()
      if lowered in ('true', '1', 'yes'):
        return True
      if lowered in ('false', '0', 'no'):
        return False
      raise ValueError('expected true or false')
    if isinstance(current, int):
      return int(text)
    if isinstance(current, float):
      return float(text)
    if isinstance(current, str):
      return text
    value = ast.literal_eval(text)
    if isinstance(current, (tuple, list)):
      value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    return value
  except (ValueError, SyntaxError) as e:
    raise ValueError(f'--config.{field}={text}: not a {type(current).__name__} ({e})') from None


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Iterable[Tuple[str, str]]) -> None:
  """Sets each (dotted field, value text); an unknown field is an error naming its siblings."""
  for field, text in overrides:
    *parents, leaf = field.split('.')
    node = config
    for i, key in enumerate(parents + [leaf]):
      if not isinstance(node, ml_collections.ConfigDict) or key not in node:
        where = '.'.join(parents[:i]) or 'config'
        known = ', '.join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else ''
        raise ValueError(f'--config.{field}: {where} has no field {key!r} (fields: {known})')
      if key != leaf or i < len(parents):
        node = node[key]
    with config.unlocked():
      node[leaf] = _parse(field, node[leaf], text)


def with_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with the fields it lacks (a config.json of an older version) taken from
  `default_config()`; fields it has are kept.

  Renamed fields are translated: `model.bn_momentum` (one decay, before the backbone's and
  the head's were separate) becomes both `model.backbone_bn_momentum` and
  `model.head_bn_momentum`, so an old run resumes with the decay it was trained with. A
  config.json from before `model.divisible_by` gets 8, the only rounding there was; one from
  before `train.bias_gradient_multiplier` gets 1, the multiplier it was trained with (the
  default, DeepLab's 2, would change a resumed run's updates half-way).
  """
  merged = default_config()
  model = config.get('model')
  if model is not None and 'bn_momentum' in model:
    # One decay for backbone and head (before the split): both keep it.
    model = model.to_dict()
    decay = model.pop('bn_momentum')
    for key in ('backbone_bn_momentum', 'head_bn_momentum'):
      model.setdefault(key, decay)
    config = ml_collections.ConfigDict({**config.to_dict(), 'model': model})

  def fill(target, source):
    for key, value in source.items():
      if isinstance(value, ml_collections.ConfigDict) and key in target:
        fill(target[key], value)
      else:
        target[key] = value

  train = config.get('train')
  if train is not None and 'bias_gradient_multiplier' not in train:
    merged.train.bias_gradient_multiplier = 1.0
  fill(merged, config)
  return merged
