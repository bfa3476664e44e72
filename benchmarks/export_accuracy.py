"""Accuracy of the LiteRT and ONNX exports, float32 and int8, against the engine on a val split.

    python benchmarks/export_accuracy.py --workdir runs/quickstart [--calibration train]
        [--calibration-count 300] [--size 161x161] [--output-dir /tmp/exports]

Exports the workdir four times (tflite and onnx, float32 and int8 calibrated on
--calibration), runs each in its own runtime (ai-edge-litert with XNNPACK, ONNX Runtime
CPU) over every image of the config's eval split, each fitted on the export's canvas as
`seg.export.inputs.fit_canvas` says (padded with 128 at the bottom and right), and prints:
  - mIoU and pixel accuracy of each, from one confusion matrix over the split (as `eval`),
    the mask read back from the image's region of the canvas;
  - the same for the engine on the same uint8 canvases, and the engine as `eval` runs it
    (padding exactly the mean pixel);
  - for each export, the share of pixels whose class equals the engine's on the same canvas.
  - transformers' model of the `--format hf` folder: on the same canvases (upsampled with
    aligned corners, as the model does), and on each image as it is (no padding: it pools
    over the image alone), upsampled with aligned corners or as transformers does
    (align_corners=False).
One JSON line per row goes to --json (if given). Needs requirements-test.txt (runtimes).
"""

import argparse
import json
import os
import sys
import time

import numpy as np



def val_examples(config):
  """[(image [h, w, 3] uint8, label [h, w] uint8)] of the config's eval split."""
  import tensorflow_datasets as tfds
  from seg.data import pipeline
  ds = pipeline.split_examples(config.data, config.data.eval_split)
  return [(ex['image'], ex['label'][..., 0]) for ex in tfds.as_numpy(ds)]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--calibration', default='train')
  parser.add_argument('--calibration-count', type=int, default=300)
  parser.add_argument('--size', default='', help='canvas HxW (default eval_size)')
  parser.add_argument('--output-dir', default='/tmp/seg-export-accuracy')
  parser.add_argument('--json', default='')
  parser.add_argument('--only-hf', action='store_true', help='the engine and hf rows only')
  args = parser.parse_args()

  from seg import checkpoint
  from seg.classes import class_names
  from seg.export import exporter
  from seg.export.inputs import fit_canvas, parse_size
  from seg.inference.engine import Engine
  from seg.inference.metrics import iou_report

  config = checkpoint.load_config(args.workdir)
  height, width = parse_size(args.size, config.data.eval_size)
  size = f'{height}x{width}'
  examples = val_examples(config)
  canvases, regions = zip(*(fit_canvas(image, height, width) for image, _ in examples))
  for (image, _), region in zip(examples, regions):
    assert region == image.shape[:2], 'an image larger than the canvas: give a larger --size'
  num_classes = config.model.num_classes
  names = class_names(config.data.dataset, num_classes)

  def report(masks):
    cm = np.zeros((num_classes, num_classes), np.int64)
    for mask, (_, label) in zip(masks, examples):
      mask = mask[:label.shape[0], :label.shape[1]].astype(np.int64)
      valid = label != config.data.ignore_label
      cm += np.bincount(label[valid].astype(np.int64) * num_classes + mask[valid],
                        minlength=num_classes ** 2).reshape(num_classes, num_classes)
    return iou_report(cm, names, len(masks))

  eng, step = Engine.from_workdir(args.workdir)
  full = np.array([[height, width]], np.int32)
  rows = {}
  start = time.time()
  engine_masks = [eng.run_padded('classes', c[None], full)[0] for c in canvases]
  rows['engine (uint8 canvas, pad 128)'] = (report(engine_masks), None)
  rows['engine (eval: pad = mean pixel)'] = (report(eng.predict([im for im, _ in examples])),
                                             None)
  print(f'engine: {time.time() - start:.0f}s', file=sys.stderr)

  os.makedirs(args.output_dir, exist_ok=True)
  for fmt in () if args.only_hf else ('tflite', 'onnx'):
    for quantize in (None, 'int8'):
      path = os.path.join(args.output_dir, f'model.{size}.{quantize or "float32"}.{fmt}')
      start = time.time()
      exporter.export_model(args.workdir, fmt, path, size=size, quantize=quantize,
                            calibration=args.calibration if quantize else None,
                            calibration_count=args.calibration_count,
                            log=lambda m: print(m, file=sys.stderr))
      export_s = time.time() - start
      if fmt == 'tflite':
        from ai_edge_litert.interpreter import Interpreter
        run = Interpreter(model_path=path, num_threads=2).get_signature_runner()
        masks = [run(images=c[None])['classes'][0] for c in canvases]
      else:
        import onnxruntime as ort
        session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
        masks = [session.run(['classes'], {'images': c[None]})[0][0] for c in canvases]
      agree = float(np.mean([np.mean(m[:r[0], :r[1]] == e[:r[0], :r[1]])
                             for m, e, r in zip(masks, engine_masks, regions)]))
      rows[f'{fmt} {quantize or "float32"}'] = (report(masks), agree)
      print(f'{fmt} {quantize or "float32"}: export {export_s:.0f}s', file=sys.stderr)

  # Hugging Face: transformers' own model of the exported folder, run two ways.
  import torch
  from transformers import MobileNetV2ForSemanticSegmentation
  folder = os.path.join(args.output_dir, 'hf')
  if not os.path.exists(os.path.join(folder, 'config.json')):
    exporter.export_model(args.workdir, 'hf', folder, log=lambda m: print(m, file=sys.stderr))
  hf = MobileNetV2ForSemanticSegmentation.from_pretrained(folder).eval()

  def hf_masks(images, align_corners):
    masks = []
    for image in images:
      x = torch.from_numpy(image.astype(np.float32).transpose(2, 0, 1)[None] / 127.5 - 1)
      with torch.no_grad():
        logits = hf(pixel_values=x).logits
        logits = torch.nn.functional.interpolate(logits, size=image.shape[:2], mode='bilinear',
                                                 align_corners=align_corners)
      masks.append(logits.argmax(1)[0].numpy().astype(np.uint8))
    return masks
  masks = hf_masks(canvases, True)
  agree = float(np.mean([np.mean(m[:r[0], :r[1]] == e[:r[0], :r[1]])
                         for m, e, r in zip(masks, engine_masks, regions)]))
  rows['hf: canvas, aligned corners'] = (report(masks), agree)
  images = [im for im, _ in examples]
  rows['hf: image as is, aligned corners'] = (report(hf_masks(images, True)), None)
  rows['hf: image as is, HF upsampling'] = (report(hf_masks(images, False)), None)

  print(f'\n{args.workdir} (step {step}), {len(examples)} {config.data.eval_split} images on '
        f'{size} canvases, int8 calibrated on {args.calibration_count} of {args.calibration!r}')
  print(f'| {"model":<32} | mIoU % | pixel acc. % | pixels = engine (same canvas) % |')
  print(f'|{"-" * 34}|--------|--------------|---------------------------------|')
  for name, (rep, agree) in rows.items():
    agree_text = '' if agree is None else f'{100 * agree:.3f}'
    print(f'| {name:<32} | {100 * rep["miou"]:6.2f} | {100 * rep["pixel_accuracy"]:12.2f} | '
          f'{agree_text:>31} |')
    if args.json:
      with open(args.json, 'a') as f:
        f.write(json.dumps({'row': name, 'miou': rep['miou'], 'size': size,
                            'pixel_accuracy': rep['pixel_accuracy'], 'agreement': agree,
                            'workdir': args.workdir, 'step': step}) + '\n')


if __name__ == '__main__':
  main()
