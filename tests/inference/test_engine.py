"""The inference engine against the Flax model it was folded from (an independent computation)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import (EVAL_SIZE, ROOT, numpy_multi_scale, numpy_resize_aligned,
                     random_variables, tiny_engine_config)
from seg import parallel
from seg.inference import engine, evaluate, float_kernel, fold
from seg.inference.forward import forward, low_precision_from_stride, scaled_size
from seg.model import block_specs
from seg.preprocessing import MEAN_PIXEL, bucket_shape, preprocess

@pytest.fixture(scope='module')
def tiny_model():
  config = tiny_engine_config()
  model, variables = random_variables(config.model)
  return config, model, variables


@pytest.mark.parametrize('overrides,optimized', [
    (dict(output_stride=16), False),
    (dict(output_stride=8, head='aspp', width=0.5), False),
    (dict(width=0.5, divisible_by=1), False),  # DeepLab's rounding: 12-channel residual blocks
    (dict(output_stride=16), True)], ids=['os16', 'os8-aspp', 'width050-div1', 'os16-xla-optimized'])
def test_folded_forward_matches_the_flax_model(overrides, optimized, request):
  if optimized:   # also with XLA's optimisation passes, as users run it
    request.getfixturevalue('xla_optimizations')
  config = tiny_engine_config(**overrides)
  model, variables = random_variables(config.model, seed=1)
  images = np.random.default_rng(1).integers(0, 256, (2, 49, 57, 3)).astype(np.float32)
  expected = np.asarray(jax.jit(lambda v, x: model.apply(v, preprocess(x), train=False))(
      variables, images))
  folded = fold.cast_folded(fold.fold_variables(config.model, variables), jnp.float32)
  got = np.asarray(jax.jit(lambda f, x: forward(
      f, preprocess(x), width=config.model.width,
      output_stride=config.model.output_stride))(folded, images))
  assert got.shape == expected.shape
  assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


@pytest.mark.parametrize('optimized', [False, True], ids=['xla-unoptimized', 'xla-optimized'])
def test_bfloat16_logits_stay_close_to_float32(tiny_model, optimized, request):
  if optimized:   # also with XLA's optimisation passes, as users run it
    request.getfixturevalue('xla_optimizations')
  config, model, variables = tiny_model
  images = np.random.default_rng(2).integers(0, 256, (2, EVAL_SIZE, EVAL_SIZE, 3), np.uint8)
  expected = np.asarray(model.apply(variables, preprocess(images), train=False))
  got = engine.Engine(config, variables, dtype='bfloat16', batch_size=2).logits(images)
  # bfloat16 keeps 8 bits of mantissa (relative step 2^-8 = 0.4%) per product input; over
  # ~20 layers the errors add up to a few percent of the logits' scale, not more.
  rms = lambda x: np.sqrt(np.mean(np.square(x)))
  assert rms(got - expected) <= 0.05 * rms(expected)
  assert rms(got - expected) > 1e-4 * rms(expected)  # it really computed in bfloat16


@pytest.mark.parametrize('from_stride', ['2', '16'])
def test_bfloat16_from_a_chosen_stride(tiny_model, monkeypatch, from_stride):
  # SEG_BF16_FROM_STRIDE (accelerators' default 2, the CPU's 16): which layers' products
  # take bfloat16 inputs, counted in the traced program, and the logits stay close to the
  # Flax model's either way.
  config, model, variables = tiny_model
  monkeypatch.setenv('SEG_BF16_FROM_STRIDE', from_stride)
  folded = fold.cast_folded(fold.fold_variables(config.model, variables), jnp.bfloat16)
  images = preprocess(np.random.default_rng(3).integers(0, 256, (1, EVAL_SIZE, EVAL_SIZE, 3),
                                                        np.uint8))
  run = lambda f, x: forward(f, x, width=config.model.width,
                             output_stride=config.model.output_stride, dtype=jnp.bfloat16)
  jaxpr = jax.make_jaxpr(run)(folded, images)
  low = [e for e in jaxpr.eqns if e.primitive.name == 'dot_general'
         and e.invars[0].aval.dtype == jnp.bfloat16]
  # The products whose input has stride >= from_stride (at most the output stride): the
  # expansion and projection of each such block (block 0 has no expansion), and the head's
  # five (image pooling, its share of the concat projection, aspp0, the concat projection,
  # the logits).
  strides = [2]
  for _, _, stride, _ in block_specs(config.model.width, config.model.output_stride):
    strides.append(strides[-1] * stride)
  threshold = min(int(from_stride), config.model.output_stride)
  want = sum((2 if i else 1) for i, s in enumerate(strides[:-1]) if s >= threshold) + 5
  assert len(low) == want
  got = np.asarray(jax.jit(run)(folded, images))
  expected = np.asarray(model.apply(variables, images, train=False))
  rms = lambda x: np.sqrt(np.mean(np.square(x)))
  assert 1e-4 * rms(expected) < rms(got - expected) <= 0.05 * rms(expected)
  monkeypatch.setenv('SEG_BF16_FROM_STRIDE', '3')
  with pytest.raises(ValueError, match='SEG_BF16_FROM_STRIDE must be auto or one of'):
    low_precision_from_stride()


def test_predict_pads_with_the_mean_pixel_and_crops_back(tiny_model):
  config, model, variables = tiny_model
  rng = np.random.default_rng(3)
  # Two images inside eval_size, one taller than it (next bucket: 2 * 64 + 1 = 129 rows).
  images = [rng.integers(0, 256, shape, np.uint8) for shape in
            [(40, 65, 3), (65, 17, 3), (100, 30, 3)]]
  eng = engine.Engine(config, variables, batch_size=2)
  masks = eng.predict(images)
  apply = jax.jit(lambda v, x: model.apply(v, preprocess(x), train=False))
  for image, mask, canvas in zip(images, masks, [(65, 65), (65, 65), (129, 65)]):
    padded = np.full((1, *canvas, 3), MEAN_PIXEL, np.float32)  # NumPy padding, as eval pads
    padded[0, :image.shape[0], :image.shape[1]] = image
    expected = np.argmax(np.asarray(apply(variables, padded))[0], -1)[:image.shape[0],
                                                                         :image.shape[1]]
    assert mask.dtype == np.uint8 and mask.shape == image.shape[:2]
    # Float32 folding reorders sums: allow a near-tie pixel or two to flip.
    assert (mask == expected).mean() >= 0.999
  # Chunks were (65x65 bucket x2) and (129x65 bucket, padded with a dummy image): 2 shapes.
  assert sorted(k[2:4] for k in eng.compile_seconds) == [(65, 65), (129, 65)]
  again = eng.predict(np.stack([images[0][:, :65]] * 3))  # an array of 3 images
  assert again.shape == (3, 40, 65) and len(eng.compile_seconds) == 2  # nothing recompiled
  np.testing.assert_array_equal(again[2], masks[0])


def test_a_batch_split_over_devices_gives_the_one_device_results(tiny_model):
  config, _, variables = tiny_model
  devices = jax.local_devices()[:2]
  assert len(set(devices)) == 2
  rng = np.random.default_rng(4)
  images = [rng.integers(0, 256, shape, np.uint8) for shape in
            [(40, 65, 3), (65, 17, 3), (60, 60, 3), (30, 50, 3), (65, 65, 3)]]
  one = engine.Engine(config, variables, batch_size=4)
  expected_masks, expected_logits = one.predict(images), one.logits(images)
  for batch_size, parts in ((4, 2), (3, 1)):   # 3 images do not split over 2 devices
    split = engine.Engine(config, variables, batch_size=batch_size, devices=devices,
                          split_batches=True)
    for mask, expected in zip(split.predict(images), expected_masks):
      np.testing.assert_array_equal(mask, expected)
    for logits, expected in zip(split.logits(images), expected_logits):
      np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    # Each part ran on its own device: batch_size / parts images there.
    assert {(k[1], k[4]) for k in split.compile_seconds} == {
        (batch_size // parts, device) for device in devices[:parts]}


def test_batches_run_whole_where_the_kernels_run_the_network_and_the_class_map(tiny_model):
  """By default a batch is split over the devices unless the CPU kernels run both the
  network and the class map's upsampling and argmax (they use every core themselves)."""
  config, _, variables = tiny_model
  devices = jax.local_devices()[:2]
  make = lambda **kwargs: engine.Engine(config, variables, batch_size=4, devices=devices,
                                        **kwargs)
  for kwargs in ({'f32_formulation': 'xla', 'upsample_argmax': 'xla'},
                 {'f32_formulation': 'xla', 'upsample_argmax': 'kernel'}):
    eng = make(**kwargs)
    assert eng.split_batches and eng.parts(4) == 2 and eng.parts(3) == 1
  if not float_kernel.available(jnp.float32):
    pytest.skip(f'no CPU kernel here: {float_kernel.unavailable_reason(jnp.float32)}')
  eng = make(f32_formulation='kernel', upsample_argmax='kernel')
  assert (eng.f32_formulation, eng.split_batches, eng.parts(4)) == ('kernel', False, 1)
  assert make(f32_formulation='kernel', upsample_argmax='xla').parts(4) == 2
  assert make(f32_formulation='kernel', split_batches=True).parts(4) == 2


@pytest.mark.parametrize('size, expected', [((10, 10), (65, 65)), ((65, 65), (65, 65)),
                                            ((66, 3), (129, 65)), ((129, 130), (129, 193)),
                                            ((500, 375), (513, 385))])
def test_bucket_shape(size, expected):
  assert bucket_shape(*size, eval_size=EVAL_SIZE) == expected


def test_bad_inputs_are_clear_errors(tiny_model):
  config, _, variables = tiny_model
  with pytest.raises(ValueError, match='dtype'):
    engine.Engine(config, variables, dtype='float16')
  eng = engine.Engine(config, variables)
  with pytest.raises(ValueError, match='uint8'):
    eng.predict([np.zeros((10, 10), np.uint8)])
  with pytest.raises(ValueError, match='empty'):
    eng.predict([np.zeros((0, 10, 3), np.uint8)])


@pytest.mark.parametrize('upsample_argmax', ['xla', 'kernel'])
def test_pmapped_eval_counts_batches_of_two_shapes(tiny_model, upsample_argmax):
  # The evaluation step (engine forward, psum over 4 devices) against a NumPy confusion
  # matrix of the Flax model's predictions, for batches of two padded shapes; with the
  # logits' upsampling and argmax in XLA and in the CPU kernel (`main.py eval`'s on x86).
  if upsample_argmax == 'kernel' and not float_kernel.available(jnp.float32):
    pytest.skip(f'no CPU kernel here: {float_kernel.unavailable_reason(jnp.float32)}')
  config, model, variables = tiny_model
  config = config.copy_and_resolve_references()
  num_classes = config.model.num_classes
  p_eval_step = evaluate.make_p_eval_step(model, config, upsample_argmax=upsample_argmax)
  replicated = parallel.replicate(variables)
  rng = np.random.default_rng(4)
  apply = jax.jit(lambda v, x: model.apply(v, preprocess(x), train=False))
  for shape in [(65, 65), (129, 65)]:
    # uint8 canvases with each image's size, as `eval_batches` sends them: the second
    # image fills only the top-left of its canvas (the rest is padding, the mean pixel).
    images = rng.integers(0, 256, (4, *shape, 3)).astype(np.uint8)
    sizes = np.array([shape, (shape[0] - 9, shape[1] - 20), shape, shape], np.int32)
    reference = images.astype(np.float32)
    reference[1, sizes[1, 0]:], reference[1, :, sizes[1, 1]:] = MEAN_PIXEL, MEAN_PIXEL
    labels = rng.integers(0, num_classes, (4, *shape)).astype(np.uint8)
    labels[:, :5] = 255
    mask = np.array([1, 1, 1, 0], np.float32)
    batch = {'image': images, 'size': sizes, 'label': labels, 'mask': mask}
    out = p_eval_step(replicated, parallel.shard(batch))
    got = np.asarray(out['confusion'][0])
    predictions = np.argmax(np.asarray(apply(variables, reference)), -1)
    valid = (labels != 255) & (mask[:, None, None] > 0)
    expected = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(expected, (labels[valid], predictions[valid]), 1)
    assert got.sum() == expected.sum()
    assert np.abs(got - expected).sum() <= 4  # a near-tie pixel may flip class
    # Each example's labelled, predicted and correct pixels per class, in batch order (one
    # example per device here); the padding example counts nothing.
    counts = parallel.local_rows(out['counts'])
    assert counts.shape == (4, 3, num_classes)
    for i in range(4):
      keep = valid[i]
      expected_counts = [np.bincount(labels[i][keep], minlength=num_classes),
                         np.bincount(predictions[i][keep], minlength=num_classes),
                         np.bincount(labels[i][keep & (labels[i] == predictions[i])],
                                     minlength=num_classes)]
      assert np.abs(counts[i] - np.array(expected_counts)).sum() <= 6   # near-ties
    assert not counts[3].any() and counts[:3, 0].sum() == valid.sum()


def test_multi_scale_flipped_eval_averages_softmax_like_deeplab(tiny_model):
  # NumPy reference of DeepLab's multi-scale + flip inference (`numpy_multi_scale`): the image
  # resized to (65 - 1) * s + 1 (33 and 81, on the stride-16 grid), logits at the output
  # stride straight back to 65x65, softmax, flipped copies flipped back, mean, argmax; one
  # confusion matrix.
  config, model, variables = tiny_model
  config = config.copy_and_resolve_references()
  config.eval.scales, config.eval.flip = (0.5, 1.25), True
  num_classes = config.model.num_classes
  rng = np.random.default_rng(6)
  images = rng.integers(0, 256, (4, EVAL_SIZE, EVAL_SIZE, 3)).astype(np.uint8)
  labels = rng.integers(0, num_classes, (4, EVAL_SIZE, EVAL_SIZE)).astype(np.uint8)
  batch = {'image': images, 'size': np.full((4, 2), EVAL_SIZE, np.int32), 'label': labels,
           'mask': np.ones(4, np.float32)}
  got = np.asarray(evaluate.make_p_eval_step(model, config)(
      parallel.replicate(variables), parallel.shard(batch))['confusion'][0])

  features = jax.jit(lambda x: model.apply(variables, x, train=False, upsample=False))
  predictions = np.stack([numpy_multi_scale(features, image, EVAL_SIZE, (33, 81)).argmax(-1)
                          for image in images])
  expected = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(expected, (labels.reshape(-1), predictions.reshape(-1)), 1)
  assert got.sum() == expected.sum() == labels.size
  assert np.abs(got - expected).sum() <= 8  # near-ties may flip under float32 reordering
  # One scale of the average differs from the plain evaluation on this random model.
  x = (images / 127.5 - 1.0).astype(np.float32)
  single = np.argmax(numpy_resize_aligned(np.asarray(features(x)), (65, 65)), -1)
  assert (single != predictions).mean() > 0.01


@pytest.mark.parametrize('scale', [0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0])
def test_scaled_sizes_stay_on_the_feature_grid(scale):
  # DeepLab's int((size - 1) * s + 1) where that is on the grid (its 513 canvas and its
  # scales), else the nearest k * stride + 1.
  assert scaled_size(513, scale) == int(512 * scale + 1)
  for size, stride in [(161, 16), (161, 8), (65, 16), (129, 32), (97, 16)]:
    got = scaled_size(size, scale, stride)
    assert (got - 1) % stride == 0 and abs(got - 1 - (size - 1) * scale) <= stride / 2
  assert scaled_size(161, 1.25) == 209 and \
      scaled_size(161, 0.75) == 129


def test_multi_scale_engine_gives_deeplabs_average_on_the_padded_canvas(tiny_model):
  # What `predict --scales 0.5,1.25 --flip` runs, against NumPy and the Flax model: each image
  # padded (bottom, right) to the 65x65 canvas, the whole canvas resized to 33 and 81 and
  # flipped, the logits resized back, softmax, flips undone, mean; then cropped.
  config, model, variables = tiny_model
  eng = engine.Engine(config, variables, batch_size=2, scales=(0.5, 1.25), flip=True)
  assert eng.multi_scale and eng.features_are_probabilities
  rng = np.random.default_rng(11)
  images = [rng.integers(0, 256, shape).astype(np.uint8) for shape in
            [(50, 60, 3), (65, 41, 3), (30, 65, 3)]]
  features = jax.jit(lambda x: model.apply(variables, x, train=False, upsample=False))
  expected = [numpy_multi_scale(features, image, EVAL_SIZE, (33, 81)) for image in images]
  probabilities = eng.probabilities(images)
  masks = eng.predict(images)
  for image, p, mask, (canvas_scores, canvas), want in zip(
      images, probabilities, masks, eng.features(images), expected):
    h, w = image.shape[:2]
    assert p.shape == (h, w, config.model.num_classes) and mask.shape == (h, w)
    np.testing.assert_allclose(p, want[:h, :w], atol=1e-5)
    np.testing.assert_allclose(canvas_scores, want, atol=1e-5)
    assert canvas == (EVAL_SIZE, EVAL_SIZE)
    top = np.sort(want[:h, :w], -1)
    clear = top[..., -1] - top[..., -2] > 2e-5   # random weights: close probabilities
    assert clear.mean() > 0.98
    assert np.array_equal(mask[clear], want[:h, :w].argmax(-1)[clear])
  # The plain pass's logits stay available, and its classes differ from the average's here.
  plain = eng.logits(images[:1])[0].argmax(-1)
  assert (plain != masks[0]).mean() > 0.01
  # `eval` with config.eval.scales / flip scores these masks: its pmapped step on the same
  # images, padded on one canvas as `eval_batches` sends them (a fourth example is padding).
  config = config.copy_and_resolve_references()
  config.eval.scales, config.eval.flip = (0.5, 1.25), True
  canvas = np.zeros((4, EVAL_SIZE, EVAL_SIZE, 3), np.uint8)
  sizes = np.ones((4, 2), np.int32)
  labels = rng.integers(0, config.model.num_classes, (4, EVAL_SIZE, EVAL_SIZE)).astype(np.uint8)
  for i, image in enumerate(images):
    canvas[i, :image.shape[0], :image.shape[1]] = image
    sizes[i] = image.shape[:2]
    labels[i, image.shape[0]:], labels[i, :, image.shape[1]:] = 255, 255
  batch = {'image': canvas, 'size': sizes, 'label': labels,
           'mask': np.array([1, 1, 1, 0], np.float32)}
  got = np.asarray(evaluate.make_p_eval_step(model, config)(
      parallel.replicate(variables), parallel.shard(batch))['confusion'][0])
  expected = np.zeros_like(got)
  for image, mask, label in zip(images, masks, labels):
    crop = label[:image.shape[0], :image.shape[1]]
    np.add.at(expected, (crop.ravel(), mask.ravel()), 1)
  assert got.sum() == expected.sum() == sum(image.shape[0] * image.shape[1] for image in images)
  assert np.abs(got - expected).sum() <= 8   # near-ties may flip under float32 reordering


def test_scales_must_be_positive(tiny_model):
  config, _, variables = tiny_model
  with pytest.raises(ValueError, match='scales must be positive'):
    engine.Engine(config, variables, scales=(1.0, 0.0))


CACHE_SCRIPT = r'''
import sys, time
import jax
events = []
jax.monitoring.register_event_listener(lambda name, **kwargs: events.append(name))
jax.config.update('jax_compilation_cache_dir', sys.argv[1])  # as main.py does
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)  # tiny model: fast compiles
from experiments import tiny
from seg.inference import benchmark, engine
from seg.model import create_model
config = tiny.get_config()
config.data.eval_size = 65
variables = benchmark.random_variables(create_model(config.model))
engine.Engine(config, variables).compiled('classes', 1, 65, 65)
assert '/jax/compilation_cache/cache_hits' not in events
jax.clear_caches()  # forget the in-memory executables: only the disk cache is left
engine.Engine(config, variables).compiled('classes', 1, 65, 65)
print('hits', events.count('/jax/compilation_cache/cache_hits'))
'''


def test_ahead_of_time_compiles_come_back_from_the_persistent_cache(tmp_path):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  result = subprocess.run([sys.executable, '-c', CACHE_SCRIPT, str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith('hits 1')
  assert any(name.startswith('jit_class_map') for name in os.listdir(tmp_path))
