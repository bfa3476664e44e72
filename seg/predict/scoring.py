"""`main.py eval --images ... --labels DIR`: `eval`'s report for image files and label files.

    python main.py eval --workdir runs/qs --images photos/ --labels photo-labels/ \\
        [--output report.json [--worst N]] [--dtype ...] [--scales ... --flip] [--max-side N]

No dataset to prepare and no TensorFlow: the images are any `predict` takes (files, folders,
globs, lists), each image's label is LABELS/RELATIVE_STEM.png, where RELATIVE is the path
that `predict` mirrors under its output folder (else LABELS/STEM.png), read as a dataset
folder's labels are read (`seg.data.folder.read_label`). The masks scored are those
`predict` writes (`Segmenter`: large images downscaled to `--max-side` and their scores
taken back to full size), and the figures are `eval`'s (`Segmenter.evaluate`): one confusion
matrix over every labelled pixel, per-class IoU, each image's scores, the same table, JSON,
CSV and charts.
"""

import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from seg.predict.files import IMAGE_EXTENSIONS, InputFile, collect_inputs
from seg.predict.images import load_rgb
from seg.predict.progress import Progress
from seg.predict.segmenter import Segmenter

MISSING_SHOWN = 5


def label_paths(files: Sequence[InputFile], labels: str) -> Tuple[List[str], List[str]]:
  """(each image's label file, the images without one): LABELS/RELATIVE_STEM.png, else
  LABELS/STEM.png."""
  found, missing = [], []
  for item in files:
    stem = os.path.splitext(item.relative)[0]
    candidates = [os.path.join(labels, stem + '.png'),
                  os.path.join(labels, os.path.basename(stem) + '.png')]
    path = next((c for c in candidates if os.path.isfile(c)), None)
    if path is None:
      missing.append(item.relative)
    found.append(path)
  return found, missing


def evaluate_files(workdir: str, images: Sequence[str], labels: str,
                   output: Optional[str] = None, worst: int = 0, log=print,
                   progress_stream=None, **segmenter_options) -> Dict:
  """Scores the model of `workdir` on image files against their label files in `labels`,
  prints `eval`'s table and, with `output`, writes its report files (see the module
  docstring), with a progress line on `progress_stream` (default stderr).
  `segmenter_options`: `Segmenter`'s (dtype, scales, flip, max_side, ...)."""
  from seg.inference import metrics
  from seg.inference.evaluate import write_panels, write_report
  if worst and not output:
    raise ValueError('--worst writes its panels beside the report: give --output too')
  if not os.path.isdir(labels):
    raise FileNotFoundError(f'--labels {labels}: no such folder')
  files = collect_inputs(list(images)).files
  unreadable = [f'{item.path} ({item.error})' for item in files if item.error]
  if unreadable:
    raise FileNotFoundError(f'{len(unreadable)} input(s) not found: ' +
                            ', '.join(unreadable[:MISSING_SHOWN]))
  if not files:
    raise FileNotFoundError(f'no images ({", ".join(IMAGE_EXTENSIONS)}) in '
                            f'{", ".join(images)}')
  label_files, missing = label_paths(files, labels)
  if missing:
    shown = ', '.join(missing[:MISSING_SHOWN]) + (', ...' if len(missing) > MISSING_SHOWN
                                                  else '')
    first = os.path.join(labels, os.path.splitext(missing[0])[0] + '.png')
    raise FileNotFoundError(
        f'{len(missing)} of {len(files)} image(s) have no label in {labels}: {shown} '
        f'(for the first: no {first}, nor one of its name directly in {labels})')
  segmenter = Segmenter(workdir, log=log, **segmenter_options)  # kernel builds, calibration
  segmenter.engine.log = None  # its compilations would come under the progress line
  ids = [os.path.splitext(item.relative)[0] for item in files]
  log(f'evaluating {workdir} at step {segmenter.step} on {len(files)} image(s) of '
      f'{", ".join(images)} against {labels} ({segmenter!r})')
  shown = Progress(len(files), progress_stream)
  report = segmenter.evaluate([item.path for item in files], label_files, ids=ids,
                              progress=shown.update)
  report['step'] = segmenter.step
  report['dtype'] = np.dtype(segmenter.engine.dtype).name
  log(metrics.format_report(report))
  if output:
    stem = os.path.splitext(output)[0]
    write_report(report, output, stem + '_', log)
    if worst:
      paths, label_of = dict(zip(ids, (f.path for f in files))), dict(zip(ids, label_files))

      def example(name):  # image | label | the mask `predict` writes
        image = load_rgb(paths[name])
        return image, segmenter.label(label_of[name], name), segmenter(image)
      write_panels(report['images'], worst, stem + '_worst', example,
                   segmenter.config.data.ignore_label,
                   segmenter.config.data.get('class_colours', ''), log)
  return report
