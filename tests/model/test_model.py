"""Architecture facts: parameter counts, channel widths, output strides, multiply-adds."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seg.config import default_config
from seg.model import complexity
from seg.model import DeepLabV3MobileNetV2, MobileNetV2, make_divisible

# Channels of MobileNetV2's last block by width, as published with the Keras and
# TF-slim ImageNet checkpoints (mobilenet_v2_<width>_224).
LAST_BLOCK_CHANNELS = {0.35: 112, 0.5: 160, 0.75: 240, 1.0: 320, 1.4: 448}
STEM_CHANNELS = {0.35: 16, 0.5: 16, 0.75: 24, 1.0: 32, 1.4: 48}


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _init_shapes(model, size):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))


def test_paper_model_has_the_reference_parameter_count():
  # Hugging Face's and Keras' replicas of the MobileNetV2 paper's DeepLabv3 model both count
  # 2,113,557 trainable parameters (21 classes, width 1.0, OS16, reduced head).
  variables = _init_shapes(DeepLabV3MobileNetV2(), 65)
  assert _count(variables['params']) == 2_113_557


def test_full_aspp_adds_three_atrous_branches():
  reduced = _count(_init_shapes(DeepLabV3MobileNetV2(), 65)['params'])
  full = _count(_init_shapes(DeepLabV3MobileNetV2(head='aspp'), 65)['params'])
  branches = 3 * (3 * 3 * 320 * 256 + 2 * 256)   # conv + BN scale/offset each
  projection = 3 * 256 * 256                      # concat_projection reads 768 more channels
  assert full - reduced == branches + projection


@pytest.mark.parametrize('width', sorted(LAST_BLOCK_CHANNELS))
@pytest.mark.parametrize('output_stride', [8, 16, 32])
def test_feature_shapes(width, output_stride):
  size = 97
  model = MobileNetV2(width=width, output_stride=output_stride)
  variables = _init_shapes(model, size)
  features = jax.eval_shape(lambda v, x: model.apply(v, x), variables,
                            jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32))
  side = math.ceil(size / output_stride)
  assert features.shape == (2, side, side, LAST_BLOCK_CHANNELS[width])
  stem = variables['params']['Conv']['conv']['kernel']
  assert stem.shape == (3, 3, 3, STEM_CHANNELS[width])


@pytest.mark.parametrize('output_stride', [8, 16, 32])
def test_logits_come_back_at_input_size(output_stride):
  model = DeepLabV3MobileNetV2(num_classes=5, width=0.35, output_stride=output_stride)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 50, 37, 3)), jnp.float32)
  variables = model.init(jax.random.key(0), x)
  logits = model.apply({'params': variables['params'], 'batch_stats': variables['batch_stats']},
                       x)
  assert logits.shape == (1, 50, 37, 5)
  assert np.isfinite(np.asarray(logits)).all()


def test_dilation_replaces_stride_after_the_output_stride():
  # At OS8 the last 10 blocks run at stride 1: the same number of parameters as OS16/32,
  # and dilated depthwise convs see a wider context (outputs differ).
  x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (1, 65, 65, 3)), jnp.float32)
  m8, m32 = MobileNetV2(width=0.35, output_stride=8), MobileNetV2(width=0.35, output_stride=32)
  variables = m8.init(jax.random.key(0), x)
  assert _count(variables) == _count(m32.init(jax.random.key(0), x))
  assert m8.apply(variables, x).shape == (1, 9, 9, 112)
  assert m32.apply(variables, x).shape == (1, 3, 3, 112)


def test_make_divisible_never_rounds_down_by_more_than_ten_percent():
  for width in (0.35, 0.5, 0.75, 1.0, 1.3, 1.4):
    for channels in (16, 24, 32, 64, 96, 160, 320):
      v = make_divisible(channels * width)
      assert v % 8 == 0 and v >= 0.9 * channels * width and v - channels * width < 8


def test_summary_counts_paper_multiply_adds():
  # MobileNetV2 paper, Table 7: 2.75B MAdds at 513x513 (conv/FC multiply-adds only); the
  # Hugging Face model counted the same way gives 2.74B without its unused 1280 conv.
  info = complexity.describe(default_config())
  assert info['trainable_params'] == 2_113_557
  assert 2.70e9 < info['madds'] < 2.76e9
  assert info['features_shape'] == (1, 33, 33, 320)
  assert info['logits_shape'] == (1, 513, 513, 21)


@pytest.mark.parametrize('name', ['quickstart', 'tiny', 'voc_mnv2_os16', 'voc_mnv2_os8_eval',
                                  'voc_mnv2_050', 'voc_mnv2_aspp', 'voc_mnv2_trainval'])
def test_every_experiment_builds_its_model(name):
  import importlib
  config = importlib.import_module(f'experiments.{name}').get_config()
  info = complexity.describe(config)
  side = math.ceil(config.data.eval_size / config.model.output_stride)
  assert info['features_shape'][1:3] == (side, side)
