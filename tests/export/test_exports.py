"""Exports run in their own runtimes (LiteRT, ONNX Runtime, transformers) and give the engine's
masks; bad arguments are clear errors.

The reference is the engine (`seg.inference.engine`, XLA), an independent computation: the
exports are built by walking the folded weights with TensorFlow ops or ONNX nodes, and
transformers runs its own PyTorch implementation of the network.
"""

import json
import os

import numpy as np
import pytest

from helpers import random_variables, tiny_engine_config
from seg import checkpoint
from seg.export import exporter, inputs
from seg.inference import engine
from seg.inference.calibration import calibration_images
from seg.weights import importer, mapping

CANVAS = 97          # k * 16 + 1, small enough to convert and run in seconds
RTOL = 1e-4          # logits: of the largest magnitude


def _save_workdir(workdir, config, variables):
  checkpoint.save_config(workdir, config)
  manager = checkpoint.create_manager(workdir, keep=1)
  checkpoint.save_model_only(manager, 7, variables)
  manager.wait_until_finished()


@pytest.fixture(scope='module')
def model(tmp_path_factory, data_dir):
  """A quickstart-sized model (width 0.5, output stride 16) with random weights and BatchNorm
  statistics, in a workdir; its engine; the embedded val images on CANVAS canvases."""
  config = tiny_engine_config(width=0.5)
  config.data.eval_size = CANVAS
  config.data.data_dir = data_dir
  _, variables = random_variables(config.model, seed=3)
  workdir = str(tmp_path_factory.mktemp('export') / 'run')
  _save_workdir(workdir, config, variables)
  eng = engine.Engine(config, variables)
  val = [inputs.fit_canvas(image, CANVAS, CANVAS)[0]
         for image in calibration_images('val', config, count=8)]
  return workdir, config, variables, eng, np.stack(val)


def _agreement(ours, theirs):
  return float(np.mean(np.asarray(ours) == np.asarray(theirs)))


def _close(ours, theirs, rtol=RTOL):
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape
  err = np.abs(ours - theirs).max() / np.abs(theirs).max()
  assert err <= rtol, f'max error {err:.2e} of the largest magnitude'


def _litert(path):
  from ai_edge_litert.interpreter import Interpreter
  interpreter = Interpreter(model_path=str(path), num_threads=1)
  return interpreter, interpreter.get_signature_runner()


def _ort(path):
  import onnxruntime as ort
  return ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])


# ---------------------------------------------------------------------------------------------
# LiteRT

def test_tflite_float32_gives_the_engines_class_maps_and_logits(model, tmp_path):
  workdir, _, _, eng, val = model
  path = tmp_path / 'model.tflite'
  exporter.export_model(workdir, 'tflite', str(path), logits=True, log=lambda *_: None)
  interpreter, run = _litert(path)
  (detail,) = interpreter.get_input_details()
  assert detail['dtype'] == np.uint8 and list(detail['shape']) == [1, CANVAS, CANVAS, 3]
  classes, logits = [], []
  for canvas in val:
    out = run(images=canvas[None])
    classes.append(out['classes'][0])
    logits.append(out['logits'][0])
  assert np.asarray(classes).dtype == np.uint8
  # The engine on the same canvases, all of each canvas counted as image.
  sizes = np.full((len(val), 2), CANVAS, np.int32)
  assert _agreement(classes, eng.run_padded('classes', val, sizes)) >= 0.999
  _close(logits, eng.run_padded('logits', val, sizes))


# ---------------------------------------------------------------------------------------------
# ONNX

def test_onnx_float32_gives_the_engines_class_maps_and_logits_at_any_batch(model, tmp_path):
  workdir, _, _, eng, val = model
  path = tmp_path / 'model.onnx'
  exporter.export_model(workdir, 'onnx', str(path), logits=True, log=lambda *_: None)
  session = _ort(path)
  classes, logits = session.run(['classes', 'logits'], {'images': val})
  assert classes.dtype == np.uint8 and classes.shape == val.shape[:3]
  sizes = np.full((len(val), 2), CANVAS, np.int32)
  assert _agreement(classes, eng.run_padded('classes', val, sizes)) >= 0.999
  _close(logits, eng.run_padded('logits', val, sizes))
  # Dynamic size: an image of its own (odd, unequal) size, unpadded, as the engine sees it
  # on a canvas of exactly that size.
  image = val[:1, :75, :90]
  theirs = eng.run_padded('logits', image, np.array([[75, 90]], np.int32))
  _close(session.run(['logits'], {'images': image})[0], theirs)


def test_network_only_exports_give_the_engines_feature_logits(model, tmp_path):
  # upsample=False (what benchmarks/export_speed.py --network times): no resize, no argmax.
  workdir, _, _, eng, val = model
  x = val[:2].astype(np.float32) / 127.5 - 1
  ours = np.asarray(eng.forward(eng.folded, x, upsample=False))   # [2, 7, 7, classes]
  for fmt in ('tflite', 'onnx'):
    path = tmp_path / f'network.{fmt}'
    exporter.export_model(workdir, fmt, str(path), upsample=False, log=lambda *_: None)
    if fmt == 'tflite':
      run = _litert(path)[1]
      theirs = np.concatenate([run(images=canvas[None])['logits'] for canvas in val[:2]])
    else:
      (output,) = _ort(path).get_outputs()
      assert output.name == 'logits'
      theirs = _ort(path).run(['logits'], {'images': val[:2]})[0]
    _close(theirs, ours)


# ---------------------------------------------------------------------------------------------
# int8. What int8 costs in accuracy is measured on the trained quickstart model
# (benchmarks/export_accuracy.py, docs/export.md); random weights amplify any perturbation,
# so here: the models are integer where it matters, read the raw pixels, and still agree
# with the float32 engine on most pixels (a wrong input scale or a broken quantisation of a
# layer leaves a fraction of that).

INT8_AGREEMENT = 0.65  # measured here: 0.78 (LiteRT), 0.75 (ONNX Runtime)


def test_tflite_int8_is_integer_reads_pixels_and_mostly_agrees(model, tmp_path, capfd, recwarn):
  workdir, _, _, eng, val = model
  path = tmp_path / 'model.int8.tflite'
  capfd.readouterr()
  exporter.export_model(workdir, 'tflite', str(path), quantize='int8', calibration='train',
                        calibration_count=16, log=lambda *_: None)
  # Without the converter's noise: its lines on stderr, the deprecated interpreter's warning.
  assert capfd.readouterr().err == ''
  assert [str(w.message) for w in recwarn if 'deprecated' in str(w.message)] == []
  interpreter, run = _litert(path)
  (detail,) = interpreter.get_input_details()
  assert detail['dtype'] == np.uint8 and detail['quantization'] == (1.0, 0)
  tensors = {t['index']: t for t in interpreter.get_tensor_details()}
  convolutions = [op for op in interpreter._get_ops_details()
                  if op['op_name'] in ('CONV_2D', 'DEPTHWISE_CONV_2D')]
  assert len(convolutions) > 50
  for op in convolutions:  # int8 activations and weights, int32 biases
    x, w, b = (tensors[i]['dtype'] for i in op['inputs'])
    assert (x, w, b) == (np.int8, np.int8, np.int32), op
  classes = np.stack([run(images=canvas[None])['classes'][0] for canvas in val])
  sizes = np.full((len(val), 2), CANVAS, np.int32)
  assert _agreement(classes, eng.run_padded('classes', val, sizes)) >= INT8_AGREEMENT


def test_onnx_int8_is_qdq_and_mostly_agrees(model, tmp_path, caplog):
  import onnx
  workdir, _, _, eng, val = model
  path = tmp_path / 'model.int8.onnx'
  exporter.export_model(workdir, 'onnx', str(path), quantize='int8', calibration='train',
                        calibration_count=16, log=lambda *_: None)
  # Without quantize_static's advice to pre-process a graph whose BatchNorm is folded.
  assert [r.getMessage() for r in caplog.records if r.levelname == 'WARNING'] == []
  proto = onnx.load(str(path))
  int8_weights = {t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8}
  dequantized = {n.output[0] for n in proto.graph.node
                 if n.op_type == 'DequantizeLinear' and n.input[0] in int8_weights}
  convs = [n for n in proto.graph.node if n.op_type == 'Conv']
  assert len(convs) > 50 and all(n.input[1] in dequantized for n in convs)
  classes = _ort(path).run(['classes'], {'images': val})[0]
  sizes = np.full((len(val), 2), CANVAS, np.int32)
  assert _agreement(classes, eng.run_padded('classes', val, sizes)) >= INT8_AGREEMENT


# ---------------------------------------------------------------------------------------------
# Strided, dilated and odd-sized: output stride 8 (dilated depthwise layers) and the ASPP head
# (dilated 3x3 convolutions), on sizes where 'SAME' pads unevenly.

@pytest.fixture(scope='module')
def dilated():
  from seg.inference.fold import fold_variables
  config = tiny_engine_config(width=0.35, output_stride=8, head='aspp')
  _, variables = random_variables(config.model, seed=4)
  eng = engine.Engine(config, variables)
  return config, fold_variables(config.model, variables, xp=np), eng


def test_tflite_keeps_same_padding_and_dilation(dilated, tmp_path):
  from seg.export import tflite
  config, folded, eng = dilated
  images = np.random.default_rng(1).integers(0, 256, (2, 50, 61, 3), np.uint8)
  path = tmp_path / 'dilated.tflite'
  path.write_bytes(tflite.convert(folded, config.model, 50, 61, logits=True))
  _, run = _litert(path)
  ours = np.concatenate([run(images=image[None])['logits'] for image in images])
  _close(ours, eng.run_padded('logits', images, np.array([[50, 61]] * 2, np.int32)))


def test_onnx_keeps_same_padding_and_dilation_at_every_size(dilated):
  from seg.export import onnx as onnx_export
  config, folded, eng = dilated
  session = _ort_from_proto(onnx_export.build(folded, config.model, logits=True))
  for shape in ((1, 50, 61, 3), (2, 64, 33, 3)):  # odd and even sides, one dynamic graph
    images = np.random.default_rng(shape[1]).integers(0, 256, shape, np.uint8)
    sizes = np.array([shape[1:3]] * shape[0], np.int32)
    _close(session.run(['logits'], {'images': images})[0],
           eng.run_padded('logits', images, sizes))


def _ort_from_proto(proto):
  import onnxruntime as ort
  return ort.InferenceSession(proto.SerializeToString(), providers=['CPUExecutionProvider'])


# ---------------------------------------------------------------------------------------------
# Hugging Face

def test_hf_export_loads_in_transformers_and_reads_back_bit_identical(model, tmp_path):
  import torch
  from transformers import MobileNetV2ForSemanticSegmentation
  workdir, config, variables, eng, val = model
  folder = tmp_path / 'hf'
  exporter.export_model(workdir, 'hf', str(folder), log=lambda *_: None)
  hf_model = MobileNetV2ForSemanticSegmentation.from_pretrained(str(folder)).eval()
  # Inputs in [-1, 1], what the written preprocessor_config.json also gives.
  x = val.astype(np.float32) / 127.5 - 1
  with torch.no_grad():
    theirs = hf_model(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2))).logits
  theirs = theirs.numpy().transpose(0, 2, 3, 1)   # at the feature resolution
  # On a whole canvas both pool over the same features: the same function.
  ours = np.asarray(eng.forward(eng.folded, x, upsample=False))
  _close(theirs, ours)
  with open(folder / 'preprocessor_config.json') as f:
    assert json.load(f)['image_mean'] == [0.5] * 3
  # Round trip: import-weights --format hf gives back every variable, bit for bit.
  imported = str(tmp_path / 'imported')
  importer.import_weights('hf', str(folder), imported, log=lambda *_: None)
  back = mapping.flatten(checkpoint.load_raw_model_variables(imported))
  original = mapping.flatten(variables)
  assert sorted(back) == sorted(original)
  for key, value in original.items():
    np.testing.assert_array_equal(np.asarray(back[key]), np.asarray(value), err_msg=key)
  assert checkpoint.load_config(imported).model.width == config.model.width


# ---------------------------------------------------------------------------------------------
# Errors a user can make

def test_a_workdir_without_a_checkpoint_is_a_clear_error(model, tmp_path):
  _, config, _, _, _ = model
  checkpoint.save_config(str(tmp_path), config)
  with pytest.raises(FileNotFoundError, match='no checkpoint'):
    exporter.export_model(str(tmp_path), 'onnx', str(tmp_path / 'm.onnx'), log=lambda *_: None)
  with pytest.raises(FileNotFoundError, match='config.json'):
    exporter.export_model(str(tmp_path / 'nothing'), 'tflite', str(tmp_path / 'm.tflite'),
                          log=lambda *_: None)


def test_calibration_without_readable_images_is_a_clear_error(model, tmp_path):
  workdir = model[0]
  (tmp_path / 'photos').mkdir()
  (tmp_path / 'photos' / 'broken.jpg').write_bytes(b'not an image')
  for fmt in ('tflite', 'onnx'):
    with pytest.raises(ValueError, match='no readable image'):
      exporter.export_model(workdir, fmt, str(tmp_path / 'm'), quantize='int8',
                            calibration=str(tmp_path / 'photos'), log=lambda *_: None)
  with pytest.raises(ValueError, match='needs --calibration'):
    exporter.export_model(workdir, 'tflite', str(tmp_path / 'm'), quantize='int8',
                          log=lambda *_: None)
  assert not os.path.exists(tmp_path / 'm')


@pytest.mark.parametrize('size', ['12x12', '513x0', 'big', '257x9000'])
def test_an_unsupported_size_is_a_clear_error(model, size, tmp_path):
  with pytest.raises(ValueError, match='--size'):
    exporter.export_model(model[0], 'tflite', str(tmp_path / 'm.tflite'), size=size,
                          log=lambda *_: None)


def test_hf_refuses_what_transformers_cannot_hold(model, tmp_path):
  workdir, config, variables, _, _ = model
  with pytest.raises(ValueError, match='--quantize is for'):
    exporter.export_model(workdir, 'hf', str(tmp_path / 'hf'), quantize='int8',
                          calibration='val', log=lambda *_: None)
  aspp = config.copy_and_resolve_references()
  aspp.model.head = 'aspp'
  with pytest.raises(ValueError, match='head \'aspp\''):
    from seg.weights.hf import write_hf
    write_hf(aspp, variables, str(tmp_path / 'hf'), [])


def test_the_command_line_says_what_is_wrong_in_one_line(tmp_path):
  import subprocess
  import sys
  from helpers import ROOT
  result = subprocess.run(
      [sys.executable, 'main.py', 'export', '--workdir', str(tmp_path), '--format', 'tflite',
       '--output', str(tmp_path / 'm.tflite'), '--size', '257x10'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  last = result.stderr.strip().splitlines()[-1]
  assert 'export: error: --size' in last and 'Traceback' not in result.stderr, result.stderr
