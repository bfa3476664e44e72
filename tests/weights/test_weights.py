"""Imported weights reproduce the original frameworks' own models.

The published checkpoints cannot be downloaded here, so the networks are
built in their own frameworks (transformers on PyTorch, Keras, TF1 checkpoints
with DeepLab's variable names) with random weights and random BatchNorm
statistics, saved in their formats, imported, and compared on random inputs
against those frameworks' forward passes.
"""

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from helpers import ROOT, random_variables
from seg import checkpoint, predict
from seg.weights import hf, importer, init_from, mapping
from seg.model import MobileNetV2, create_model

RTOL = 1e-4  # of the largest logit / feature magnitude


def _hf_config(width=1.0, output_stride=8, num_labels=21):
  """google/deeplabv3_mobilenet_v2_1.0_513's config: transformers' defaults but these."""
  from transformers import MobileNetV2Config
  return MobileNetV2Config(layer_norm_eps=0.001, depth_multiplier=width, image_size=513,
                           output_stride=output_stride, num_labels=num_labels)


def _randomise_torch(model, seed, size=33):
  """He-normal convs, random BN affine, and BN statistics that are not the identity.

  The statistics are those of one random batch, then shifted and rescaled at
  random, so every BatchNorm output is of unit order yet a swapped or
  mis-mapped statistic changes the logits.
  """
  import torch
  g = torch.Generator().manual_seed(seed)
  bns = []
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.Conv2d):
        fan_in = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
        if m.bias is not None:
          m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
      elif isinstance(m, torch.nn.Linear):
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.05)
      elif isinstance(m, torch.nn.BatchNorm2d):
        m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
        m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
        m.reset_running_stats()
        bns.append((m, m.momentum))
        m.momentum = None  # cumulative: after one batch, exactly its statistics
    model.train()
    model(pixel_values=torch.rand((2, 3, size, size), generator=g) * 2 - 1)
    model.eval()
    for m, momentum in bns:
      m.momentum = momentum
      std = m.running_var.sqrt()
      m.running_mean.add_(torch.randn(std.shape, generator=g) * 0.3 * std)
      m.running_var.mul_(torch.rand(std.shape, generator=g) * 1.5 + 0.5)
  return model


def _hf_segmenter(width, output_stride, num_labels=21, seed=0, state=None):
  import torch
  from transformers import MobileNetV2ForSemanticSegmentation
  torch.manual_seed(seed)
  model = MobileNetV2ForSemanticSegmentation(_hf_config(width, output_stride, num_labels))
  if state is None:
    return _randomise_torch(model, seed)
  model.load_state_dict(state)
  return model.eval()


def _torch_nhwc(fn, x):
  """Runs a torch function on NHWC NumPy input, returns NHWC NumPy output."""
  import torch
  with torch.no_grad():
    y = fn(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
  return y.numpy().transpose(0, 2, 3, 1)


def _close(ours, theirs, rtol=RTOL):
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape
  scale = np.abs(theirs).max()
  assert scale > 1e-2  # the comparison means something
  err = np.abs(ours - theirs).max() / scale
  assert err <= rtol, f'max error {err:.2e} of the largest magnitude {scale:.3g}'


_FORWARD_CACHE = {}


def _logits(model_config, variables, images):
  """Our logits at the feature resolution; one compiled function per model config."""
  model = create_model(model_config)
  if model not in _FORWARD_CACHE:
    _FORWARD_CACHE[model] = jax.jit(lambda v, x: model.apply(v, x, train=False, upsample=False))
  return np.asarray(_FORWARD_CACHE[model](variables, jnp.asarray(images)))


def _features(width, variables, images):
  """Our backbone features at output stride 32 (as ImageNet classifiers run it)."""
  module = MobileNetV2(width, 32)
  if module not in _FORWARD_CACHE:
    _FORWARD_CACHE[module] = jax.jit(lambda v, x: module.apply(v, x, train=False))
  backbone = {c: variables[c]['MobilenetV2'] for c in ('params', 'batch_stats')}
  return np.asarray(_FORWARD_CACHE[module](backbone, jnp.asarray(images)))


def _imported(workdir):
  return checkpoint.load_config(workdir), checkpoint.load_raw_model_variables(workdir)


# TF1 checkpoints with DeepLab's names, written from a transformers state dict by the
# inverse of transformers' own TF -> PyTorch conversion mapping.

def _deeplab_tf_arrays(state, head=True):
  """{DeepLab/TF-slim variable name: TF layout array} from a transformers state dict."""
  state = {k.replace('mobilenet_v2.', '', 1): v.numpy() for k, v in state.items()}
  out = {}

  def layer(tf_scope, hf_scope, depthwise=False):
    w = state[hf_scope + '.convolution.weight']  # OIHW; depthwise [C, 1, kh, kw]
    if depthwise:
      out[tf_scope + '/depthwise_weights'] = w.transpose(2, 3, 0, 1)
    else:
      out[tf_scope + '/weights'] = w.transpose(2, 3, 1, 0)
    for tf_name, hf_name in (('gamma', 'weight'), ('beta', 'bias'),
                             ('moving_mean', 'running_mean'), ('moving_variance', 'running_var')):
      out[f'{tf_scope}/BatchNorm/{tf_name}'] = state[f'{hf_scope}.normalization.{hf_name}']

  layer('MobilenetV2/Conv', 'conv_stem.first_conv')
  layer('MobilenetV2/expanded_conv/depthwise', 'conv_stem.conv_3x3', depthwise=True)
  layer('MobilenetV2/expanded_conv/project', 'conv_stem.reduce_1x1')
  for i in range(16):
    layer(f'MobilenetV2/expanded_conv_{i + 1}/expand', f'layer.{i}.expand_1x1')
    layer(f'MobilenetV2/expanded_conv_{i + 1}/depthwise', f'layer.{i}.conv_3x3', depthwise=True)
    layer(f'MobilenetV2/expanded_conv_{i + 1}/project', f'layer.{i}.reduce_1x1')
  if head:
    layer('image_pooling', 'segmentation_head.conv_pool')
    layer('aspp0', 'segmentation_head.conv_aspp')
    layer('concat_projection', 'segmentation_head.conv_projection')
    w = state['segmentation_head.classifier.convolution.weight']
    out['logits/semantic/weights'] = w.transpose(2, 3, 1, 0)
    out['logits/semantic/biases'] = state['segmentation_head.classifier.convolution.bias']
  else:  # TF-slim's ImageNet classifier, which DeepLab does not use
    layer('MobilenetV2/Conv_1', 'conv_1x1')
    out['MobilenetV2/Logits/Conv2d_1c_1x1/weights'] = (
        state['classifier.weight'].T[None, None])
    out['MobilenetV2/Logits/Conv2d_1c_1x1/biases'] = state['classifier.bias']
  return out


def _write_tf_checkpoint(arrays, prefix):
  """A TF1 (tf.compat.v1.train.Saver) checkpoint holding exactly `arrays` under their names."""
  import tensorflow as tf
  with tf.Graph().as_default():
    variables = {name: tf.compat.v1.Variable(np.asarray(value)) for name, value in arrays.items()}
    saver = tf.compat.v1.train.Saver(variables)
    with tf.compat.v1.Session() as session:
      session.run(tf.compat.v1.global_variables_initializer())
      saver.save(session, prefix, write_meta_graph=False)
  return prefix


def _with_training_extras(arrays, ema, seed=0):
  """Adds global_step and momentum slots; with `ema`, the true values become moving averages
  and the variables themselves get other random values (which must then be ignored)."""
  rng = np.random.default_rng(seed)
  out = {'global_step': np.int64(30000)}
  for name, value in arrays.items():
    value = np.asarray(value, np.float32)
    if ema:
      out[name + '/ExponentialMovingAverage'] = value
      out[name] = rng.normal(size=value.shape).astype(np.float32)
    else:
      out[name] = value
    if name.endswith('weights'):
      out[name + '/Momentum'] = rng.normal(size=value.shape).astype(np.float32)
  return out


# ---------------------------------------------------------------------------------------------
# Hugging Face MobileNetV2ForSemanticSegmentation, width 1.0 (the published model).

@pytest.fixture(scope='module')
def hf_ref(tmp_path_factory):
  """The published model's architecture at OS8, random weights, saved as safetensors."""
  model = _hf_segmenter(1.0, 8)
  folder = str(tmp_path_factory.mktemp('hf') / 'deeplabv3_mobilenet_v2_1.0_513')
  model.save_pretrained(folder)
  return model, folder


@pytest.fixture(scope='module')
def hf_imported(hf_ref, tmp_path_factory):
  _, folder = hf_ref
  output = str(tmp_path_factory.mktemp('hf_import') / 'run')
  record = importer.import_weights('hf', folder, output, log=lambda *_: None)
  return output, record


@pytest.mark.parametrize('output_stride', [8, 16])
def test_hf_segmenter_logits_match(hf_ref, hf_imported, output_stride):
  # Padding and the image pooling agree at any size (both global means, TF 'SAME' padding):
  # odd, even and unequal sides, sizes not of the form k * output_stride + 1, and a batch.
  model, _ = hf_ref
  if output_stride != 8:  # the same weights in an OS16 network
    model = _hf_segmenter(1.0, output_stride, state=model.state_dict())
  config, variables = _imported(hf_imported[0])
  config.model.output_stride = output_stride
  shape = (1, 49, 49, 3) if output_stride == 8 else (2, 36, 58, 3)
  images = np.random.default_rng(output_stride).uniform(-1, 1, shape).astype(np.float32)
  theirs = _torch_nhwc(lambda x: model(pixel_values=x).logits, images)
  _close(_logits(config.model, variables, images), theirs)


def test_hf_import_records_the_model_and_what_was_skipped(hf_imported):
  output, record = hf_imported
  config = checkpoint.load_config(output)
  assert (config.model.width, config.model.num_classes, config.model.output_stride) == (1.0, 21, 8)
  assert config.model.preprocessing == 'zero_mean_unit_range'
  assert record['contents'] == 'full'
  # 51 conv+BN layers in the backbone (stem, 2 in the first block, 3 in each of 16 more),
  # 3 in the head, and the logits conv with its bias: 51 * 5 + 3 * 5 + 2 variables.
  assert len(record['loaded']) == 51 * 5 + 3 * 5 + 2
  assert record['loaded']['params/head/logits/kernel'] == \
      'segmentation_head.classifier.convolution.weight'
  skipped = record['skipped']
  assert all('conv_1x1' in k or k.endswith('num_batches_tracked') for k in skipped)
  assert 'mobilenet_v2.conv_1x1.convolution.weight' in skipped


def test_hf_pytorch_bin_reads_like_safetensors(hf_ref, hf_imported, tmp_path):
  import shutil
  import torch
  model, folder = hf_ref
  binary = tmp_path / 'bin'
  binary.mkdir()
  shutil.copy(os.path.join(folder, 'config.json'), binary)
  torch.save(model.state_dict(), binary / 'pytorch_model.bin')
  source = hf.read_hf(str(binary))
  reference = mapping.flatten(_imported(hf_imported[0])[1])
  assert set(source.arrays) == set(reference)
  for path, value in reference.items():
    np.testing.assert_array_equal(source.arrays[path], value)


@pytest.mark.parametrize('ema', [False, True])
def test_deeplab_tf_checkpoint_logits_match(hf_ref, tmp_path, ema):
  model, _ = hf_ref
  model = _hf_segmenter(1.0, 16, state=model.state_dict())
  arrays = _with_training_extras(_deeplab_tf_arrays(model.state_dict()), ema)
  prefix = _write_tf_checkpoint(arrays, str(tmp_path / 'ckpt' / 'model.ckpt-30000'))
  output = str(tmp_path / 'run')
  record = importer.import_weights('deeplab-tf', os.path.dirname(prefix), output,
                                  log=lambda *_: None)
  assert record['ema_variables_used'] == (51 * 5 + 3 * 5 + 2 if ema else 0)
  assert 'global_step' in record['skipped']
  config, variables = _imported(output)
  assert (config.model.width, config.model.num_classes, config.model.head) == (1.0, 21, 'reduced')
  images = np.random.default_rng(1).uniform(-1, 1, (2, 36, 58, 3)).astype(np.float32)
  theirs = _torch_nhwc(lambda x: model(pixel_values=x).logits, images)
  _close(_logits(config.model, variables, images), theirs)


def test_a_wrong_width_is_an_error_naming_every_layer(hf_ref, tmp_path):
  from experiments import tiny
  _, folder = hf_ref
  output = str(tmp_path / 'run')
  with pytest.raises(mapping.WeightsMismatchError) as error:
    importer.import_weights('hf', folder, output, tiny.get_config(), log=lambda *_: None)
  message = str(error.value)
  # Every backbone variable and the two head kernels that read the backbone's 320 channels.
  assert 'mis-shaped (257)' in message
  assert ('params/MobilenetV2/Conv/conv/kernel (mobilenet_v2.conv_stem.first_conv.convolution'
          '.weight): file (3, 3, 3, 32), model (3, 3, 3, 16)') in message
  assert not os.path.exists(output)


# ---------------------------------------------------------------------------------------------
# A small Hugging Face segmenter: class counts, training initialisation, eval and predict.

@pytest.fixture(scope='module')
def hf_small(tmp_path_factory):
  model = _hf_segmenter(0.35, 16, seed=3)
  folder = str(tmp_path_factory.mktemp('hf_small') / 'model')
  model.save_pretrained(folder)
  return model, folder


@pytest.fixture(scope='module')
def small_imported(hf_small, tmp_path_factory, data_dir):
  """`main.py import-weights` of the small model with the tiny config."""
  _, folder = hf_small
  output = str(tmp_path_factory.mktemp('small_import') / 'run')
  result = subprocess.run(
      [sys.executable, 'main.py', 'import-weights', '--format', 'hf', folder, '--output', output,
       '--config', 'experiments/tiny.py', f'--config.data.data_dir={data_dir}'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr
  return output, result.stdout


def test_import_command_prints_what_it_loaded(small_imported):
  _, stdout = small_imported
  assert 'loaded 272 variables: 255 backbone, 17 head' in stdout
  assert 'skipped 5: 1280-channel conv of the ImageNet classifier' in stdout
  assert 'next: python main.py eval --workdir' in stdout


def test_predict_on_an_imported_workdir_gives_the_hf_masks(hf_small, small_imported, tmp_path):
  # predict pads to eval_size (161) with the mean pixel (0 after scaling) and upsamples the logits
  # with aligned corners; the same done with PyTorch must give the same classes.
  import torch
  model, _ = hf_small
  workdir, _ = small_imported
  rng = np.random.default_rng(0)
  inputs = tmp_path / 'in'
  inputs.mkdir()
  from PIL import Image
  images = {'a': rng.integers(0, 256, (70, 90, 3), np.uint8),
            'b': rng.integers(0, 256, (97, 41, 3), np.uint8)}
  for name, image in images.items():
    Image.fromarray(image).save(inputs / f'{name}.png')
  # --memory-budget bounds the whole process; this one is a test worker holding many models.
  from seg.predict.options import Options
  assert predict.predict_paths(workdir, str(inputs), str(tmp_path / 'out'),
                               options=Options(memory_budget=64 << 30), log=lambda *_: None) == 0
  for name, image in images.items():
    size = 161  # tiny's eval_size
    padded = np.zeros((1, size, size, 3), np.float32)
    padded[0, :image.shape[0], :image.shape[1]] = image / 127.5 - 1.0
    logits = _torch_nhwc(lambda x: torch.nn.functional.interpolate(
        model(pixel_values=x).logits, size=(size, size), mode='bilinear', align_corners=True),
        padded)
    expected = logits[0, :image.shape[0], :image.shape[1]].argmax(-1)
    mask = np.asarray(Image.open(tmp_path / 'out' / f'{name}.png'))
    assert (mask == expected).mean() > 0.999


def test_eval_accepts_an_imported_workdir(small_imported):
  from seg.inference import evaluate
  workdir, _ = small_imported
  config = checkpoint.load_config(workdir)
  config.data.eval_split = 'val[:8]'  # loading the workdir is the point, not the figure
  report = evaluate.evaluate_workdir(workdir, config, log=lambda *_: None)
  assert report['num_images'] == 8 and report['step'] == 0
  assert 0.0 <= report['miou'] <= 1.0


def _fresh_variables(model_config):
  """Stand-ins for freshly initialised variables: random arrays of the model's shapes."""
  rng = np.random.default_rng(0)
  return jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape).astype(s.dtype),
                                checkpoint.abstract_variables(create_model(model_config)))


def test_train_init_loads_the_whole_network_or_a_new_head(hf_small, small_imported, tiny_config):
  model, _ = hf_small
  workdir, _ = small_imported
  theirs = model.state_dict()
  fresh = _fresh_variables(tiny_config.model)
  stem = theirs['mobilenet_v2.conv_stem.first_conv.convolution.weight'].numpy()
  stem = stem.transpose(2, 3, 1, 0)
  classifier = theirs['segmentation_head.classifier.convolution.weight'].numpy()[:, :, 0, 0].T

  tiny_config.train.init_from = workdir
  logs = []
  loaded = init_from.init_from_workdir(tiny_config, fresh, logs.append)
  assert 'whole network' in logs[-1]
  np.testing.assert_allclose(loaded['params']['MobilenetV2']['Conv']['conv']['kernel'], stem)
  np.testing.assert_allclose(loaded['params']['head']['logits']['kernel'][0, 0], classifier)

  # Another dataset (5 classes): all but the last layer, as DeepLab's initialize_last_layer=False.
  tiny_config.model.num_classes = 5
  fresh5 = _fresh_variables(tiny_config.model)
  whole = loaded
  loaded = init_from.init_from_workdir(tiny_config, dict(fresh5), logs.append)
  assert logs[-1].endswith('all but the logits layer (270 variables) loaded, the logits (2 '
                           'variables) freshly initialised because its classes differ (21; the '
                           "config: 5), as DeepLab's initialize_last_layer=False")
  np.testing.assert_allclose(loaded['params']['MobilenetV2']['Conv']['conv']['kernel'], stem)
  for scope in ('aspp0', 'image_pooling', 'concat_projection'):   # the head below the logits
    np.testing.assert_array_equal(loaded['params']['head'][scope]['conv']['kernel'],
                                  whole['params']['head'][scope]['conv']['kernel'])
    assert not np.array_equal(loaded['params']['head'][scope]['conv']['kernel'],
                              fresh5['params']['head'][scope]['conv']['kernel'])
  np.testing.assert_array_equal(loaded['params']['head']['logits']['kernel'],
                                fresh5['params']['head']['logits']['kernel'])
  tiny_config.train.init_part = 'backbone'
  loaded = init_from.init_from_workdir(tiny_config, dict(fresh5), logs.append)
  assert 'head (17 variables) freshly initialised because train.init_part=backbone' in logs[-1]
  np.testing.assert_array_equal(loaded['params']['head']['aspp0']['conv']['kernel'],
                                fresh5['params']['head']['aspp0']['conv']['kernel'])
  tiny_config.model.head = 'aspp'   # another head: nothing of it fits
  tiny_config.train.init_part = 'auto'
  loaded = init_from.init_from_workdir(tiny_config, _fresh_variables(tiny_config.model),
                                       logs.append)
  assert "freshly initialised because its head differs (21 classes, head 'reduced'" in logs[-1]
  tiny_config.train.init_part = 'all_but_logits'
  with pytest.raises(mapping.WeightsMismatchError, match='init_part=all_but_logits but the head '
                                                         'below its logits layer'):
    init_from.init_from_workdir(tiny_config, _fresh_variables(tiny_config.model), logs.append)
  tiny_config.model.head = 'reduced'
  tiny_config.train.init_part = 'all'
  with pytest.raises(mapping.WeightsMismatchError, match=r'params/head/logits/bias: file \(21,\)'):
    init_from.init_from_workdir(tiny_config, dict(fresh5), logs.append)


def test_a_wrong_class_count_is_an_error(hf_small, tmp_path, tiny_config):
  _, folder = hf_small
  tiny_config.model.num_classes = 5
  with pytest.raises(mapping.WeightsMismatchError,
                     match=r'mis-shaped \(2\):\n.*logits/bias.*file \(21,\), model \(5,\)'):
    importer.import_weights('hf', folder, str(tmp_path / 'run'), tiny_config, log=lambda *_: None)


def test_missing_and_unknown_tf_variables_are_errors(hf_small, tmp_path):
  model, _ = hf_small
  arrays = _deeplab_tf_arrays(model.state_dict())
  del arrays['aspp0/BatchNorm/gamma']
  arrays['decoder/feature_projection0/weights'] = np.zeros((1, 1, 24, 48), np.float32)
  prefix = _write_tf_checkpoint(arrays, str(tmp_path / 'model.ckpt'))
  with pytest.raises(mapping.WeightsMismatchError) as error:
    importer.import_weights('deeplab-tf', prefix, str(tmp_path / 'run'), log=lambda *_: None)
  message = str(error.value)
  assert 'not variables of this network (1):\n  decoder/feature_projection0/weights' in message
  assert 'missing from the file (1):\n  params/head/aspp0/BatchNorm/scale' in message


# ---------------------------------------------------------------------------------------------
# ImageNet backbones: TF-slim and Hugging Face classifiers (width 0.5), Keras (0.35).

@pytest.fixture(scope='module')
def hf_classifier(tmp_path_factory):
  """google/mobilenet_v2_1.0_224's architecture at width 0.5 (1001 ImageNet classes)."""
  import torch
  from transformers import MobileNetV2Config, MobileNetV2ForImageClassification
  torch.manual_seed(5)
  model = MobileNetV2ForImageClassification(
      MobileNetV2Config(depth_multiplier=0.5, num_labels=1001, layer_norm_eps=0.001))
  model = _randomise_torch(model, 5)
  folder = str(tmp_path_factory.mktemp('hf_cls') / 'mobilenet_v2_0.5_224')
  model.save_pretrained(folder)
  return model, folder


@pytest.mark.parametrize('fmt', ['hf', 'deeplab-tf'])
def test_imagenet_backbone_features_match(hf_classifier, tmp_path, fmt):
  model, folder = hf_classifier
  if fmt == 'deeplab-tf':  # TF-slim's mobilenet_v2_0.5_224 names, EMA and RMSProp-era extras
    arrays = _with_training_extras(_deeplab_tf_arrays(model.state_dict(), head=False), ema=True)
    folder = os.path.dirname(_write_tf_checkpoint(
        arrays, str(tmp_path / 'slim' / 'mobilenet_v2_0.5_224.ckpt')))
  output = str(tmp_path / 'run')
  record = importer.import_weights(fmt, folder, output, log=lambda *_: None)
  assert record['contents'] == 'backbone' and len(record['loaded']) == 51 * 5
  assert any('ImageNet classifier' in reason for reason in record['skipped'].values())
  config, variables = _imported(output)
  assert config.model.width == 0.5
  images = np.random.default_rng(2).uniform(-1, 1, (2, 45, 38, 3)).astype(np.float32)
  theirs = _torch_nhwc(lambda x: model(pixel_values=x, output_hidden_states=True)
                       .hidden_states[-1], images)
  _close(_features(0.5, variables, images), theirs)
  with pytest.raises(ValueError, match='backbone weights only'):
    checkpoint.load_model_variables(output, create_model(config.model))


KERAS_SIZE = 65  # a fixed, odd input size: see the Keras note in docs/weights.md


@pytest.fixture(scope='module')
def keras_ref(tmp_path_factory):
  """keras.applications.MobileNetV2(alpha=0.35) with random weights and BN statistics."""
  import keras
  model = keras.applications.MobileNetV2(input_shape=(KERAS_SIZE, KERAS_SIZE, 3), alpha=0.35,
                                         include_top=False, weights=None)
  rng = np.random.default_rng(7)
  for layer in model.layers:
    values = layer.get_weights()
    if isinstance(layer, keras.layers.BatchNormalization):
      gamma, beta, mean, var = values
      layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.2, beta.shape),
                         rng.normal(0, 0.5, mean.shape), rng.uniform(0.5, 2.0, var.shape)])
    elif values:
      kernel = values[0]
      fan_in = np.prod(kernel.shape[:3]) if 'Depthwise' not in type(layer).__name__ \
          else np.prod(kernel.shape[:2])
      layer.set_weights([rng.normal(0, np.sqrt(2.0 / fan_in), kernel.shape)] + values[1:])
  folder = tmp_path_factory.mktemp('keras')
  keras3 = str(folder / 'mobilenet_v2_0.35.weights.h5')
  model.save_weights(keras3)
  from keras.src.legacy.saving import legacy_h5_format  # the format keras.applications ships
  import h5py
  legacy = str(folder / 'mobilenet_v2_0.35_no_top.h5')
  with h5py.File(legacy, 'w') as f:
    legacy_h5_format.save_weights_to_hdf5_group(f, model)
  features = keras.Model(model.input, model.get_layer('block_16_project_BN').output)
  return features, keras3, legacy


@pytest.fixture(scope='module')
def keras_imported(keras_ref, tmp_path_factory):
  _, keras3, _ = keras_ref
  output = str(tmp_path_factory.mktemp('keras_import') / 'run')
  importer.import_weights('keras', keras3, output, log=lambda *_: None)
  return output


@pytest.mark.parametrize('legacy', [False, True])
def test_keras_backbone_features_match(keras_ref, keras_imported, tmp_path, legacy):
  features, keras3, legacy_file = keras_ref
  output = keras_imported
  if legacy:
    output = str(tmp_path / 'run')
    importer.import_weights('keras', legacy_file, output, log=lambda *_: None)
  config, variables = _imported(output)
  assert config.model.width == 0.35
  images = np.random.default_rng(3).uniform(-1, 1, (2, KERAS_SIZE, KERAS_SIZE, 3))
  images = images.astype(np.float32)
  _close(_features(0.35, variables, images), np.asarray(features(images)))


def test_training_from_an_imported_backbone(keras_imported, tiny_config, tmp_path):
  from seg.train import loop
  tiny_config.train.init_from = keras_imported
  # tiny.py's 4 steps: the same training program as other tests, from the session's cache.
  tiny_config.train.steps = 4
  tiny_config.data.eval_split = 'val[:8]'  # training is the point here, not evaluation
  logs = []
  report = loop.train_and_evaluate(tiny_config, str(tmp_path / 'run'), log=logs.append)
  assert any('backbone (255 variables) loaded, head (17 variables) freshly initialised because '
             'it has no head' in line for line in logs), logs
  assert report['num_images'] == 8 and np.isfinite(report['miou'])
  assert os.path.exists(tmp_path / 'run' / 'checkpoints' / '4')


def test_a_model_with_another_input_convention_is_refused(tiny_config):
  # Workdirs record the scaling their weights expect; only [-1, 1] is implemented.
  tiny_config.model.preprocessing = 'imagenet_mean_std'
  with pytest.raises(ValueError, match="preprocessing='imagenet_mean_std' is not implemented"):
    create_model(tiny_config.model)


def _tf_slim_backbone(variables):
  """Our backbone variables under TF-slim's names (the inverse of seg.weights.deeplab_tf)."""
  bn = {'scale': 'gamma', 'bias': 'beta', 'mean': 'moving_mean', 'var': 'moving_variance'}
  out = {}
  for collection in ('params', 'batch_stats'):
    for path, value in flatten_dict(variables[collection]['MobilenetV2']).items():
      *layer, inner, leaf = path
      scope = 'MobilenetV2/' + '/'.join(layer)
      value = np.asarray(value)
      if inner == 'BatchNorm':
        out[f'{scope}/BatchNorm/{bn[leaf]}'] = value
      elif inner == 'depthwise':   # [kh, kw, 1, c] -> TF's [kh, kw, c, 1]
        out[f'{scope}/depthwise_weights'] = value.transpose(0, 1, 3, 2)
      else:
        out[f'{scope}/weights'] = value
  return out


@pytest.mark.parametrize('divisible_by', [1, 8])
def test_import_takes_the_channel_rounding_from_the_files_shapes(tmp_path, tiny_config,
                                                                 divisible_by):
  # A width-0.5 backbone rounded as DeepLab's own models (1) or TF-slim's ImageNet
  # checkpoints (8), written as a TF checkpoint: the import finds the rounding, with or
  # without a config that says otherwise, and the imported features are the original's.
  config = tiny_config
  config.model.width, config.model.divisible_by = 0.5, divisible_by
  model, variables = random_variables(config.model, seed=3)
  prefix = _write_tf_checkpoint(_tf_slim_backbone(variables),
                                str(tmp_path / 'ckpt' / 'mobilenet_v2_0.5_224.ckpt'))
  other = 9 - divisible_by
  given = tiny_config.copy_and_resolve_references()
  given.model.divisible_by = other
  for name, cfg in (('plain', None), ('given', given)):
    lines = []
    importer.import_weights('deeplab-tf', prefix, str(tmp_path / name), cfg, log=lines.append)
    imported = checkpoint.load_config(str(tmp_path / name))
    assert (imported.model.width, imported.model.divisible_by) == (0.5, divisible_by)
    if cfg is not None:
      assert any(f'model.divisible_by={divisible_by}' in line for line in lines)
  _, loaded = _imported(str(tmp_path / 'plain'))
  images = np.random.default_rng(4).uniform(-1, 1, (1, 33, 41, 3)).astype(np.float32)
  backbone = MobileNetV2(width=0.5, divisible_by=divisible_by)
  expected = backbone.apply({k: v['MobilenetV2'] for k, v in variables.items()}, images)
  got = backbone.apply({k: v['MobilenetV2'] for k, v in loaded.items()}, images)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
