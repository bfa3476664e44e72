"""The obvious mask script a user would write with ONNX Runtime and Pillow (the peer of
`predict` in benchmarks/predict_vs_ort.py).

    python main.py export --workdir runs/qs --format onnx --logits --output model.onnx
    python benchmarks/ort_pillow_masks.py --model model.onnx --input photos/ --output masks/

For every JPEG: decode (Pillow, EXIF orientation applied), resize the long side to 513
(bilinear), run the network (the export's `logits` output: [1, h, w, C] at the resized size),
upsample every class's logits to the original size (Pillow bilinear on float images), argmax,
save the palette PNG (VOC colours) and the RGB colour PNG. Two intra-op threads.
"""

import argparse
import glob
import os
import time

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps


def voc_palette():
  cmap = np.zeros((256, 3), np.uint8)
  for i in range(256):
    for bit in range(8):
      for channel in range(3):
        cmap[i, channel] |= ((i >> (3 * bit + channel)) & 1) << (7 - bit)
  return cmap


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', required=True)
  parser.add_argument('--input', required=True)
  parser.add_argument('--output', required=True)
  parser.add_argument('--side', type=int, default=513)
  parser.add_argument('--threads', type=int, default=2)
  args = parser.parse_args()
  options = ort.SessionOptions()
  options.intra_op_num_threads = args.threads
  session = ort.InferenceSession(args.model, options, providers=['CPUExecutionProvider'])
  cmap = voc_palette()
  os.makedirs(args.output, exist_ok=True)
  paths = sorted(glob.glob(os.path.join(args.input, '*.jpg')))
  start = time.perf_counter()
  for path in paths:
    image = ImageOps.exif_transpose(Image.open(path)).convert('RGB')
    width, height = image.size
    scale = args.side / max(width, height)
    small = image.resize((round(width * scale), round(height * scale)), Image.BILINEAR)
    logits = session.run(['logits'], {'images': np.asarray(small)[None]})[0][0]  # [h, w, C]
    upsampled = np.stack([np.asarray(Image.fromarray(logits[..., c]).resize(
        (width, height), Image.BILINEAR)) for c in range(logits.shape[-1])], -1)
    mask = upsampled.argmax(-1).astype(np.uint8)
    stem = os.path.join(args.output, os.path.splitext(os.path.basename(path))[0])
    png = Image.fromarray(mask, mode='P')
    png.putpalette(cmap.reshape(-1).tolist())
    png.save(stem + '.png')
    Image.fromarray(cmap[mask]).save(stem + '_color.png')
  seconds = time.perf_counter() - start
  print(f'time {seconds:.1f} s ({len(paths) / seconds:.2f} images/s) for {len(paths)} images')


if __name__ == '__main__':
  main()
