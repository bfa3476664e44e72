"""Batch mask generation (`seg/predict/`, `main.py predict`) on generated files.

Also reading (`seg/predict/images.py`), input collection (`seg/predict/files.py`) and the
files written (`seg/predict/outputs.py`).

A tiny model with random weights is written once per module into a workdir;
masks are checked against the plain Flax model applied in the test to the
same pixels (padded with the mean pixel as evaluation pads), and pixels are
checked against NumPy conversions of the same files.
"""

import io
import os
import struct
import subprocess
import sys
import zlib

import jax
import numpy as np
import pytest
from PIL import Image

from helpers import ROOT, numpy_multi_scale, scene, voc_colormap, write_random_workdir
from experiments import tiny
from seg import checkpoint, predict
from seg.inference.engine import Engine
from seg.inference import forward
from seg.predict import large_images
from seg.predict.progress import Progress, RunReport
from seg.predict.files import collect_inputs, plan_jobs
from seg.predict import images as images_module
from seg.predict.images import load_image, load_rgb
from seg.model import create_model

EVAL_SIZE = 161  # tiny.py's: every test image up to 161 pixels shares one compiled shape


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
  """(workdir, model, variables): tiny.py with random weights and BatchNorm statistics."""
  workdir = str(tmp_path_factory.mktemp('predict') / 'run')
  return (workdir, *write_random_workdir(workdir, tiny.get_config()))


@pytest.fixture(scope='module')
def engine(model_dir):
  workdir, _, _ = model_dir
  predictor, step = Engine.from_workdir(workdir, batch_size=2)
  assert step == 0 and predictor.eval_size == EVAL_SIZE
  return predictor


@pytest.fixture(scope='module')
def reference(model_dir):
  """image [h, w, 3] uint8 (h, w <= 161) -> logits [h, w, 21] of the plain Flax model."""
  _, model, variables = model_dir
  apply = jax.jit(lambda x: model.apply(variables, x, train=False))

  def logits(image, full_canvas=False):
    h, w = image.shape[:2]
    padded = np.full((1, EVAL_SIZE, EVAL_SIZE, 3), 127.5, np.float32)
    padded[0, :h, :w] = image
    out = np.asarray(apply(padded / 127.5 - 1.0))[0]
    return out if full_canvas else out[:h, :w]
  return logits


def _assert_same_classes(mask, logits, near_tie=1e-3):
  """mask == argmax(logits), except where the two best logits are within `near_tie`.

  Batched and single-image XLA results may differ in the last bits; only
  near-ties may then flip.
  """
  assert mask.shape == logits.shape[:2]
  top = np.sort(logits, axis=-1)
  clear = top[..., -1] - top[..., -2] > near_tie
  assert np.array_equal(mask[clear], logits.argmax(-1)[clear])
  assert clear.mean() > 0.95


def _read_mask(path):
  png = Image.open(path)
  assert png.mode == 'P'
  return np.asarray(png)


def _run(engine, inputs, output, **options):
  options.setdefault('memory_budget', 16 << 30)  # the test process holds more than a run
  lines = []
  stream = io.StringIO()
  failures = predict.predict_paths('unused', inputs, str(output), predict.Options(**options),
                                   engine=engine, log=lines.append, progress_stream=stream)
  return failures, '\n'.join(lines), stream.getvalue()


# ----------------------------------------------------------------------------------------------
# Masks, colours, overlay, probabilities.


def test_masks_are_the_plain_models_argmax_at_the_original_size(engine, reference, tmp_path):
  inputs = tmp_path / 'in'
  (inputs / 'sub' / 'deeper').mkdir(parents=True)
  images = {'a.jpg': scene(70, 90, 0), 'sub/b.png': scene(161, 100, 1),
            'sub/deeper/c.png': scene(40, 41, 2)}
  for name, image in images.items():
    Image.fromarray(image).save(inputs / name)
  failures, summary, progress = _run(engine, [str(inputs)], tmp_path / 'out', overlay=True)
  assert failures == 0 and 'processed         3' in summary
  assert 'images/s' in progress and 'ETA' in progress
  cmap = voc_colormap()
  classes_seen = set()
  for name, image in images.items():
    stem = tmp_path / 'out' / os.path.splitext(name)[0]
    pixels = load_rgb(str(inputs / name))  # the JPEG's decoded pixels
    mask = _read_mask(f'{stem}.png')
    _assert_same_classes(mask, reference(pixels))
    classes_seen |= set(np.unique(mask))
    palette = np.asarray(Image.open(f'{stem}.png').getpalette()[:768], np.uint8).reshape(-1, 3)
    np.testing.assert_array_equal(palette, cmap)
    np.testing.assert_array_equal(np.asarray(Image.open(f'{stem}_color.png')), cmap[mask])
    overlay = np.asarray(Image.open(f'{stem}_overlay.jpg'), np.float32)
    blend = np.where(mask[..., None] > 0, (pixels + cmap[mask].astype(np.float32)) / 2, pixels)
    # Equal to the blend up to JPEG: compare with the blend through the same JPEG encoder.
    encoded = io.BytesIO()
    Image.fromarray(np.round(blend).astype(np.uint8)).save(encoded, format='JPEG', quality=90)
    expected = np.asarray(Image.open(encoded), np.float32)
    assert overlay.shape == pixels.shape and np.abs(overlay - expected).mean() < 0.5
  assert len(classes_seen) > 1  # the check above is not about a constant mask
  assert sorted(os.listdir(inputs)) == ['a.jpg', 'sub']  # inputs untouched
  assert sorted(os.listdir(inputs / 'sub')) == ['b.png', 'deeper']


def test_png_writer_strips_decode_to_the_rows_written():
  """seg.predict.png against Pillow's decoder: palette and RGB rows given in uneven strips
  (one row, a strided RGB view of 4-byte pixels as `outputs.colours` may give), and the
  colour lookup against the VOC palette written out here."""
  from seg.predict import outputs
  from seg.predict.png import PngWriter
  rng = np.random.default_rng(3)
  mask = np.repeat(np.repeat(rng.integers(0, 21, (30, 20)), 9, 0), 7, 1)[:263, :139]
  mask[100:110] = rng.integers(0, 256, (10, 139))     # noise: rows unlike the row above
  mask = mask.astype(np.uint8)
  cmap = voc_colormap()
  np.testing.assert_array_equal(outputs.colours(mask), cmap[mask])
  rgba = np.concatenate([cmap[mask], np.full(mask.shape + (1,), 77, np.uint8)], -1)
  for rows, palette in ((mask, cmap), (rgba[..., :3], None)):
    buffer = io.BytesIO()
    png = PngWriter(buffer, 139, 263, palette=palette)
    for start, stop in ((0, 1), (1, 100), (100, 101), (101, 263)):
      png.write(rows[start:stop])
    png.close()
    decoded = Image.open(io.BytesIO(buffer.getvalue()))
    assert decoded.mode == ('P' if palette is not None else 'RGB')
    np.testing.assert_array_equal(np.asarray(decoded), rows)
  with pytest.raises(ValueError, match='rows of shape'):
    PngWriter(io.BytesIO(), 139, 263).write(mask[:5])   # palette rows to an RGB file


@pytest.mark.parametrize('own_palette', [False, True])
@pytest.mark.parametrize('in_kernel', [False, True])
def test_the_overlay_is_the_half_blend_rounded_as_numpy_rounds(in_kernel, own_palette):
  """`outputs.overlay` (NumPy's integers, or the kernel library) against the float blend
  rounded by NumPy (halves to even): every pixel value and class, both parities of pixel +
  colour, background kept, widths not a multiple of the kernel's 32 pixels; in VOC's
  colours or a model's own (a folder dataset's labelmap.txt)."""
  from seg.predict import outputs, png
  if in_kernel and not png.kernel():
    pytest.skip('the kernel library does not run here')
  rng = np.random.default_rng(11)
  rgb = rng.integers(0, 256, (300, 257, 3)).astype(np.uint8)
  mask = rng.integers(0, 22, (300, 257)).astype(np.uint8)
  mask[:40] = 0
  palette = rng.integers(0, 256, (256, 3)).astype(np.uint8) if own_palette else None
  colour = (voc_colormap() if palette is None else palette)[mask].astype(np.float32)
  expected = np.where(mask[..., None] > 0, np.round(rgb * np.float32(0.5) + colour * 0.5), rgb)
  got = outputs.overlay(rgb, mask, in_kernel, palette=palette)
  assert got.dtype == np.uint8 and np.array_equal(got, expected.astype(np.uint8))
  assert (((rgb.astype(int) + colour.astype(int)) % 2 == 1) & (mask[..., None] > 0)).any()


def test_writable_pixels_are_the_images_own_memory():
  """`images.writable_pixels`: a view of an RGB image's pixels (Pillow's 4 bytes a pixel)
  that equals its values and writes into the image; None for other modes and for an image
  held in a chain of blocks (above Pillow's 16 MB block: 4.3 MP here)."""
  from seg.predict import images
  rng = np.random.default_rng(3)
  values = rng.integers(0, 256, (1800, 2400, 3)).astype(np.uint8)
  previous = Image.core.get_use_block_allocator()
  try:
    Image.core.set_use_block_allocator(0)
    assert images.writable_pixels(Image.fromarray(values)) is None   # 17 MB: chained
    Image.core.set_use_block_allocator(1)
    image = Image.fromarray(values)
    pixels = images.writable_pixels(image)
  finally:
    Image.core.set_use_block_allocator(previous)
  assert pixels.shape == values.shape and pixels.strides == (4 * 2400, 4, 1)
  np.testing.assert_array_equal(pixels, values)
  pixels[7, 11] = (1, 2, 3)
  assert image.getpixel((11, 7)) == (1, 2, 3)
  assert images.writable_pixels(Image.fromarray(values[..., 0])) is None   # mode L
  small = Image.fromarray(values[:50, :60])   # one block under any allocator
  np.testing.assert_array_equal(images.writable_pixels(small), values[:50, :60])


@pytest.mark.parametrize('in_kernel', [False, True])
def test_the_blend_in_place_on_4_byte_pixels_is_the_overlay(in_kernel):
  """`outputs.blend` on pixels 4 bytes apart (Pillow's layout) gives `overlay`'s values and
  leaves the fourth byte alone; a read-only or misshapen array is refused."""
  from seg.predict import outputs, png
  if in_kernel and not png.kernel():
    pytest.skip('the kernel library does not run here')
  rng = np.random.default_rng(12)
  rgbx = rng.integers(0, 256, (120, 301, 4)).astype(np.uint8)
  mask = rng.integers(0, 22, (120, 301)).astype(np.uint8)
  expected = outputs.overlay(rgbx[..., :3], mask, in_kernel=False)
  fourth = rgbx[..., 3].copy()
  outputs.blend(rgbx[..., :3], mask, in_kernel)
  np.testing.assert_array_equal(rgbx[..., :3], expected)
  np.testing.assert_array_equal(rgbx[..., 3], fourth)
  frozen = np.zeros((120, 301, 3), np.uint8)
  frozen.flags.writeable = False
  with pytest.raises(ValueError, match='read-only'):
    outputs.blend(frozen, mask)
  with pytest.raises(ValueError, match=r'pixels \[h, w, 3\]'):
    outputs.blend(np.zeros((120, 300, 3), np.uint8), mask)


def test_the_overlay_of_a_downscaled_photo_is_blended_in_pillows_memory(engine, tmp_path,
                                                                       monkeypatch):
  """A photo above the eval size: its overlay JPEG is blended in the decoded image's own
  memory (a 4.3 MP photo, above Pillow's 16 MB block) and is byte for byte the JPEG of
  `overlay` on its decoded pixels and mask, encoded as before."""
  from seg.predict import outputs
  seen = []
  monkeypatch.setattr(outputs, 'writable_pixels',
                      lambda image: seen.append(images_module.writable_pixels(image)) or seen[-1])
  photo = np.asarray(Image.fromarray(scene(180, 240, 4)).resize((2400, 1800)))
  Image.fromarray(photo).save(tmp_path / 'photo.jpg', quality=92)
  assert _run(engine, [str(tmp_path / 'photo.jpg')], tmp_path / 'out', overlay=True)[0] == 0
  assert len(seen) == 1 and seen[0] is not None
  mask = _read_mask(tmp_path / 'out' / 'photo.png')
  encoded = io.BytesIO()
  Image.fromarray(outputs.overlay(load_rgb(str(tmp_path / 'photo.jpg')), mask)).save(
      encoded, format='JPEG', quality=90)
  assert (tmp_path / 'out' / 'photo_overlay.jpg').read_bytes() == encoded.getvalue()
  assert len(np.unique(mask)) > 1


def _png_stream(data: bytes):
  """(IHDR's width, height, colour type; the zlib-decompressed IDAT bytes: zlib checks the
  stream's Adler-32; the PLTE bytes or None) of a PNG file, every chunk's CRC checked."""
  assert data[:8] == b'\x89PNG\r\n\x1a\n'
  at, chunks = 8, {}
  while at < len(data):
    size, kind = struct.unpack('>I4s', data[at:at + 8])
    body = data[at + 8:at + 8 + size]
    assert struct.unpack('>I', data[at + 8 + size:at + 12 + size])[0] == zlib.crc32(kind + body)
    chunks.setdefault(kind, []).append(body)
    at += 12 + size
  assert list(chunks)[-1] == b'IEND'
  width, height, _, colour_type = struct.unpack('>IIBB', chunks[b'IHDR'][0][:10])
  return (width, height, colour_type, zlib.decompress(b''.join(chunks[b'IDAT'])),
          chunks.get(b'PLTE', [None])[0])


def _up_filtered(rows: np.ndarray) -> bytes:
  """PNG's 'Up' filter of [h, w] or [h, w, 3] uint8 rows, each with its filter type byte 2."""
  flat = rows.reshape(len(rows), -1).astype(np.int16)
  above = np.concatenate([np.zeros_like(flat[:1]), flat[:-1]])
  return np.concatenate([np.full((len(rows), 1), 2), (flat - above) % 256], 1).astype(
      np.uint8).tobytes()


@pytest.mark.parametrize('width', [1, 31, 32, 33, 139, 1300])
def test_mask_png_writer_writes_the_up_filtered_rows_in_the_kernel(width):
  """seg.predict.png.MaskPngWriter (the kernel library's deflate, from class indices) against
  independent decoders: zlib's inflate (checking its Adler-32) gives exactly the Up-filtered
  rows of the indices (palette PNG) and of their VOC colours (RGB PNG, computed here), and
  Pillow decodes both images; masks of runs longer than a deflate copy, rows like the row
  above, noise rows of any byte value (rare symbols), given in uneven strips (a block of
  codes fitted to each)."""
  from seg.predict import png
  if not png.kernel():
    pytest.skip('the kernel library does not run here')
  rng = np.random.default_rng(width)
  height = 70
  mask = np.repeat(rng.integers(0, 21, (height, max(1, width // 97 + 1))), 97, 1)[:, :width]
  mask[::9] = np.repeat(rng.integers(0, 21, (len(mask[::9]), 1)), width, 1)  # whole-row runs
  mask[20:23] = rng.integers(0, 256, (3, width))  # noise
  mask[40:50] = mask[39]  # rows equal to the row above
  mask = mask.astype(np.uint8)
  cmap = voc_colormap()
  for colour in (False, True):
    buffer = io.BytesIO()
    writer = png.MaskPngWriter(buffer, width, height, cmap, colour)
    for start, stop in ((0, 1), (1, 2), (2, 45), (45, 45), (45, 70)):
      writer.write(mask[start:stop])
    writer.close()
    w, h, colour_type, raw, palette = _png_stream(buffer.getvalue())
    assert (w, h, colour_type) == (width, height, 2 if colour else 3)
    expected = cmap[mask] if colour else mask
    assert raw == _up_filtered(expected)
    assert palette == (None if colour else cmap.tobytes())
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(buffer.getvalue()))),
                                  expected)
  with pytest.raises(ValueError, match='rows of'):
    png.MaskPngWriter(io.BytesIO(), width, height, cmap, True).write(mask[:2, :, None])
  with pytest.raises(ValueError, match='rows written of'):
    writer = png.MaskPngWriter(io.BytesIO(), width, height, cmap, True)
    writer.write(mask[:5])
    writer.close()


def test_mask_png_codes_stay_within_deflates_15_bits():
  """Symbol counts as skewed as Fibonacci's numbers (25 values, 1 to 75,025 times: Huffman's
  code for them would run to 24 bits, deflate allows 15): zlib's inflate still gives the
  Up-filtered rows of both PNGs and Pillow decodes them."""
  from seg.predict import png
  if not png.kernel():
    pytest.skip('the kernel library does not run here')
  counts = [1, 1]
  while len(counts) < 25:
    counts.append(counts[-1] + counts[-2])
  values = np.repeat(np.arange(1, 26, dtype=np.uint8), counts)
  np.random.default_rng(0).shuffle(values)
  width = 1024
  noise = np.resize(values, (len(values) + width - 1) // width * width).reshape(-1, width)
  mask = np.zeros((2 * len(noise), width), np.uint8)
  mask[1::2] = noise  # each noise row under a row of zeros: its bytes are the literals
  cmap = voc_colormap()
  for colour in (False, True):
    buffer = io.BytesIO()
    writer = png.MaskPngWriter(buffer, width, len(mask), cmap, colour)
    writer.write(mask)
    writer.close()
    expected = cmap[mask] if colour else mask
    assert _png_stream(buffer.getvalue())[3] == _up_filtered(expected)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(buffer.getvalue()))),
                                  expected)


def test_the_masks_are_the_same_images_either_way(tmp_path, monkeypatch):
  """`outputs.write_masks` through the kernel and through zlib (SEG_MASK_PNG=zlib): the two
  PNGs decode to the same class map and colours, the kernel's smaller than zlib level 1's
  (PngWriter with the default strategy) on a mask of regions."""
  from seg.predict import outputs, png
  if not png.kernel():
    pytest.skip('the kernel library does not run here')
  rng = np.random.default_rng(5)
  mask = np.repeat(np.repeat(rng.integers(0, 21, (12, 16)), 41, 0), 37, 1)[:480, :590]
  mask = mask.astype(np.uint8)
  decoded = {}
  for way in ('kernel', 'zlib'):
    monkeypatch.setenv('SEG_MASK_PNG', way)
    outputs.write_masks(str(tmp_path / way / 'a'), mask, predict.Options())
    decoded[way] = [np.asarray(Image.open(tmp_path / way / name))
                    for name in ('a.png', 'a_color.png')]
  for kernel_image, zlib_image in zip(decoded['kernel'], decoded['zlib']):
    np.testing.assert_array_equal(kernel_image, zlib_image)
  np.testing.assert_array_equal(decoded['kernel'][0], mask)
  level1 = io.BytesIO()
  writer = png.PngWriter(level1, 590, 480, strategy=zlib.Z_DEFAULT_STRATEGY)
  writer.write(voc_colormap()[mask])
  writer.close()
  assert os.path.getsize(tmp_path / 'kernel' / 'a_color.png') < len(level1.getvalue())


@pytest.mark.parametrize('fmt', ['float16', 'uint8'])
def test_probabilities_are_the_softmax_of_the_logits(engine, reference, tmp_path, fmt):
  image = scene(60, 80, 3)
  Image.fromarray(image).save(tmp_path / 'x.png')
  assert _run(engine, [str(tmp_path / 'x.png')], tmp_path / 'out', probabilities=fmt)[0] == 0
  probs = np.load(tmp_path / 'out' / 'x_prob.npy')
  logits = reference(image)
  expected = np.exp(logits - logits.max(-1, keepdims=True))
  expected = np.moveaxis(expected / expected.sum(-1, keepdims=True), -1, 0)
  assert probs.shape == (21, 60, 80) and probs.dtype == np.dtype(fmt)
  if fmt == 'float16':
    np.testing.assert_allclose(probs.astype(np.float32), expected, atol=2e-3)
  else:
    assert np.abs(probs.astype(np.float32) - 255 * expected).max() <= 1.01
  _assert_same_classes(_read_mask(tmp_path / 'out' / 'x.png'), logits)


# ----------------------------------------------------------------------------------------------
# Inputs.


def test_files_folders_globs_and_lists(tmp_path):
  (tmp_path / 'photos' / '2024').mkdir(parents=True)
  (tmp_path / 'other').mkdir()
  for name in ('photos/a.jpg', 'photos/2024/b.png', 'photos/notes.md', 'other/c.png',
               'other/d.png', 'other/e.png'):
    (tmp_path / name).write_bytes(b'x')
  (tmp_path / 'other' / 'list.txt').write_text(
      '# the paths a person chose\nc.png\n\n' + str(tmp_path / 'photos' / 'a.jpg') +
      '\nmissing.png\n')
  photos, other = str(tmp_path / 'photos'), str(tmp_path / 'other')
  found = lambda values: [(os.path.relpath(f.path, tmp_path), f.relative, f.error)
                          for f in collect_inputs(values)[0]]
  # A folder: recursive, image extensions only, mirrored relative to the folder.
  files, roots, ignored, _ = collect_inputs([photos])
  assert [(f.relative) for f in files] == ['a.jpg', os.path.join('2024', 'b.png')]
  assert roots == [photos] and ignored == 1
  # A file: its name. A glob: relative to the deepest folder holding every match.
  assert found([other + '/d.png']) == [('other/d.png', 'd.png', '')]
  assert found([str(tmp_path) + '/**/*.png']) == [
      ('other/c.png', 'other/c.png', ''), ('other/d.png', 'other/d.png', ''),
      ('other/e.png', 'other/e.png', ''), ('photos/2024/b.png', 'photos/2024/b.png', '')]
  # A list: entries relative to the list's folder; a missing entry is one failed input.
  listed = found([other + '/list.txt'])
  assert listed[:2] == [('other/c.png', 'other/c.png', ''), ('photos/a.jpg', 'photos/a.jpg', '')]
  assert listed[2][2] == 'not found'
  # Several values (repeated or a comma list), each file once.
  both = found([f'{other}/d.png,{other}/e.png', other + '/d.png', photos])
  assert [p for p, _, _ in both] == ['other/d.png', 'other/e.png', 'photos/a.jpg',
                                     'photos/2024/b.png']
  with pytest.raises(FileNotFoundError, match='no such file'):
    collect_inputs([str(tmp_path / 'nope')])
  with pytest.raises(FileNotFoundError, match='matches no file'):
    collect_inputs([str(tmp_path / '*.gif')])


def test_a_file_found_twice_is_predicted_once_and_named_in_the_summary(tmp_path):
  (tmp_path / 'in').mkdir()
  (tmp_path / 'in' / 'b.png').write_bytes(b'x')
  os.symlink(tmp_path / 'in' / 'b.png', tmp_path / 'in' / 'a.png')  # found first (sorted)
  given_twice = str(tmp_path / 'in' / 'b.png')
  found = collect_inputs([str(tmp_path / 'in'), given_twice])
  assert [f.relative for f in found.files] == ['a.png']
  # A repeated value is no surprise; another name for the same file is reported.
  assert found.duplicates == [(str(tmp_path / 'in' / 'b.png'), str(tmp_path / 'in' / 'a.png'))]
  summary = RunReport(total=1, processed=1, duplicates=found.duplicates).format('out')
  assert 'duplicates        1' in summary
  assert f'SAME FILE {tmp_path}/in/b.png = {tmp_path}/in/a.png' in summary


def test_never_writes_into_the_input_tree(tmp_path):
  (tmp_path / 'in').mkdir()
  Image.fromarray(scene(20, 20, 0)).save(tmp_path / 'in' / 'a.png')
  with pytest.raises(ValueError, match='inside the input folder'):
    predict.predict_paths('unused', str(tmp_path / 'in'), str(tmp_path / 'in' / 'masks'))
  # A listed file that lies inside the output folder (here: the output is its folder).
  with pytest.raises(ValueError, match='inside the output folder'):
    predict.predict_paths('unused', str(tmp_path / 'in' / 'a.png'), str(tmp_path / 'in'))
  (tmp_path / 'list.txt').write_text('in/a.png\n')
  with pytest.raises(ValueError, match='inside the output folder'):
    predict.predict_paths('unused', str(tmp_path / 'list.txt'), str(tmp_path))
  assert os.listdir(tmp_path / 'in') == ['a.png']


def test_name_collisions_get_distinct_outputs(engine, reference, tmp_path):
  inputs = tmp_path / 'in'
  inputs.mkdir()
  images = {'a.jpg': scene(50, 60, 4), 'a.png': scene(50, 60, 5),
            'a_color.png': scene(30, 30, 6), 'b.png': scene(30, 40, 7)}
  for name, image in images.items():
    Image.fromarray(image).save(inputs / name)
  assert _run(engine, [str(inputs)], tmp_path / 'out')[0] == 0
  assert sorted(os.listdir(tmp_path / 'out')) == [
      'a.jpg.png', 'a.jpg_color.png', 'a.png.png', 'a.png_color.png', 'a_color.png.png',
      'a_color.png_color.png', 'b.png', 'b_color.png']
  for name, stem in (('a.jpg', 'a.jpg'), ('a.png', 'a.png'), ('a_color.png', 'a_color.png'),
                     ('b.png', 'b')):
    pixels = load_rgb(str(inputs / name))
    _assert_same_classes(_read_mask(tmp_path / 'out' / f'{stem}.png'), reference(pixels))


# ----------------------------------------------------------------------------------------------
# Resuming, atomic writes, bad files.


def test_resumes_skips_done_inputs_and_overwrites_on_request(engine, tmp_path, monkeypatch):
  inputs, out = tmp_path / 'in', tmp_path / 'out'
  inputs.mkdir()
  for i in range(3):
    Image.fromarray(scene(30, 30, i)).save(inputs / f'{i}.png')
  # An interrupted write: the index PNG of 1.png fails half-way through.
  from seg.predict import outputs
  real_open = open

  def failing_open(path, mode='r', *args, **kwargs):
    if str(path).endswith('1.png.partial'):
      with real_open(path, 'wb') as f:
        f.write(b'\x89PNG half')
      raise OSError(28, 'No space left on device')
    return real_open(path, mode, *args, **kwargs)
  monkeypatch.setattr(outputs, 'open', failing_open, raising=False)
  failures, summary, _ = _run(engine, [str(inputs)], out)
  assert failures == 1 and 'FAILED' in summary and '1.png' in summary
  assert not (out / '1.png').exists()  # no half-written file under the final name
  assert not [n for n in os.listdir(out) if n.endswith('.partial')]
  monkeypatch.delattr(outputs, 'open')
  mtimes = {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out) if not n.startswith('1')}
  failures, summary, _ = _run(engine, [str(inputs)], out)
  assert failures == 0 and 'processed         1' in summary and 'skipped           2' in summary
  assert all(os.stat(out / n).st_mtime_ns == t for n, t in mtimes.items())
  assert np.asarray(Image.open(out / '1.png')).shape == (30, 30)
  # Asking for an overlay makes the overlay-less outputs incomplete: all three are redone.
  assert 'processed         3' in _run(engine, [str(inputs)], out, overlay=True)[1]
  assert 'skipped           3' in _run(engine, [str(inputs)], out, overlay=True)[1]
  assert 'processed         3' in _run(engine, [str(inputs)], out, overwrite=True)[1]


class _InterruptedOnSecondBatch:
  """The real engine behind the interface the pipeline uses; Ctrl-C arrives during batch 2."""

  def __init__(self, inner):
    self.inner, self.batch_size, self.calls = inner, inner.batch_size, 0

  def __getattr__(self, name):  # eval_size, parts, compiled: the real engine's
    return getattr(self.inner, name)

  def bucket(self, height, width):
    return self.inner.bucket(height, width)

  def predict(self, images):
    self.calls += 1
    if self.calls == 2:
      raise KeyboardInterrupt
    return self.inner.predict(images)


def test_ctrl_c_keeps_finished_outputs_and_the_next_run_resumes(engine, tmp_path):
  inputs, out = tmp_path / 'in', tmp_path / 'out'
  inputs.mkdir()
  for i in range(5):
    Image.fromarray(scene(30, 30, i)).save(inputs / f'{i}.png')
  lines = []
  with pytest.raises(KeyboardInterrupt):
    predict.predict_paths('unused', str(inputs), str(out),
                          predict.Options(memory_budget=16 << 30),
                          engine=_InterruptedOnSecondBatch(engine), log=lines.append,
                          progress_stream=io.StringIO())
  assert 'INTERRUPTED after 2 of 5 inputs' in lines[-1] and 'processed         2' in lines[-1]
  assert len(os.listdir(out)) == 4  # two inputs, two files each, no temporary files
  failures, summary, _ = _run(engine, [str(inputs)], out)
  assert failures == 0 and 'processed         3' in summary and 'skipped           2' in summary


def test_bad_files_are_reported_one_by_one_and_the_run_goes_on(engine, tmp_path):
  inputs = tmp_path / 'in'
  inputs.mkdir()
  good = io.BytesIO()
  Image.fromarray(scene(64, 64, 8)).save(good, format='JPEG')
  (inputs / 'good.jpg').write_bytes(good.getvalue())
  (inputs / 'truncated.jpg').write_bytes(good.getvalue()[:len(good.getvalue()) // 2])
  (inputs / 'empty.png').write_bytes(b'')
  (inputs / 'text.png').write_text('a note, not an image')
  (inputs / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n' + os.urandom(200))
  failures, summary, _ = _run(engine, [str(inputs)], tmp_path / 'out')
  assert failures == 4 and 'processed         1' in summary and 'failed            4' in summary
  reasons = {line.split(': ', 1)[0].split(os.sep)[-1]: line.split(': ', 1)[1]
             for line in summary.splitlines() if line.startswith('FAILED')}
  assert set(reasons) == {'truncated.jpg', 'empty.png', 'text.png', 'corrupt.png'}
  assert 'truncated' in reasons['truncated.jpg']
  assert 'empty file' in reasons['empty.png']
  assert 'not an image' in reasons['text.png']
  assert reasons['corrupt.png']
  assert sorted(os.listdir(tmp_path / 'out')) == ['good.png', 'good_color.png']


# ----------------------------------------------------------------------------------------------
# Image modes and EXIF orientation.


def _png16(path, values):
  """A 16-bit PNG written by hand (grey [h, w] or RGB [h, w, 3] uint16)."""
  h, w = values.shape[:2]
  colour_type = 2 if values.ndim == 3 else 0
  raw = b''.join(b'\x00' + values[y].astype('>u2').tobytes() for y in range(h))
  chunk = lambda kind, data: (struct.pack('>I', len(data)) + kind + data +
                              struct.pack('>I', zlib.crc32(kind + data)))
  with open(path, 'wb') as f:
    f.write(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 16, colour_type,
                                                              0, 0, 0)) +
            chunk(b'IDAT', zlib.compress(raw)) + chunk(b'IEND', b''))


def test_modes_and_orientation_become_the_equivalent_rgb(engine, reference, tmp_path):
  inputs = tmp_path / 'in'
  inputs.mkdir()
  rgb = scene(48, 64, 9)
  gray = rgb.mean(-1).round().astype(np.uint8)
  expected = {}
  Image.fromarray(gray).save(inputs / 'gray.png')
  expected['gray'] = np.repeat(gray[..., None], 3, -1)
  alpha = np.full(rgb.shape[:2], 255, np.uint8)
  alpha[:, :16], alpha[:, 16:32] = 0, 100
  Image.fromarray(np.dstack([rgb, alpha])).save(inputs / 'rgba.png')
  a = alpha[..., None] / 255.0
  expected['rgba'] = np.round(rgb * a + 127.5 * (1 - a)).astype(np.uint8)  # over the mean grey
  palette_image = Image.fromarray(rgb).quantize(colors=32)
  palette_image.save(inputs / 'palette.png')
  palette = np.asarray(palette_image.getpalette()[:96], np.uint8).reshape(-1, 3)
  expected['palette'] = palette[np.asarray(palette_image)]
  _png16(inputs / 'gray16.png', gray.astype(np.uint16) * 257)
  expected['gray16'] = expected['gray']
  _png16(inputs / 'rgb16.png', rgb.astype(np.uint16) * 257)
  expected['rgb16'] = rgb
  cmyk = np.dstack([255 - rgb, np.zeros(rgb.shape[:2], np.uint8)])
  cmyk[24:, :, 3] = 60
  Image.fromarray(cmyk, 'CMYK').save(inputs / 'cmyk.jpg', quality=95)
  decoded = np.asarray(Image.open(inputs / 'cmyk.jpg'), np.float64)  # the JPEG's CMYK values
  expected['cmyk'] = np.round((255 - decoded[..., :3]) * (255 - decoded[..., 3:]) / 255
                              ).astype(np.uint8)
  exif = Image.Exif()
  exif[0x0112] = 6  # the camera was turned: rotate 90 degrees clockwise to view
  Image.fromarray(rgb).save(inputs / 'rotated.jpg', exif=exif, quality=95)
  expected['rotated'] = np.rot90(np.asarray(Image.open(inputs / 'rotated.jpg')), k=-1)
  assert expected['rotated'].shape == (64, 48, 3)

  for name, pixels in expected.items():
    [path] = [p for p in os.listdir(inputs) if os.path.splitext(p)[0] == name]
    np.testing.assert_array_equal(load_rgb(str(inputs / path)), pixels, err_msg=name)
  assert _run(engine, [str(inputs)], tmp_path / 'out')[0] == 0
  for name, pixels in expected.items():
    _assert_same_classes(_read_mask(tmp_path / 'out' / f'{name}.png'), reference(pixels))


def test_iphone_heic_and_avif_photos_are_read_as_viewed(engine, reference, tmp_path,
                                                        monkeypatch):
  """HEIC (pillow-heif; its EXIF orientation as the phone writes it) and AVIF files are found
  in folders and read as viewers show them; without pillow-heif a HEIC input fails with the
  reason, the others go on."""
  pillow_heif = pytest.importorskip('pillow_heif')
  from seg.predict import images
  inputs = tmp_path / 'in'
  inputs.mkdir()
  rgb = scene(48, 64, 10)
  exif = Image.Exif()
  exif[0x0112] = 6  # the phone was turned: rotate 90 degrees clockwise to view
  pillow_heif.from_bytes('RGB', (64, 48), rgb.tobytes()).save(
      inputs / 'phone.heic', exif=exif.tobytes(), quality=95)
  Image.fromarray(rgb).save(inputs / 'web.avif', quality=95)
  turned, got = np.rot90(rgb, k=-1), load_rgb(str(inputs / 'phone.heic'))
  assert got.shape == (64, 48, 3)
  error = lambda a, b: np.abs(a.astype(int) - b).mean()
  assert error(got, turned) < 6 < error(got, np.rot90(rgb, k=1))   # lossy, but turned right
  assert error(load_rgb(str(inputs / 'web.avif')), rgb) < 6
  assert _run(engine, [str(inputs)], tmp_path / 'out')[0] == 0
  for name, pixels in (('phone', got), ('web', load_rgb(str(inputs / 'web.avif')))):
    _assert_same_classes(_read_mask(tmp_path / 'out' / f'{name}.png'), reference(pixels))

  # A larger photo with a thumbnail that covers the eval size: the thumbnail is decoded
  # (pillow-heif's own decode of it, resized as any image), the mask at the full size.
  large = np.asarray(Image.fromarray(rgb).resize((400, 300)))
  Image.fromarray(large).save(inputs / 'large.heic', quality=95, thumbnails=[200])
  thumbnail = np.asarray(pillow_heif.open_heif(inputs / 'large.heic')[0].get_thumbnail(0))
  assert thumbnail.shape == (150, 200, 3)
  image, original = load_image(str(inputs / 'large.heic'), max_side=161)
  np.testing.assert_array_equal(image, np.asarray(Image.fromarray(thumbnail).resize(
      (161, 121), Image.Resampling.BILINEAR)))
  assert original == (300, 400)
  assert _run(engine, [str(inputs / 'large.heic')], tmp_path / 'large')[0] == 0
  assert _read_mask(tmp_path / 'large' / 'large.png').shape == (300, 400)

  monkeypatch.setattr(images, 'heif_support', lambda: False)
  failures, summary, _ = _run(engine, [str(inputs)], tmp_path / 'again', overwrite=True)
  assert failures == 2 and 'phone.heic' in summary and 'large.heic' in summary
  assert 'pillow-heif' in summary
  assert os.path.exists(tmp_path / 'again' / 'web.png')


# ----------------------------------------------------------------------------------------------
# Large images and bounded memory.


def _aligned_weights(out_size, image_size, canvas, features):
  """[out_size, features] bilinear weights in float64, written out independently of seg: the
  original's corner pixels on the downscaled image's corners, feature f at canvas pixel
  f * (canvas - 1) / (features - 1)."""
  weights = np.zeros((out_size, features))
  for o in range(out_size):
    p = o * (image_size - 1) / (out_size - 1) * (features - 1) / (canvas - 1)
    lo = min(int(np.floor(p)), features - 2)
    weights[o, lo] += 1 - (p - lo)
    weights[o, lo + 1] += p - lo
  return weights


def _upsampled_reference(reference, small, height, width):
  """Logits [height, width, 21] of `small` taken to (height, width) by the aligned-corner rule:
  the plain model's logits at canvas pixels 0, 16, 32, ... are its feature grid (aligned
  corners put feature f exactly there)."""
  features = reference(small, full_canvas=True)[::16, ::16]
  rows = _aligned_weights(height, small.shape[0], EVAL_SIZE, features.shape[0])
  cols = _aligned_weights(width, small.shape[1], EVAL_SIZE, features.shape[1])
  return np.einsum('oh,hwc,pw->opc', rows, features.astype(np.float64), cols)


def test_large_images_resize_within_the_compiled_shapes(engine, reference, tmp_path):
  image = scene(300, 400, 10)  # "large" here: max_side 161 = the tiny eval_size
  Image.fromarray(image).save(tmp_path / 'big.png')
  Image.fromarray(image[:100, :120]).save(tmp_path / 'small.png')
  engine.shapes_run.clear()
  failures, summary, _ = _run(engine, [str(tmp_path / 'big.png'), str(tmp_path / 'small.png')],
                              tmp_path / 'out', large_images='resize', max_side=161,
                              probabilities='float16')
  assert failures == 0
  assert '  resized           1  above 161 px: predicted at 161 px' in summary  # big.png only
  assert {shape[2:] for shape in engine.shapes_run} == {(EVAL_SIZE, EVAL_SIZE)}
  # Independently: PIL's bilinear downscale, the plain model, its logits upsampled in NumPy.
  small = np.asarray(Image.fromarray(image).resize((161, 121), Image.Resampling.BILINEAR))
  upsampled = _upsampled_reference(reference, small, 300, 400)
  mask = _read_mask(tmp_path / 'out' / 'big.png')
  _assert_same_classes(mask, upsampled, near_tie=1e-4)
  assert np.asarray(Image.open(tmp_path / 'out' / 'small.png')).shape == (100, 120)
  probs = np.exp(upsampled - upsampled.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  stored = np.load(tmp_path / 'out' / 'big_prob.npy')
  assert stored.shape == (21, 300, 400)
  np.testing.assert_allclose(stored.astype(np.float32), np.moveaxis(probs, -1, 0), atol=2e-3)


def test_default_masks_of_a_large_image_are_the_upsampled_argmax(engine, reference, tmp_path):
  """The default setting (the model's eval size, blocks computed exactly only where their
  corners differ) against the argmax of every upsampled pixel: >= 99.9% equal."""
  image = scene(480, 640, 21)
  Image.fromarray(image).save(tmp_path / 'photo.png')
  assert _run(engine, [str(tmp_path / 'photo.png')], tmp_path / 'out')[0] == 0
  small = np.asarray(Image.fromarray(image).resize((161, 121), Image.Resampling.BILINEAR))
  expected = _upsampled_reference(reference, small, 480, 640).argmax(-1)
  mask = _read_mask(tmp_path / 'out' / 'photo.png')
  assert mask.shape == (480, 640) and len(np.unique(expected)) > 1
  assert (mask == expected).mean() >= 0.999


def test_profile_times_every_stage_an_image_passes(engine, tmp_path, monkeypatch):
  """`--profile`: each image's decode, and with `--overlay` the second, full-size decode of a
  downscaled one (the pixels under the overlay); the full-size class maps of the downscaled
  images; both files' writes; the table prints each stage's seconds and ms per image."""
  from seg.predict import profile, runner
  profiles = []

  class Recorded(profile.Profile):
    def __init__(self):
      super().__init__()
      profiles.append(self)

  monkeypatch.setattr(runner, 'Profile', Recorded)
  inputs = tmp_path / 'in'
  inputs.mkdir()
  Image.fromarray(scene(70, 90, 0)).save(inputs / 'small.jpg')
  Image.fromarray(scene(300, 400, 1)).save(inputs / 'large.jpg')   # above 161: downscaled
  Image.fromarray(scene(322, 200, 2)).save(inputs / 'large.png')
  failures, summary, _ = _run(engine, [str(inputs)], tmp_path / 'out', overlay=True,
                              profile=True)
  assert failures == 0 and len(profiles) == 1
  calls, seconds = profiles[0].calls, profiles[0].seconds
  assert calls['decode'] == 3 + 2 and calls['upsample'] == 2 and calls['write'] == 3 * 2
  table = summary[summary.index('profile ('):].splitlines()[1:]
  assert [line.split()[0] for line in table] == [
      s for s in profile.STAGES if s in seconds]
  for line in table:
    name, total, _, per_image, _ = line.split()
    assert float(total) == pytest.approx(seconds[name], abs=0.006)
    assert float(per_image) == pytest.approx(seconds[name] / 3 * 1000, abs=0.06)


@pytest.mark.parametrize('kernel', [False, True])
def test_upsampled_class_map_matches_every_pixel_computed(engine, kernel):
  """seg.predict.upsampling's block shortcut against block=1 (every pixel) and NumPy, in
  NumPy and in the project's kernel (which computes NumPy's float32 numbers at every pixel
  it computes)."""
  from seg.inference import float_kernel
  from seg.predict import upsampling
  if kernel and not float_kernel.available(np.float32):
    pytest.skip(f'no CPU kernel here: {float_kernel.unavailable_reason(np.float32)}')
  rng = np.random.default_rng(5)
  features = rng.normal(size=(11, 11, 21)).astype(np.float32)
  for original, resized in (((1000, 707), (161, 114)), ((9, 161), (9, 161)), ((1, 300), (1, 161))):
    shortcut = upsampling.class_map(features, original, resized, (EVAL_SIZE, EVAL_SIZE),
                                    kernel=kernel)
    rows = _aligned_weights(original[0], resized[0], EVAL_SIZE, 11) if original[0] > 1 else \
        np.eye(11)[:1]
    cols = _aligned_weights(original[1], resized[1], EVAL_SIZE, 11)
    logits = np.einsum('oh,hwc,pw->opc', rows, features.astype(np.float64), cols)
    exact = upsampling.class_map(features, original, resized, (EVAL_SIZE, EVAL_SIZE), block=1,
                                 kernel=kernel)
    _assert_same_classes(exact, logits, near_tie=1e-5)  # float32 against float64
    assert (shortcut == logits.argmax(-1)).mean() >= 0.999
    if kernel:  # every pixel: NumPy's float32 arithmetic, bit for bit
      np.testing.assert_array_equal(exact, upsampling.class_map(
          features, original, resized, (EVAL_SIZE, EVAL_SIZE), block=1, kernel=False))


def test_a_large_turned_jpeg_keeps_its_full_oriented_size(engine, tmp_path):
  exif = Image.Exif()
  exif[0x0112] = 6  # stored 400 wide, 300 high; viewed 300 wide, 400 high
  Image.fromarray(scene(300, 400, 12)).save(tmp_path / 'turned.jpg', exif=exif)
  image, original = load_image(str(tmp_path / 'turned.jpg'), max_side=161)
  assert original == (400, 300) and image.shape == (161, 121, 3)
  assert _run(engine, [str(tmp_path / 'turned.jpg')], tmp_path / 'out', max_side=161,
              overlay=True)[0] == 0
  assert np.asarray(Image.open(tmp_path / 'out' / 'turned.png')).shape == (400, 300)
  assert Image.open(tmp_path / 'out' / 'turned_overlay.jpg').size == (300, 400)


def test_large_images_tile_within_the_compiled_shapes(engine, reference, tmp_path):
  image = scene(300, 400, 11)
  Image.fromarray(image).save(tmp_path / 'big.png')
  engine.shapes_run.clear()
  failures, summary, _ = _run(engine, [str(tmp_path / 'big.png')], tmp_path / 'out',
                              large_images='tile', max_side=161)
  assert failures == 0
  assert '  tiled             1  above 161 px' in summary and 'resized' not in summary
  assert {shape[2:] for shape in engine.shapes_run} == {(EVAL_SIZE, EVAL_SIZE)}
  mask = _read_mask(tmp_path / 'out' / 'big.png')
  assert mask.shape == (300, 400)
  # Tiles of 161 overlapping by 64 start at 0, 97, 139 (rows) and 0, 97, 194, 239 (columns);
  # each owns up to the middle of its overlaps: rows [0, 129), [129, 198), [198, 300) and
  # columns [0, 129), [129, 226), [226, 297), [297, 400).
  _assert_same_classes(mask[:129, :129], reference(image[:161, :161])[:129, :129])
  _assert_same_classes(mask[129:198, 129:226], reference(image[97:258, 97:258])[32:101, 32:129])
  _assert_same_classes(mask[198:, 297:], reference(image[139:, 239:])[59:, 58:])


@pytest.fixture(scope='module')
def averaged(model_dir):
  """image [h, w, 3] uint8 (h, w <= 161) -> [161, 161, 21] float64: the softmax of the plain
  Flax model averaged over scales 0.75 and 1.25 of its padded canvas and their flips, each
  pass's logits resized back to the canvas (NumPy, aligned corners): DeepLab's multi-scale +
  flipped inference. The scaled canvases are 129 and 209 pixels: 160 * s = 120 and 200 to the
  nearest multiple of the output stride 16 (DeepLab's int(160 * s + 1) would be 121 and 201,
  off the grid)."""
  _, model, variables = model_dir
  apply = jax.jit(lambda x: model.apply(variables, x, train=False, upsample=False))
  return lambda image: numpy_multi_scale(apply, image, EVAL_SIZE, (129, 209))


def test_multi_scale_masks_and_probabilities_average_every_pass(model_dir, averaged, tmp_path):
  workdir, _, _ = model_dir
  multi, _ = Engine.from_workdir(workdir, batch_size=2, scales=(0.75, 1.25), flip=True)
  small, big = scene(100, 120, 30), scene(300, 400, 31)
  Image.fromarray(small).save(tmp_path / 'small.png')
  Image.fromarray(big).save(tmp_path / 'big.png')
  inputs = [str(tmp_path / 'small.png'), str(tmp_path / 'big.png')]
  assert _run(multi, inputs, tmp_path / 'out', probabilities='float16')[0] == 0

  def check(mask, probabilities, stored):
    assert mask.shape == probabilities.shape[:2] and stored.shape == (21, *mask.shape)
    np.testing.assert_allclose(stored.astype(np.float32), np.moveaxis(probabilities, -1, 0),
                               atol=2e-3)
    top = np.sort(probabilities, -1)
    clear = top[..., -1] - top[..., -2] > 1e-4
    assert clear.mean() > 0.95
    assert np.array_equal(mask[clear], probabilities.argmax(-1)[clear])

  out = tmp_path / 'out'
  check(_read_mask(out / 'small.png'), averaged(small)[:100, :120],
        np.load(out / 'small_prob.npy'))
  # The large photo: downscaled by Pillow to 161x121, its canvas's averaged probabilities
  # taken to 300x400 by the aligned-corner rule (one grid cell per canvas pixel).
  resized = np.asarray(Image.fromarray(big).resize((161, 121), Image.Resampling.BILINEAR))
  canvas = averaged(resized)
  rows = _aligned_weights(300, 121, EVAL_SIZE, EVAL_SIZE)
  cols = _aligned_weights(400, 161, EVAL_SIZE, EVAL_SIZE)
  check(_read_mask(out / 'big.png'), np.einsum('oh,hwc,pw->opc', rows, canvas, cols),
        np.load(out / 'big_prob.npy'))
  # Tiled, each tile is averaged on its own (the first tile owns rows and columns [0, 129)).
  assert _run(multi, [str(tmp_path / 'big.png')], tmp_path / 'tiles', large_images='tile',
              max_side=161, probabilities='float16')[0] == 0
  check(_read_mask(tmp_path / 'tiles' / 'big.png')[:129, :129],
        averaged(big[:161, :161])[:129, :129],
        np.load(tmp_path / 'tiles' / 'big_prob.npy')[:, :129, :129])


def test_predict_runs_the_passes_eval_scores_unless_told_otherwise(tmp_path):
  config = tiny.get_config()
  checkpoint.save_config(str(tmp_path), config)
  assert predict.runner.inference_passes(str(tmp_path)) == ((1.0,), False)
  config.eval.scales, config.eval.flip = (0.5, 1.0, 1.5), True
  checkpoint.save_config(str(tmp_path), config)
  assert predict.runner.inference_passes(str(tmp_path)) == ((0.5, 1.0, 1.5), True)
  assert predict.runner.inference_passes(str(tmp_path), [1], False) == ((1.0,), False)
  assert forward.describe_passes((0.5, 1.0, 1.5), True).startswith(
      'multi-scale inference: scales 0.5, 1, 1.5 and their flips, 6 passes per image')


def test_tile_layout():
  assert large_images.tile_starts(100, 161, 64) == ([0], [0, 100])
  assert large_images.tile_starts(300, 161, 64) == ([0, 97, 139], [0, 129, 198, 300])
  assert large_images.tile_starts(400, 161, 64) == ([0, 97, 194, 239], [0, 129, 226, 297, 400])


def test_a_budget_of_one_image_at_a_time_still_finishes(engine, tmp_path):
  for i in range(5):
    Image.fromarray(scene(30 + i, 30, i)).save(tmp_path / f'{i}.png')
  files = collect_inputs([str(tmp_path)]).files
  options = predict.Options(workers=2)
  jobs = plan_jobs(files, str(tmp_path.parent / 'budget-out'), options)
  summary = predict.Pipeline(engine, options, io.StringIO(), bytes_in_flight=1).run(jobs)
  assert summary.processed == 5 and not summary.failures
  # One image at a time: the largest, its pixels and twice its size for the class map.
  assert summary.peak_bytes_held == 34 * 30 * 3 + 2 * 34 * 30
  summary = predict.Pipeline(engine, predict.Options(workers=2, overwrite=True), io.StringIO(),
                             bytes_in_flight=2 * 30 * 30 * 5).run(jobs)
  assert summary.processed == 5 and summary.peak_bytes_held <= 2 * 30 * 30 * 5


def test_the_memory_budget_bounds_the_compiled_shape_and_what_is_in_flight(engine, tmp_path,
                                                                             monkeypatch):
  from seg.predict import memory
  per_pixel, parts = memory.activation_per_pixel(engine)
  assert per_pixel > 0
  held = 300 << 20
  eval_canvas = per_pixel * parts * EVAL_SIZE ** 2
  # Room for the network at side 513 (a 513 x 513 canvas) but not at 577: the side is lowered.
  spare = 2 * per_pixel * parts * 513 ** 2 + 1
  budget = held + memory.SLACK + int(spare)
  plan = memory.plan_memory(engine, 2049, budget, held)
  assert plan.max_side == 513
  assert abs(plan.in_flight - (spare - per_pixel * parts * 513 ** 2)) <= 2
  assert plan.describe().endswith('(the largest side lowered from 2049 px to fit; '
                                  '--memory-budget raises it)')
  smaller = memory.plan_memory(engine, 321, budget, held)
  assert smaller.max_side == 321 and 'lowered' not in smaller.describe()  # it stands
  with pytest.raises(ValueError, match='memory-budget') as refused:
    memory.plan_memory(engine, 2049, held + memory.SLACK + int(eval_canvas), held)
  assert str(refused.value).endswith('raise it')
  # With several passes per image the refusal names the other way out.
  monkeypatch.setattr(engine, 'multi_scale', True)
  monkeypatch.setattr(engine, 'scales', (0.75, 1.0, 1.25))
  monkeypatch.setattr(engine, 'flip', True)
  with pytest.raises(ValueError, match=r'raise it or run fewer passes than 6 \(--scales, '
                                       r'--flip\)$'):
    memory.plan_memory(engine, 2049, held + memory.SLACK + int(eval_canvas), held)
  monkeypatch.undo()
  assert memory.parse_budget('1.5G') == 1536 << 20 and memory.parse_budget('800') == 800 << 20
  # A run under a tiny budget of images in flight still finishes, one image at a time, and
  # an oversized --max-side never compiles a shape above what the budget allows.
  Image.fromarray(scene(300, 400, 30)).save(tmp_path / 'big.png')
  engine.shapes_run.clear()
  lines = []
  failures = predict.predict_paths('unused', [str(tmp_path / 'big.png')], str(tmp_path / 'o'),
                                   predict.Options(max_side=4000, large_images='tile',
                                                   memory_budget=memory.resident_bytes() +
                                                   memory.SLACK + int(8 * eval_canvas)),
                                   engine=engine, log=lines.append, progress_stream=io.StringIO())
  assert failures == 0, lines
  assert max(max(shape[2:]) for shape in engine.shapes_run) <= 321, engine.shapes_run
  assert _read_mask(tmp_path / 'o' / 'big.png').shape == (300, 400)


def test_shards_cover_every_input_once_and_stay_put(engine, tmp_path):
  from seg.predict.files import shard_of
  names = [f'folder{i % 7}/img_{i}.jpg' for i in range(400)]
  shards = [shard_of(name, 4) for name in names]
  assert sorted(set(shards)) == [0, 1, 2, 3] and min(np.bincount(shards)) > 60
  more = names + [f'new/extra_{i}.jpg' for i in range(100)]  # files added elsewhere
  assert [shard_of(name, 4) for name in more[:400]] == shards
  # End to end: three shards of one folder write every mask exactly once between them.
  (tmp_path / 'in').mkdir()
  for i in range(7):
    Image.fromarray(scene(20 + i, 24, 40 + i)).save(tmp_path / 'in' / f'{i}.png')
  written = []
  for index in range(3):
    out = tmp_path / f'out{index}'
    assert _run(engine, [str(tmp_path / 'in')], out, shard=(index, 3))[0] == 0
    written += sorted(p for p in os.listdir(out) if not p.endswith('_color.png'))
  assert sorted(written) == [f'{i}.png' for i in range(7)]


def test_progress_updates_one_line_on_a_terminal():
  class Terminal(io.StringIO):
    def isatty(self):
      return True
  stream = Terminal()
  progress = Progress(3, stream, interval=0)
  for _ in range(3):
    progress.update()
  text = stream.getvalue()
  assert text.count('\r') == 3 and text.count('\n') == 1 and '3/3' in text
  assert 'images/s' in text and 'ETA' in text


# ----------------------------------------------------------------------------------------------
# The command.


def test_main_predict_exit_status_progress_and_summary(model_dir, averaged, tmp_path):
  workdir, _, _ = model_dir
  (tmp_path / 'in').mkdir()
  (tmp_path / 'more').mkdir()
  Image.fromarray(scene(40, 50, 12)).save(tmp_path / 'in' / 'a.png')
  (tmp_path / 'in' / 'b.jpg').write_bytes(b'')
  Image.fromarray(scene(30, 20, 13)).save(tmp_path / 'more' / 'c.png')
  Image.fromarray(scene(20, 30, 14)).save(tmp_path / 'more' / 'd.png')
  (tmp_path / 'more' / 'list.txt').write_text('d.png\nmissing.png\n')
  more = f'{tmp_path}/more/c.png,{tmp_path}/more/list.txt'  # a comma list, a second --input
  args = [sys.executable, 'main.py', 'predict', '--workdir', workdir, '--input',
          str(tmp_path / 'in'), '--output', str(tmp_path / 'out'), '--input', more, '--overlay',
          '--probabilities=uint8', '--batch-size=2', '--workers=1', '--scales=0.75,1.25',
          '--flip']
  result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 1, result.stderr[-2000:]
  assert ('multi-scale inference: scales 0.75, 1.25 and their flips, 4 passes per image'
          in result.stdout)
  expected = averaged(scene(40, 50, 12))[:40, :50]
  top = np.sort(expected, -1)
  clear = top[..., -1] - top[..., -2] > 1e-4
  assert clear.mean() > 0.95 and np.array_equal(_read_mask(tmp_path / 'out' / 'a.png')[clear],
                                                 expected.argmax(-1)[clear])
  assert 'processed         3' in result.stdout and 'failed            2' in result.stdout
  assert 'empty file' in result.stdout and 'missing.png: not found' in result.stdout
  assert 'images/s' in result.stderr and 'ETA' in result.stderr  # the progress line
  assert sorted(os.listdir(tmp_path / 'out')) == [
      f'{stem}{suffix}' for stem in 'acd'
      for suffix in ('.png', '_color.png', '_overlay.jpg', '_prob.npy')]
  result = subprocess.run(args[:8] + [str(tmp_path / 'in' / 'masks')] + args[9:], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode != 0 and 'inside the input folder' in result.stderr


def test_predict_says_what_the_kernel_sets_up_once_and_keeps_compilations_quiet(
    model_dir, tmp_path, monkeypatch):
  """Where the engine runs the project's kernel, `predict` tells its first-use steps (here
  running the loops apart, a few seconds once per CPU) through its log before the progress,
  and the engine's compilations (which come under the progress bar) stay out of it."""
  from seg.inference import cpu_features, float_kernel, int8_kernel, loop_check
  if cpu_features.choose().f32_formulation != 'kernel' or not int8_kernel.available():
    pytest.skip("float32 runs in XLA's products on this CPU")
  workdir, _, _ = model_dir
  monkeypatch.setattr(int8_kernel, '_state', {
      key: value for key, value in int8_kernel._state.items()
      if key not in ('log', 'isa', 'loops') and not (isinstance(key, tuple) and
                                                     key[0] == 'verdicts')})
  monkeypatch.setattr(float_kernel, '_state', {})
  record = str(tmp_path / 'record.json')  # none yet: the loops run apart again
  monkeypatch.setattr(loop_check, 'record_path', lambda library: record)
  (tmp_path / 'in').mkdir()
  Image.fromarray(scene(40, 50, 12)).save(tmp_path / 'in' / 'a.png')
  Image.fromarray(scene(300, 200, 13)).save(tmp_path / 'in' / 'b.png')  # resized: features
  lines = []
  options = predict.Options(memory_budget=16 << 30)  # the test process holds more than a run
  assert predict.predict_paths(workdir, str(tmp_path / 'in'), str(tmp_path / 'out'), options,
                               batch_size=2, log=lines.append,
                               progress_stream=io.StringIO()) == 0
  told = [i for i, line in enumerate(lines) if line.startswith("running the kernel's float32 "
                                                                 "loops (")]
  assert told and told[0] < [i for i, line in enumerate(lines) if 'input file(s)' in line][0]
  assert os.path.exists(record)
  assert not [line for line in lines if line.startswith('compiled ')], lines
