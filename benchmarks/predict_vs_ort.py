"""`predict` with its defaults against the obvious ONNX Runtime + Pillow script, same photos.

    python benchmarks/predict_vs_ort.py --workdir runs/qs --photos /tmp/p12 [--rounds 2]

Exports the workdir's model to ONNX with logits (`main.py export --format onnx --logits`)
once, then alternates, `--rounds` times, a fresh process of `main.py predict --input PHOTOS`
and of `benchmarks/ort_pillow_masks.py` (long side 513, network, per-class Pillow upsampling,
argmax, both PNGs). Prints one JSON line per run: images/s as each reports it (its own loop,
model loading excluded for both), wall seconds of the process and its peak RSS.
"""

import json
import os
import re
import subprocess
import sys
import tempfile

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
flags.DEFINE_string('workdir', None, 'A trained workdir.', required=True)
flags.DEFINE_string('photos', None, 'Folder of JPEGs.', required=True)
flags.DEFINE_integer('rounds', 2, 'Alternating rounds.')
FLAGS = flags.FLAGS


def _timed(name, command):
  import time
  start = time.perf_counter()
  process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
  stdout = process.stdout.read()
  _, status, usage = os.wait4(process.pid, 0)
  wall = time.perf_counter() - start
  rate = re.search(r'\(([\d.]+) images/s\)', stdout)
  return {'run': name, 'exit_status': os.waitstatus_to_exitcode(status),
          'images_per_s': float(rate.group(1)) if rate else None,
          'process_seconds': round(wall, 1), 'peak_rss_mib': round(usage.ru_maxrss / 1024)}


def main(_):
  with tempfile.TemporaryDirectory() as tmp:
    model = os.path.join(tmp, 'model.onnx')
    subprocess.run([sys.executable, 'main.py', 'export', '--workdir', FLAGS.workdir,
                    '--format', 'onnx', '--logits', '--output', model], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    for round_ in range(FLAGS.rounds):
      ours = [sys.executable, 'main.py', 'predict', '--workdir', FLAGS.workdir, '--input',
              FLAGS.photos, '--output', os.path.join(tmp, f'ours{round_}')]
      peer = [sys.executable, 'benchmarks/ort_pillow_masks.py', '--model', model, '--input',
              FLAGS.photos, '--output', os.path.join(tmp, f'ort{round_}')]
      for name, command in (('predict (defaults)', ours), ('onnxruntime + Pillow, 513', peer)):
        print(json.dumps(dict(_timed(name, command), round=round_)), flush=True)


if __name__ == '__main__':
  app.run(main)
