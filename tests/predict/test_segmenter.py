"""`seg.predict.Segmenter`: a workdir's model called from Python on files, arrays and PIL images.

The facts: a file's mask and probabilities are those `predict` writes for it (its PNG and
_prob.npy, read back here), arrays and PIL images get the masks of files holding the same
pixels, small images the argmax of the plain Flax model on eval's padded canvas, and colours
and overlays are VOC's palette written out in the test.
"""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from helpers import scene, voc_colormap, write_random_workdir
from experiments import tiny
from seg import predict
from seg.inference.engine import Engine
from seg.predict import Segmenter
from seg.predict import segmenter as segmenter_module

EVAL_SIZE = 161  # tiny.py's
MAX_SIDE = 130   # below the large images' sides, above twice the tiles' overlap


@pytest.fixture(scope='module')
def model(tmp_path_factory):
  """(workdir, Flax model, variables): tiny.py, random weights."""
  workdir = str(tmp_path_factory.mktemp('segmenter') / 'run')
  config = tiny.get_config()
  assert config.data.eval_size == EVAL_SIZE
  return (workdir, *write_random_workdir(workdir, config))


@pytest.fixture(scope='module')
def images(tmp_path_factory):
  """{name: (path, pixels)}: small and large RGB, grey and RGBA PNGs and a large JPEG."""
  folder = tmp_path_factory.mktemp('images')
  rgba = np.dstack([scene(90, 110, 3), np.tile(np.linspace(0, 255, 110), (90, 1))])
  pixels = {'small': scene(100, 120, 1), 'wide': scene(150, 70, 2),
            'grey': scene(80, 96, 4)[..., 0], 'rgba': rgba.astype(np.uint8),
            'large': scene(300, 250, 5), 'photo': scene(280, 360, 6)}
  found = {}
  for name, array in pixels.items():
    path = str(folder / (name + ('.jpg' if name == 'photo' else '.png')))
    Image.fromarray(array).save(path, **({'quality': 92} if name == 'photo' else {}))
    found[name] = (path, array)
  return found


def _predicted(model, images, output, **options):
  """predict_paths on every image, once for the masks and once with float16 probabilities
  (whose masks are argmaxes of other programs: near-ties may differ):
  {name: (mask, probabilities [H, W, C])} read back."""
  workdir = model[0]
  engine, _ = Engine.from_workdir(workdir, batch_size=2)
  paths = [path for path, _ in images.values()]
  for probabilities in ('none', 'float16'):
    failures = predict.predict_paths(
        workdir, paths, str(output / probabilities), predict.Options(
            probabilities=probabilities, memory_budget=16 << 30, **options),
        engine=engine, log=lambda line: None, progress_stream=open(os.devnull, 'w'))
    assert failures == 0
  return {name: (np.asarray(Image.open(output / 'none' / f'{name}.png')),
                 np.moveaxis(np.load(output / 'float16' / f'{name}_prob.npy'), 0, -1).astype(
                     np.float32))
          for name in images}


@pytest.fixture(scope='module')
def segmenter(model):
  return Segmenter(model[0], batch_size=2, max_side=MAX_SIDE)


def test_files_get_the_masks_and_probabilities_predict_writes(model, images, segmenter,
                                                              tmp_path):
  written = _predicted(model, images, tmp_path, max_side=MAX_SIDE)
  names = list(images)
  masks = segmenter([images[name][0] for name in names])
  probabilities = segmenter.probabilities([images[name][0] for name in names])
  for name, mask, probs in zip(names, masks, probabilities):
    expected_mask, expected_probs = written[name]
    assert mask.dtype == np.uint8 and mask.shape == images[name][1].shape[:2], name
    assert np.array_equal(mask, expected_mask), name
    assert probs.shape == mask.shape + (21,)
    np.testing.assert_allclose(probs, expected_probs, atol=1e-3, err_msg=name)  # float16's
  # the large ones were downscaled to fit MAX_SIDE: many classes, not one upscaled blob
  assert len(np.unique(masks[names.index('large')])) > 1
  single = segmenter(images['photo'][0])
  assert np.array_equal(single, masks[names.index('photo')])


def test_small_images_get_the_plain_flax_models_argmax(model, images, segmenter):
  _, flax_model, variables = model
  pixels = images['small'][1]
  canvas = np.full((1, EVAL_SIZE, EVAL_SIZE, 3), 127.5, np.float32)  # eval's padding
  canvas[0, :100, :120] = pixels
  logits = np.asarray(jax.jit(lambda x: flax_model.apply(variables, x, train=False))(
      canvas / 127.5 - 1.0))[0, :100, :120]
  top = np.sort(logits, axis=-1)
  clear = top[..., -1] - top[..., -2] > 1e-3  # near-ties may flip in the last bits
  mask = segmenter(pixels)
  assert clear.mean() > 0.95
  assert np.array_equal(mask[clear], logits.argmax(-1)[clear])


def test_arrays_and_pil_images_get_the_masks_of_their_files(images, segmenter, monkeypatch):
  for name in ('small', 'wide', 'grey', 'rgba', 'large'):  # PNGs: the same pixels exactly
    path, pixels = images[name]
    from_file = segmenter(path)
    assert np.array_equal(segmenter(pixels), from_file), name
    assert np.array_equal(segmenter(Image.open(path)), from_file), name
  grey = images['grey'][1]
  assert np.array_equal(segmenter(grey[..., None]), segmenter(grey))
  batch = np.stack([scene(64, 64, seed) for seed in (7, 8, 9)])
  masks = segmenter(batch)
  assert masks.shape == (3, 64, 64) and masks.dtype == np.uint8
  for mask, pixels in zip(masks, batch):
    assert np.array_equal(mask, segmenter(pixels))
  assert segmenter([]) == [] and segmenter(batch[:0]).shape == (0, 64, 64)
  monkeypatch.setattr(segmenter_module, 'CHUNK', 2)  # a long list: decoded chunk by chunk
  assert np.array_equal(segmenter(batch), masks)
  assert segmenter.probabilities(batch[:0]).shape == (0, 64, 64, 21)


def test_tiles_as_predict_tiles(model, images, tmp_path):
  tiled = Segmenter(model[0], batch_size=2, max_side=MAX_SIDE, large_images='tile')
  large = {name: images[name] for name in ('large', 'small')}
  written = _predicted(model, large, tmp_path, max_side=MAX_SIDE, large_images='tile')
  for name, (path, pixels) in large.items():
    assert np.array_equal(tiled(pixels), written[name][0]), name
    np.testing.assert_allclose(tiled.probabilities(path), written[name][1], atol=1e-3)


def test_colours_overlay_and_names(images, segmenter):
  path, pixels = images['small']
  mask = segmenter(path)
  cmap = voc_colormap()
  assert np.array_equal(segmenter.colours(mask), cmap[mask])
  blended = np.round((pixels.astype(np.float64) + cmap[mask]) / 2)  # halves to even
  expected = np.where(mask[..., None] == 0, pixels, blended).astype(np.uint8)
  assert np.array_equal(segmenter.overlay(pixels, mask), expected)
  assert np.array_equal(segmenter.overlay(path, mask), expected)
  with pytest.raises(ValueError, match='the mask is 10x10, the image 100x120'):
    segmenter.overlay(pixels, mask[:10, :10])
  assert len(segmenter.class_names) == 21 and segmenter.class_names[0] == 'background'
  assert 'step 0' in repr(segmenter) and 'max side 130 (resize)' in repr(segmenter)


def test_bad_inputs_say_what_is_wrong(model, segmenter, tmp_path):
  with pytest.raises(ValueError, match=r'got float32 \(values in \[0, 1\]\? multiply by 255'):
    segmenter(np.zeros((20, 20, 3), np.float32))
  with pytest.raises(ValueError, match=r'got shape \(20, 20, 2\)'):
    segmenter(np.zeros((20, 20, 2), np.uint8))
  with pytest.raises(TypeError, match='got int'):
    segmenter(3)
  with pytest.raises(FileNotFoundError):
    segmenter(str(tmp_path / 'missing.png'))
  broken = tmp_path / 'broken.png'
  broken.write_bytes(b'not a png')
  with pytest.raises(ValueError, match=f'{broken}: not an image'):
    segmenter([str(broken)])
  with pytest.raises(ValueError, match='max_side must exceed 128 to tile'):
    Segmenter(model[0], max_side=100, large_images='tile')


def _numpy_scores(masks, labels, num_classes=21, ignore=255):
  """mIoU, per-class IoU and pixel accuracy over all the pixels, class by class with sets."""
  mask, label = np.concatenate([m.ravel() for m in masks]), np.concatenate(
      [l.ravel() for l in labels])
  valid = label != ignore
  ious = {}
  for c in range(num_classes):
    union = np.sum(((mask == c) | (label == c)) & valid)
    if union:
      ious[c] = np.sum((mask == c) & (label == c) & valid) / union
  return np.mean(list(ious.values())), ious, np.mean(mask[valid] == label[valid])


def test_evaluate_scores_as_numpy_does(images, segmenter, tmp_path):
  names = ['small', 'wide', 'large', 'photo']
  paths = [images[name][0] for name in names]
  masks = segmenter(paths)
  rng = np.random.default_rng(0)
  labels = []
  for mask in masks:  # the masks, a third of them changed, some pixels ignored
    label = np.where(rng.random(mask.shape) < 0.3, rng.integers(0, 21, mask.shape), mask)
    label[rng.random(mask.shape) < 0.05] = 255
    labels.append(label.astype(np.uint8))
  report = segmenter.evaluate(paths, labels)
  miou, ious, accuracy = _numpy_scores(masks, labels)
  assert report['miou'] == pytest.approx(miou) and report['num_images'] == 4
  assert report['pixel_accuracy'] == pytest.approx(accuracy)
  names_of = segmenter.class_names
  for c in range(21):
    expected = ious.get(c)
    got = report['per_class_iou'][names_of[c]]
    assert (got is None) if expected is None else got == pytest.approx(expected), c
  rows = {row['id']: row for row in report['images']}
  for name, mask, label in zip(names, masks, labels):
    assert rows[name]['miou'] == pytest.approx(_numpy_scores([mask], [label])[0]), name
  # label files as a dataset holds them: palette, grey and VOC-coloured PNGs, the same scores
  files = []
  for i, (label, mode) in enumerate(zip(labels, ('P', 'L', 'RGB', 'P'))):
    path = str(tmp_path / f'label{i}.png')
    if mode == 'P':
      png = Image.fromarray(label, 'P')
      png.putpalette(voc_colormap().tobytes())
    elif mode == 'L':
      png = Image.fromarray(label)
    else:
      png = Image.fromarray(voc_colormap()[label])  # 255 -> VOC's void colour
    png.save(path)
    files.append(path)
  from_files = segmenter.evaluate(paths, files)
  assert from_files['confusion_matrix'] == report['confusion_matrix']


def test_evaluate_says_what_is_wrong_with_a_label(images, segmenter, tmp_path):
  path, pixels = images['small']
  label = np.zeros(pixels.shape[:2], np.uint8)
  with pytest.raises(ValueError, match='no images to evaluate'):
    segmenter.evaluate([], [])
  with pytest.raises(ValueError, match='1 image.s. and 2 label.s.'):
    segmenter.evaluate([path], [label, label])
  with pytest.raises(ValueError, match='label of small: 10x120, its image 100x120$'):
    segmenter.evaluate(path, label[:10])
  with pytest.raises(ValueError, match=r'120x100, its image 100x120 \(turned: .* EXIF'):
    segmenter.evaluate(path, label.T)
  label[5, 5] = 30
  with pytest.raises(ValueError, match='label of small: label values 30 are neither classes'):
    segmenter.evaluate(path, label)
  with pytest.raises(ValueError, match='label values 300 are neither'):
    segmenter.evaluate(pixels, np.full(pixels.shape[:2], 300, np.int32))
  odd = tmp_path / 'odd.png'
  Image.fromarray(np.full(pixels.shape, (1, 2, 3), np.uint8)).save(odd)
  with pytest.raises(ValueError, match=r"colours that VOC's colour map .* does not name: "
                                       r'\(1, 2, 3\): 12000 px'):
    segmenter.evaluate(path, str(odd))


def test_a_folder_models_names_and_colours(model, images, tmp_path):
  """A model trained on a dataset folder keeps labelmap.txt's names and colours in its config:
  its masks' colours are those, and colour label PNGs are read through them."""
  config = tiny.get_config()
  own = [(10 * i, 255 - 10 * i, (37 * i) % 256) for i in range(21)]
  config.data.class_colours = ';'.join(f'{r},{g},{b}' for r, g, b in own)
  config.data.class_names = ','.join(f'thing{i}' for i in range(21))
  workdir = str(tmp_path / 'folder-run')
  write_random_workdir(workdir, config)
  segmenter = Segmenter(workdir)
  assert segmenter.class_names[3] == 'thing3'
  path, pixels = images['small']
  mask = segmenter(path)
  assert np.array_equal(segmenter.colours(mask), np.array(own, np.uint8)[mask])
  label = np.where(np.arange(mask.size).reshape(mask.shape) % 7 == 0, 2, mask).astype(np.uint8)
  coloured = tmp_path / 'label.png'
  Image.fromarray(np.array(own, np.uint8)[label]).save(coloured)
  assert (segmenter.evaluate(path, str(coloured))['confusion_matrix'] ==
          segmenter.evaluate(path, label)['confusion_matrix'])
  Image.fromarray(voc_colormap()[label]).save(coloured)  # VOC's colours are not this model's
  with pytest.raises(ValueError, match="colours that the model's class colours does not name"):
    segmenter.evaluate(path, str(coloured))


def _eval_files(*argv):
  from seg.cli import commands, parser
  return commands.run(parser.parse(parser.build_parser(), ['eval', *argv]))


def test_eval_scores_image_and_label_files(model, images, segmenter, tmp_path, capsys):
  """`main.py eval --images --labels`: labels found by relative path (nested) or by name,
  the report `Segmenter.evaluate`'s, as NumPy counts it, written as eval writes it."""
  photos, labels = tmp_path / 'photos', tmp_path / 'labels'
  (photos / 'trip').mkdir(parents=True)
  (labels / 'trip').mkdir(parents=True)
  rng = np.random.default_rng(1)
  masks, truths = [], []
  for name, where in (('small', 'trip/'), ('large', ''), ('photo', 'trip/')):
    path, pixels = images[name]
    os.symlink(path, photos / (where + os.path.basename(path)))
    mask = segmenter(path)
    truth = np.where(rng.random(mask.shape) < 0.2, 0, mask).astype(np.uint8)
    truth[:5] = 255
    png = Image.fromarray(truth, 'P')
    png.putpalette(voc_colormap().tobytes())
    png.save(labels / f'{where if name != "photo" else ""}{name}.png')  # photo: by name only
    masks.append(mask)
    truths.append(truth)
  output = tmp_path / 'report' / 'files.json'
  _eval_files('--workdir', model[0], '--images', str(photos), '--labels', str(labels),
              '--max-side', str(MAX_SIDE), '--output', str(output), '--worst', '2')
  printed = capsys.readouterr()
  report = json.loads(output.read_text())
  miou, ious, accuracy = _numpy_scores(masks, truths)
  assert report['miou'] == pytest.approx(miou) and report['num_images'] == 3
  assert report['pixel_accuracy'] == pytest.approx(accuracy)
  assert {r['id'] for r in report['worst_images']} == {'trip/small', 'large', 'trip/photo'}
  assert f'{100 * miou:.2f}%' in printed.out  # the table
  assert (tmp_path / 'report' / 'files_images.csv').exists()
  assert len(os.listdir(tmp_path / 'report' / 'files_worst')) == 2


def test_eval_files_says_what_is_missing(model, images, tmp_path):
  from seg.cli.commands import CommandError
  photos = tmp_path / 'photos'
  photos.mkdir()
  os.symlink(images['small'][0], photos / 'small.png')
  (tmp_path / 'labels').mkdir()
  with pytest.raises(CommandError, match=r'1 of 1 image\(s\) have no label in .*labels: '
                                         r'small.png \(for the first: no .*labels/small.png'):
    _eval_files('--workdir', model[0], '--images', str(photos), '--labels',
                str(tmp_path / 'labels'))
  with pytest.raises(CommandError, match='--images and --labels go together'):
    _eval_files('--workdir', model[0], '--images', str(photos))
  with pytest.raises(CommandError, match='--max-side goes with --images'):
    _eval_files('--workdir', model[0], '--max-side', '100')
  with pytest.raises(CommandError, match='--config applies to the dataset'):
    _eval_files('--workdir', model[0], '--images', str(photos), '--labels', str(photos),
                '--config.eval.flip=True')
