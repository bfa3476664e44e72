"""Exports the peers' network (model.py) to ONNX: float32, and int8 by ONNX Runtime's static quantization.

    python benchmarks/peers/export_onnx.py --calibration 'DIR_OR_GLOB_OF_JPEGS' [--height 513 --width 513]

Writes into --model-dir (default ~/.cache/seg/peers, outside the repository):
  deeplabv3_mnv2_os16_{H}x{W}.onnx        float32, input "pixel_values" [N, 3, H, W] (N dynamic),
                                          output "logits" [N, 21, ceil(H/16), ceil(W/16)]; opset 18,
                                          torch.onnx's dynamo exporter. Only the segmentation
                                          network: model.py removes the unused 320->1280 conv.
  deeplabv3_mnv2_os16_{H}x{W}.int8.onnx   the same network in QDQ format: int8 weights per output
                                          channel, uint8 activations (ONNX Runtime's advice for x86
                                          CPUs with VNNI; reduce_range off), MinMax ranges calibrated
                                          on real images. The exporter has already folded each
                                          BatchNorm into its conv (55 Conv nodes, no BatchNorm),
                                          so each conv is quantised once.
and prints one JSON line (what was written, the numerical checks below).

Calibration: the first --num-calibration (default 100) JPEGs, sorted by file name, of
--calibration (a folder or a glob), each scaled to fit H x W (aspect kept, bilinear),
padded at the bottom and right with the mean pixel 127.5 (how the project pads images for
evaluation) and mapped to [-1, 1]. The project's generated dataset has them after
`python main.py prepare-data --dataset embedded`:
~/tensorflow_datasets/downloads/embedded-1.2.0/VOCdevkit/VOC2012/JPEGImages (750 images).

Checks printed (not asserted; this is a benchmark): float32 ONNX Runtime vs PyTorch on one
input (largest difference / largest logit), and int8 vs float32 ONNX Runtime on the last
calibration image (same, and the share of output pixels whose argmax class agrees). The
int8 figures only show that the model runs: a network with random weights amplifies any
perturbation (uniform +-1/255 noise on the input alone moved the argmax of 31% of the
pixels at 257x257, 2026-11-29), so they say nothing of int8 accuracy on a trained network.
"""

import argparse
import glob
import json
import os
import time

import numpy as np

DEFAULT_MODEL_DIR = os.path.expanduser('~/.cache/seg/peers')
MEAN_PIXEL = 127.5   # padding value, 0 after mapping to [-1, 1] (the project's rule)


def onnx_paths(model_dir, height, width):
  """(float32 path, int8 path) for input size height x width."""
  stem = os.path.join(model_dir, f'deeplabv3_mnv2_os16_{height}x{width}')
  return stem + '.onnx', stem + '.int8.onnx'


def calibration_files(pattern, count):
  """The first `count` JPEG paths (sorted) of a folder or glob; raises if there are none."""
  if os.path.isdir(pattern):
    pattern = os.path.join(pattern, '*.jp*g')
  files = sorted(f for f in glob.glob(os.path.expanduser(pattern))
                 if f.lower().endswith(('.jpg', '.jpeg')))
  if not files:
    raise SystemExit(f'--calibration {pattern!r}: no .jpg/.jpeg files. The project makes some with '
                     '`python main.py prepare-data --dataset embedded`.')
  return files[:count]


def load_image(path, height, width):
  """A JPEG scaled to fit height x width, padded with the mean pixel: [1, 3, height, width] in [-1, 1]."""
  from PIL import Image
  with Image.open(path) as image:
    image = image.convert('RGB')
    scale = min(height / image.height, width / image.width)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    pixels = np.asarray(image.resize(size, Image.BILINEAR), np.float32)
  canvas = np.full((height, width, 3), MEAN_PIXEL, np.float32)
  canvas[:pixels.shape[0], :pixels.shape[1]] = pixels
  return (canvas / MEAN_PIXEL - 1.0).transpose(2, 0, 1)[None]


def export_float32(path, height, width, opset):
  """torch.onnx (dynamo) export with a dynamic batch; returns (model, one test input, its logits)."""
  import torch
  from model import build_model
  model = build_model()
  x = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(1)) * 2 - 1
  program = torch.onnx.export(model, (x,), input_names=['pixel_values'], output_names=['logits'],
                              dynamic_shapes=({0: torch.export.Dim('batch', min=1, max=256)},),
                              opset_version=opset, dynamo=True, external_data=False)
  program.save(path, external_data=False)
  with torch.inference_mode():
    return model, x[:1].numpy(), model(x[:1]).numpy()


def quantize_int8(float_path, int8_path, images):
  """Static QDQ quantisation of float_path, MinMax ranges over `images` ([1, 3, H, W] each)."""
  from onnxruntime import quantization as q

  class Reader(q.CalibrationDataReader):
    def __init__(self):
      self.left = iter(images)

    def get_next(self):
      x = next(self.left, None)
      return None if x is None else {'pixel_values': x}

  prepared = int8_path + '.prep.onnx'
  q.quant_pre_process(float_path, prepared)   # shape inference, ORT's basic graph fusions
  try:
    q.quantize_static(prepared, int8_path, Reader(), quant_format=q.QuantFormat.QDQ,
                      per_channel=True, activation_type=q.QuantType.QUInt8,
                      weight_type=q.QuantType.QInt8, reduce_range=False,
                      calibrate_method=q.CalibrationMethod.MinMax)
  finally:
    os.remove(prepared)


def run_onnx(path, x):
  import onnxruntime as ort
  options = ort.SessionOptions()
  options.intra_op_num_threads = 2
  session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
  return session.run(None, {'pixel_values': x})[0]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--calibration', required=True, help='folder or glob of JPEG images')
  parser.add_argument('--num-calibration', type=int, default=100)
  parser.add_argument('--height', type=int, default=513)
  parser.add_argument('--width', type=int, default=513)
  parser.add_argument('--model-dir', default=DEFAULT_MODEL_DIR)
  parser.add_argument('--opset', type=int, default=18)
  args = parser.parse_args()
  if args.opset < 17:
    parser.error('--opset must be >= 17')
  files = calibration_files(args.calibration, args.num_calibration)   # fail before the slow part

  import onnx
  import onnxruntime
  import torch
  torch.set_num_threads(2)
  os.makedirs(args.model_dir, exist_ok=True)
  float_path, int8_path = onnx_paths(args.model_dir, args.height, args.width)
  start = time.perf_counter()
  model, x, reference = export_float32(float_path, args.height, args.width, args.opset)
  export_s = time.perf_counter() - start
  print(f'exported {float_path} in {export_s:.0f}s; calibrating on {len(files)} images',
        flush=True)
  images = [load_image(f, args.height, args.width) for f in files]
  start = time.perf_counter()
  quantize_int8(float_path, int8_path, images)
  quantize_s = time.perf_counter() - start

  float_out = run_onnx(float_path, x)
  real_f32, real_int8 = run_onnx(float_path, images[-1]), run_onnx(int8_path, images[-1])
  ops = {}
  for node in onnx.load(float_path).graph.node:
    ops[node.op_type] = ops.get(node.op_type, 0) + 1
  print(json.dumps({
      'what': 'onnx_export', 'float32': float_path, 'int8': int8_path,
      'height': args.height, 'width': args.width, 'opset': args.opset,
      'params': sum(p.numel() for p in model.parameters()), 'float32_op_counts': ops,
      'calibration': args.calibration, 'calibration_images': len(files),
      'ort_vs_torch_rel_diff': float(np.abs(float_out - reference).max() / np.abs(reference).max()),
      'int8_vs_float32_rel_diff': float(np.abs(real_int8 - real_f32).max() / np.abs(real_f32).max()),
      'int8_argmax_agreement': float((real_int8.argmax(1) == real_f32.argmax(1)).mean()),
      'export_s': round(export_s, 1), 'quantize_s': round(quantize_s, 1),
      'torch': torch.__version__, 'onnx': onnx.__version__, 'onnxruntime': onnxruntime.__version__,
  }), flush=True)


if __name__ == '__main__':
  main()
