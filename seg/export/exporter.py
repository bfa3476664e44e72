"""`main.py export`: a workdir's latest checkpoint as a file another runtime loads.

    python main.py export --workdir runs/qs --format tflite --output model.tflite [--size 257x257]
    python main.py export --workdir runs/qs --format tflite --output model.int8.tflite \\
        --quantize int8 --calibration train
    python main.py export --workdir runs/qs --format onnx --output model.onnx [--quantize int8 ...]
    python main.py export --workdir runs/qs --format hf --output hf-model/
    python main.py export --workdir runs/qs --output model.jax        (--format jax, the default)

Every format is built from the same trained variables: LiteRT and ONNX from the folded
weights (`seg.inference.fold`) walked by `seg.export.network`, Hugging Face from the variables
themselves (`seg.weights.hf.write_hf`), jax by `seg.inference.export`. docs/export.md has
what each format takes and gives, how it was checked, and its accuracy and speed.
"""

import os
import time
from typing import Optional

import jax
import numpy as np

from seg import checkpoint
from seg.classes import class_names
from seg.export import FORMATS
from seg.export.inputs import calibration_canvases, parse_size
from seg.inference.calibration import DEFAULT_COUNT
from seg.inference.fold import fold_variables
from seg.model import create_model
from seg.preprocessing import large_canvas

QUANTIZE = ('int8',)


def _check_arguments(fmt: str, size: Optional[str], quantize: Optional[str],
                     calibration: Optional[str]) -> None:
  """Flag combinations that cannot work, before anything slow happens."""
  if fmt not in FORMATS:
    raise ValueError(f'--format must be one of {", ".join(FORMATS)}, got {fmt!r}')
  if quantize and quantize not in QUANTIZE:
    raise ValueError(f'--quantize must be one of {", ".join(QUANTIZE)}, got {quantize!r}')
  if quantize and fmt not in ('tflite', 'onnx'):
    raise ValueError(f'--quantize is for --format tflite or onnx, not {fmt}')
  if quantize and not calibration:
    raise ValueError('--quantize int8 needs --calibration: a folder, glob or list of training '
                     'images, or a dataset split (e.g. --calibration train)')
  if calibration and not quantize:
    raise ValueError('--calibration is only used with --quantize int8')
  if size and fmt in ('hf', 'jax'):
    raise ValueError(f'--size is for --format tflite or onnx (jax: --height/--width; hf: '
                     'the model takes any size)')
  if size:
    parse_size(size, 0)  # a malformed or unsupported size fails before anything is loaded


def export_model(workdir: str, fmt: str, output: str, config=None, size: Optional[str] = None,
                 quantize: Optional[str] = None, calibration: Optional[str] = None,
                 calibration_count: Optional[int] = None, logits: bool = False,
                 upsample: bool = True, log=print) -> dict:
  """Writes `output` in format `fmt` ('tflite', 'onnx' or 'hf'); returns a summary record.

  `upsample=False` (tflite, onnx; no command-line flag) writes the network alone: logits at
  the feature resolution, no resize or argmax, for benchmarks/export_speed.py.

  Raises FileNotFoundError (no config or checkpoint in `workdir`) or ValueError (a bad size,
  flag combination, or calibration source) before converting anything.
  """
  start = time.time()
  _check_arguments(fmt, size, quantize, calibration)
  if fmt == 'jax':
    raise ValueError('the jax format is written by seg.inference.export.export_workdir')
  config = config or checkpoint.load_config(workdir)
  canvas = large_canvas(config.data) or config.data.eval_size   # a folder model's: eval's square
  hw = parse_size(size, canvas) if fmt != 'hf' else None
  if fmt == 'onnx' and not size:
    hw = None   # dynamic height and width
  variables, step = checkpoint.load_model_variables(workdir, create_model(config.model))
  variables = jax.device_get(variables)
  canvases = []
  if quantize:
    ch, cw = hw or (canvas, canvas)
    canvases = calibration_canvases(calibration, config, calibration_count or DEFAULT_COUNT,
                                    ch, cw)
    log(f'calibration: {len(canvases)} images from {calibration} on {ch}x{cw} canvases')
  parent = os.path.dirname(os.path.abspath(output))
  os.makedirs(parent, exist_ok=True)
  record = {'format': fmt, 'workdir': workdir, 'step': step, 'output': output,
            'quantize': quantize or 'float32', 'size': list(hw) if hw else None,
            'calibration_images': len(canvases)}
  if fmt == 'hf':
    from seg.weights.hf import write_hf
    write_hf(config, variables, output,
             class_names(config.data.dataset, config.model.num_classes,
                         config.data.class_names))
    record['bytes'] = sum(os.path.getsize(os.path.join(output, f)) for f in os.listdir(output))
  else:
    folded = fold_variables(config.model, variables, xp=np)
    log(f'converting {workdir} (step {step}) to {fmt} {quantize or "float32"}...')
    if fmt == 'tflite':
      from seg.export import tflite
      blob = tflite.convert(folded, config.model, *hw, quantize=quantize, calibration=canvases,
                            logits=logits, upsample=upsample, log=log)
    else:
      from seg.export import onnx as onnx_export
      model = onnx_export.build(folded, config.model, hw, logits=logits,
                                description=f'{workdir} step {step}', upsample=upsample)
      if quantize:
        model = onnx_export.quantize_int8(model, canvases, log=log)
      blob = model.SerializeToString()
    with open(output, 'wb') as f:
      f.write(blob)
    record['bytes'] = len(blob)
  record['seconds'] = round(time.time() - start, 1)
  log(format_summary(record, config, logits))
  return record


def format_summary(record: dict, config, logits: bool) -> str:
  """The one-screen summary of an export."""
  fmt, size = record['format'], record['size']
  hw = f'{size[0]}, {size[1]}' if size else 'H, W'
  lines = [f'exported {record["workdir"]} (step {record["step"]}) as {fmt} '
           f'{record["quantize"]} to {record["output"]}: {record["bytes"] / 2**20:.1f} MiB '
           f'in {record["seconds"]:.0f}s']
  classes = config.model.num_classes
  if fmt == 'tflite':
    lines.append(f'  input images uint8 [1, {hw}, 3] RGB -> classes uint8 [1, {hw}]'
                 + (f', logits float32 [1, {hw}, {classes}]' if logits else ''))
    lines.append('  smaller images: pad at the bottom/right with 128 and crop the mask; '
                 'larger ones: scale to fit first (seg/export/inputs.py)')
    lines.append('  run it: ai_edge_litert.interpreter.Interpreter(model_path=...)'
                 '.get_signature_runner()(images=...)["classes"]; docs/export.md')
  elif fmt == 'onnx':
    lines.append(f'  input images uint8 [N, {hw}, 3] RGB -> classes uint8 [N, {hw}]'
                 + (f', logits float32 [N, {hw}, {classes}]' if logits else '')
                 + ('' if size else ' (N, H, W dynamic)'))
    lines.append('  run it: onnxruntime.InferenceSession(path).run(["classes"], '
                 '{"images": batch}); docs/export.md')
  else:
    lines.append('  config.json + model.safetensors (+ preprocessor_config.json): '
                 'transformers.MobileNetV2ForSemanticSegmentation.from_pretrained(folder)')
    lines.append('  logits at the feature resolution, inputs in [-1, 1]; it pools over the '
                 'image it is given, not a padded canvas (docs/export.md)')
  if record['calibration_images']:
    lines.append(f'  int8: calibrated on {record["calibration_images"]} images')
  return '\n'.join(lines)
