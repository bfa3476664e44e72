"""The VOC recipe against DeepLab's published settings, value by value, and the config rules
that keep it (BatchNorm decays per part, channel rounding, ImageNet initialisation).

Each expected value is written out here with the file it comes from, in tensorflow/models:
research/deeplab (DeepLab) and research/slim/nets/mobilenet (TF-slim's MobileNetV2).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from seg import checkpoint
from seg import config as config_lib
from seg.config import load_experiment
from seg.model import DeepLabV3MobileNetV2, MobileNetV2, block_specs, stem_channels
from seg.train import step as step_lib
from seg.train.loop import check_initialisation, warn_from_scratch

VOC = 'experiments/voc_mnv2_os16.py'


def _voc():
  from helpers import ROOT
  return load_experiment(os.path.join(ROOT, VOC))


def test_voc_recipe_is_deeplabs():
  c = _voc()
  # deeplab/train.py flags ("Use 0.007 when training on PASCAL augmented training set").
  assert c.train.learning_rate == 0.007
  assert c.train.steps == 30_000           # training_number_of_steps
  assert c.train.lr_power == 0.9           # learning_power, learning_policy 'poly'
  assert c.train.warmup_steps == 0         # slow_start_step 0
  assert c.train.momentum == 0.9           # momentum (tf.train.MomentumOptimizer)
  assert c.train.weight_decay == 4e-5      # weight_decay 0.00004
  # deeplab/train.py, train_batch_size: "When fine_tune_batch_norm=True, use at least batch
  # size larger than 12 (batch size more than 16 is better)"; DeepLabv3 (Chen et al. 2017,
  # section 4.1) trains with batch 16.
  assert c.train.batch_size == 16
  # deeplab/train.py: train_crop_size 513,513; min_scale_factor 0.5, max_scale_factor 2.0,
  # scale_factor_step_size 0.25; output_stride 16.
  assert c.data.crop_size == 513
  assert (c.data.min_scale, c.data.max_scale, c.data.scale_step) == (0.5, 2.0, 0.25)
  assert c.model.output_stride == 16
  # deeplab/eval.py: eval_crop_size 513,513 (every val image padded to it), one scale, no flip.
  assert c.data.eval_size == 513
  assert tuple(c.eval.scales) == (1.0,) and not c.eval.flip
  # deeplab/datasets/data_generator.py (pascal_voc_seg): ignore_label 255, 21 classes,
  # train_aug 10,582 images, val 1,449.
  assert c.data.ignore_label == 255 and c.model.num_classes == 21
  assert (c.data.dataset, c.data.train_split, c.data.eval_split) == ('train_aug', 'train_aug',
                                                                     'val')
  # slim nets/mobilenet/mobilenet.py training_scope(bn_decay=0.997), used by
  # deeplab/core/feature_extractor.py for the backbone; slim.batch_norm's epsilon 0.001.
  assert c.model.backbone_bn_momentum == 0.997 and c.model.backbone_bn_epsilon == 1e-3
  # deeplab/model.py, the head's batch_norm_params: decay 0.9997, epsilon 1e-5.
  assert c.model.head_bn_momentum == 0.9997 and c.model.head_bn_epsilon == 1e-5
  # deeplab/model.py: dropout keep_prob 0.9 before the logits; MobileNetV2 without ASPP
  # (train.py: "For `mobilenet_v2`, use None" atrous_rates) but with image pooling
  # (common.py add_image_level_feature True).
  assert c.model.dropout_rate == pytest.approx(0.1) and c.model.head == 'reduced'
  # deeplab/core/feature_extractor.py: _preprocess_zero_mean_unit_range for mobilenet_v2;
  # width 1.0 rounds channels to multiples of 8 (divisible_by 8).
  assert c.model.preprocessing == 'zero_mean_unit_range'
  assert c.model.width == 1.0 and c.model.divisible_by == 8
  # deeplab/train.py: the loss over all pixels (top_k_percent_pixels 1.0,
  # hard_example_mining_step 0), every label weight 1 (common.py label_weights None); the
  # gradient multipliers of train_utils.get_model_gradient_multipliers: biases 2x,
  # last_layer_gradient_multiplier 1.0 over the whole head (last_layers_contain_logits_only
  # False).
  assert tuple(c.train.label_weights) == () and c.train.top_k_percent_pixels == 1.0
  assert c.train.hard_example_mining_step == 0 and c.train.bias_gradient_multiplier == 2.0
  assert c.train.last_layer_gradient_multiplier == 1.0
  assert not c.train.last_layers_contain_logits_only
  # deeplab/train.py: fine-tuned from tf_initial_checkpoint (ImageNet), never from scratch.
  assert c.train.init_from == '' and not c.train.from_scratch


def test_weight_decay_applies_to_the_conv_kernels_tf_slim_regularises():
  # slim nets/mobilenet/mobilenet.py training_scope: l2_regularizer(weight_decay) on
  # slim.conv2d weights, none on separable_conv2d (depthwise) weights unless
  # regularize_depthwise; deeplab/model.py: the same on the head's conv2d layers, the
  # logits included. Biases and BatchNorm's gamma/beta are never regularised.
  model = DeepLabV3MobileNetV2(width=0.35)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 33, 33, 3))))
  mask = step_lib.weight_decay_mask(params['params'])
  decayed = {'/'.join(str(getattr(k, 'key', k)) for k in path)
             for path, on in jax.tree_util.tree_leaves_with_path(mask) if on}
  expected = {'MobilenetV2/Conv/conv/kernel', 'head/image_pooling/conv/kernel',
              'head/aspp0/conv/kernel', 'head/concat_projection/conv/kernel',
              'head/logits/kernel'}
  for i, (expanded, _, _, _) in enumerate(block_specs(0.35, 16)):
    name = 'expanded_conv' if i == 0 else f'expanded_conv_{i}'
    expected.add(f'MobilenetV2/{name}/project/conv/kernel')
    if i:  # the first block (expansion 1) has no expansion conv
      expected.add(f'MobilenetV2/{name}/expand/conv/kernel')
  assert decayed == expected
  # L2 as TF applies it: the gradient of wd / 2 * |w|^2 is wd * w, added before momentum.
  tx = step_lib.create_optimizer(_voc().train, lambda _: 1.0)
  w = {'kernel': jnp.full((2,), 3.0), 'bias': jnp.full((2,), 3.0)}
  updates, _ = tx.update({'kernel': jnp.zeros(2), 'bias': jnp.zeros(2)}, tx.init(w), w)
  np.testing.assert_allclose(updates['kernel'], -4e-5 * 3.0, rtol=1e-6)
  np.testing.assert_allclose(updates['bias'], 0.0)


def test_training_flips_half_of_the_crops():
  # deeplab/input_preprocess.py: _PROB_OF_FLIP = 0.5, left-right.
  from seg.data import pipeline
  image = np.zeros((9, 9, 3), np.uint8)
  image[:, :4] = 200                 # the left part is bright
  flipped = 0
  for seed in range(60):
    out, _ = pipeline.augment(tf.constant(image), tf.zeros((9, 9, 1), tf.uint8),
                              tf.constant([seed, 1], tf.int64), crop_size=9, min_scale=1.0,
                              max_scale=1.0, scale_step=0.25)
    flipped += int(out.numpy()[0, 8, 0] > 100)
  assert 18 <= flipped <= 42         # binomial(60, 0.5): outside this with p < 0.002


def test_each_part_keeps_its_own_batchnorm_decay():
  # TF's convention: moving = decay * moving + (1 - decay) * batch. From zero statistics,
  # two updates with the same batch give moving2 / moving1 = 1 + decay, whatever the batch.
  model = DeepLabV3MobileNetV2(num_classes=3, width=0.35, dropout_rate=0.0,
                               backbone_bn_momentum=0.6, head_bn_momentum=0.3, axis_name=None)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 33, 33, 3)), jnp.float32)
  variables = model.init(jax.random.key(0), x)
  zeros = jax.tree.map(jnp.zeros_like, variables['batch_stats'])
  update = jax.jit(lambda stats: model.apply({'params': variables['params'],
                                               'batch_stats': stats}, x, train=True,
                                              mutable=['batch_stats'])[1]['batch_stats'])
  once = update(zeros)
  twice = update(once)
  for part, decay in (('MobilenetV2', 0.6), ('head', 0.3)):
    means1 = jax.tree.leaves({k: v for k, v in once[part].items()})
    means2 = jax.tree.leaves({k: v for k, v in twice[part].items()})
    for m1, m2 in zip(means1, means2):
      big = np.abs(np.asarray(m1)) > 1e-3
      np.testing.assert_allclose(np.asarray(m2)[big] / np.asarray(m1)[big], 1 + decay,
                                 rtol=1e-3)


def test_an_old_config_json_with_one_decay_keeps_it_for_both_parts(tmp_path):
  old = config_lib.default_config().to_dict()
  model = old['model']
  del model['backbone_bn_momentum'], model['head_bn_momentum'], model['divisible_by']
  model['bn_momentum'] = 0.99
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'config.json').write_text(json.dumps(old))
  config = checkpoint.load_config(str(workdir))
  assert config.model.backbone_bn_momentum == config.model.head_bn_momentum == 0.99
  assert config.model.divisible_by == 8 and 'bn_momentum' not in config.model
  # Resuming that run with today's equivalent config is the same model; another decay is not.
  checkpoint.save_config(str(workdir), config)
  config.model.head_bn_momentum = 0.9997
  with pytest.raises(ValueError, match='model.head_bn_momentum=0.99, not 0.9997'):
    checkpoint.save_config(str(workdir), config)


def test_an_experiment_setting_a_renamed_or_unknown_field_is_an_error(tmp_path):
  path = tmp_path / 'old.py'
  path.write_text('from seg.config import default_config\n'
                  'def get_config():\n'
                  '  c = default_config()\n'
                  '  c.model.bn_momentum = 0.99\n'
                  '  c.train.stepz = 3\n'
                  '  return c\n')
  with pytest.raises(ValueError) as error:
    load_experiment(str(path))
  assert 'model.bn_momentum (now model.backbone_bn_momentum and model.head_bn_momentum)' in \
      str(error.value) and 'train.stepz' in str(error.value)


def test_quickstart_and_tiny_keep_one_decay_and_train_from_scratch():
  from experiments import quickstart, tiny
  for module, decay in ((quickstart, 0.99), (tiny, 0.9)):
    c = module.get_config()
    assert c.model.backbone_bn_momentum == c.model.head_bn_momentum == decay
    assert c.train.from_scratch and c.model.divisible_by == 8


def test_voc_configs_without_init_from_stop_with_the_import_command(tmp_path):
  from helpers import ROOT
  for name in ('voc_mnv2_os16', 'voc_mnv2_050', 'voc_mnv2_aspp', 'voc_mnv2_trainval'):
    c = load_experiment(os.path.join(ROOT, 'experiments', name + '.py'))
    with pytest.raises(ValueError) as error:
      check_initialisation(c, str(tmp_path / name))
    width = c.model.width
    assert (f'python main.py import-weights --format deeplab-tf mobilenet_v2_{width}_224 '
            f'--output runs/mobilenet_v2_{width}_224') in str(error.value)
    assert '--config.train.from_scratch=True' in str(error.value)
    with c.unlocked():
      c.train.from_scratch = True
    check_initialisation(c, str(tmp_path / name))  # allowed, explicitly, with a warning
    lines = []
    warn_from_scratch(c, lines.append)
    assert len(lines) == 1 and lines[0].startswith('WARNING: training ')
  assert not os.listdir(tmp_path)  # nothing written
  from experiments import quickstart
  lines = []
  warn_from_scratch(quickstart.get_config(), lines.append)   # by design: no complaint
  check_initialisation(quickstart.get_config(), str(tmp_path / 'qs'))
  assert lines == []


def test_config_choices_agree_with_the_modules_that_own_them():
  from seg.data import pipeline
  from seg.model import DIVISIBLE_BY
  from seg.model.deeplab import HEADS
  from seg.model.mobilenet_v2 import OUTPUT_STRIDES
  from seg.train.step import OPTIMIZERS
  from seg.weights.init_from import INIT_PARTS
  choices = config_lib.CHOICES
  assert choices['data.cache'] == pipeline.CACHES
  assert choices['model.divisible_by'] == DIVISIBLE_BY
  assert choices['model.head'] == HEADS
  assert choices['model.output_stride'] == OUTPUT_STRIDES
  assert choices['train.init_part'] == INIT_PARTS
  assert choices['train.optimizer'] == OPTIMIZERS


# Channel tables written out from the two rules (slim nets/mobilenet/mobilenet.py
# `_make_divisible(v, divisor, min_value)`: max(min_value, int(v + divisor / 2) // divisor *
# divisor), plus divisor if that is below 0.9 v):
#   TF-slim (divisible_by 8, min_depth 8), its ImageNet checkpoints;
#   DeepLab's feature_extractor._mobilenet_v2 at depth_multiplier != 1 (divisible_by 1,
#   min_depth 1). Expansions (x6) are rounded to multiples of 8 under both
#   (slim nets/mobilenet/conv_blocks.py expand_input_by_factor(n, divisible_by=8)); the first
#   block's (x1) is its input. Outputs of the stem, then of the 17 blocks.
OUTPUTS = {
    (0.5, 8): [16, 8, 16, 16, 16, 16, 16, 32, 32, 32, 32, 48, 48, 48, 80, 80, 80, 160],
    (0.5, 1): [16, 8, 12, 12, 16, 16, 16, 32, 32, 32, 32, 48, 48, 48, 80, 80, 80, 160],
    (0.35, 8): [16, 8, 8, 8, 16, 16, 16, 24, 24, 24, 24, 32, 32, 32, 56, 56, 56, 112],
    (0.35, 1): [11, 6, 8, 8, 11, 11, 11, 22, 22, 22, 22, 34, 34, 34, 56, 56, 56, 112],
}
EXPANDED = {  # the 16 expansions of blocks 1..16
    (0.5, 8): [48, 96, 96, 96, 96, 96, 192, 192, 192, 192, 288, 288, 288, 480, 480, 480],
    (0.5, 1): [48, 72, 72, 96, 96, 96, 192, 192, 192, 192, 288, 288, 288, 480, 480, 480],
    (0.35, 8): [48, 48, 48, 96, 96, 96, 144, 144, 144, 144, 192, 192, 192, 336, 336, 336],
    (0.35, 1): [40, 48, 48, 64, 64, 64, 136, 136, 136, 136, 208, 208, 208, 336, 336, 336],
}


@pytest.mark.parametrize('width,divisible_by', sorted(OUTPUTS))
def test_channel_tables_of_both_roundings(width, divisible_by):
  specs = block_specs(width, 16, divisible_by)
  assert [stem_channels(width, divisible_by)] + [s[1] for s in specs] == \
      OUTPUTS[width, divisible_by]
  assert [s[0] for s in specs[1:]] == EXPANDED[width, divisible_by]
  assert specs[0][0] == stem_channels(width, divisible_by)  # no expansion in the first block
  # The network built with the rule has those kernels.
  model = MobileNetV2(width=width, divisible_by=divisible_by)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 33, 33, 3))))
  params = params['params']
  outs = [params['Conv']['conv']['kernel'].shape[-1]] + [
      params['expanded_conv' if i == 0 else f'expanded_conv_{i}']['project']['conv'][
          'kernel'].shape[-1] for i in range(17)]
  assert outs == OUTPUTS[width, divisible_by]
  assert 'expand' not in params['expanded_conv']
