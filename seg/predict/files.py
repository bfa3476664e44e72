"""Which files `predict` reads, and where each one's outputs go.

`collect_inputs` expands the `--input` values (image files, folders searched
recursively, glob patterns, list files) into image files, each once, with the
relative path that its outputs mirror under the output folder.
`check_output_folder` refuses an output folder inside an input folder or
holding an input file (inputs are never written to). `plan_jobs` turns each
input into a `Job`: the input and the output stem that its files
(`seg.predict.outputs.output_suffixes`) are written to, renaming outputs that would
collide.
"""

import dataclasses
import glob as glob_lib
import hashlib
import os
from typing import Dict, List, NamedTuple, Sequence, Tuple

from seg.predict.options import Options
from seg.predict.outputs import output_suffixes


IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp', '.ppm',
                    '.avif', '.heic', '.heif')  # HEIC/HEIF through pillow-heif
LIST_EXTENSIONS = ('.txt', '.lst')


@dataclasses.dataclass
class InputFile:
  path: str       # as found (absolute for list entries)
  relative: str   # mirrored under the output folder
  error: str = ''  # set when the input cannot even be looked at (e.g. missing list entry)


def _is_glob(value: str) -> bool:
  return any(c in value for c in '*?[')


def _walk(folder: str) -> Tuple[List[str], int]:
  """Image files under `folder` (sorted, recursive) and the number of other files."""
  found, ignored = [], 0
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    for name in sorted(files):
      if name.lower().endswith(IMAGE_EXTENSIONS):
        found.append(os.path.join(root, name))
      else:
        ignored += 1
  return found, ignored


def _relative_to_common(paths: Sequence[str]) -> List[InputFile]:
  if not paths:
    return []
  root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
  return [InputFile(p, os.path.relpath(os.path.abspath(p), root)) for p in paths]


def _resolve(value: str, base: str = '') -> Tuple[List[InputFile], List[str], int]:
  """One input value -> (files, folder roots, ignored non-image files in folders)."""
  path = os.path.join(base, os.path.expanduser(value))
  if os.path.isdir(path):
    files, ignored = _walk(path)
    return [InputFile(f, os.path.relpath(f, path)) for f in files], [path], ignored
  if os.path.isfile(path):
    if path.lower().endswith(LIST_EXTENSIONS) and not base:
      return _read_list(path)
    return [InputFile(path, os.path.basename(path))], [], 0
  if _is_glob(path):
    matches = sorted(glob_lib.glob(path, recursive=True))
    files, roots, ignored = [], [], 0
    for match in matches:
      if os.path.isdir(match):
        found, n = _walk(match)
        files += found
        ignored += n
      elif not match.lower().endswith(LIST_EXTENSIONS):
        files.append(match)
    if not files:
      raise FileNotFoundError(f'--input {value}: the pattern matches no file')
    return _relative_to_common(files), roots, ignored
  if base:  # a missing entry of a list is one failed input, not the end of the run
    return [InputFile(path, os.path.basename(path), 'not found')], [], 0
  raise FileNotFoundError(f'--input {value}: no such file, folder or pattern')


def _read_list(list_path: str) -> Tuple[List[InputFile], List[str], int]:
  """Entries of a list file; relative entries resolve against the list file's folder."""
  base = os.path.dirname(os.path.abspath(list_path))
  paths, missing, roots, ignored = [], [], [], 0
  with open(list_path, encoding='utf-8') as f:
    for line in f:
      entry = line.strip()
      if not entry or entry.startswith('#'):
        continue
      files, entry_roots, n = _resolve(entry, base)
      roots += entry_roots
      ignored += n
      for item in files:
        (missing if item.error else paths).append(item if item.error else item.path)
  return _relative_to_common(paths) + missing, roots, ignored


class Inputs(NamedTuple):
  files: List[InputFile]   # each file once, in the order found
  roots: List[str]         # the folder values
  ignored: int             # files without an image extension in those folders
  duplicates: List[Tuple[str, str]]  # (path, earlier path): a file found again under
  #                                    another name (a symlink, a repeated value); skipped


def collect_inputs(values: Sequence[str]) -> Inputs:
  """All image inputs named by `values`, each once (`Inputs`).

  A value is an image file, a folder (searched recursively for the extensions
  in IMAGE_EXTENSIONS), a glob pattern (`**` recurses), or a list file
  (.txt/.lst, one path, folder or pattern a line, `#` comments; relative
  entries resolve against the list file's folder). A value may be a comma
  list. Outputs mirror paths relative to a folder value, or, for files found
  through a pattern or a list, relative to the deepest folder holding all of
  them (a single file: its name). A file found again (the same real path, e.g. through a
  symlink) is predicted under the first name only; `duplicates` names the others that
  differ from it.
  """
  result, roots, ignored, seen, names, duplicates = [], [], 0, {}, set(), []
  for value in values:
    parts = [value] if os.path.exists(value) else [v for v in value.split(',') if v]
    for part in parts:
      files, part_roots, n = _resolve(part)
      roots += part_roots
      ignored += n
      for item in files:
        name, key = os.path.abspath(item.path), os.path.realpath(item.path)
        if name in names:  # the same path again: a repeated or overlapping value
          continue
        names.add(name)
        if key in seen:
          duplicates.append((item.path, seen[key]))
        else:
          seen[key] = item.path
          result.append(item)
  return Inputs(result, roots, ignored, duplicates)


def check_output_folder(inputs: Sequence[InputFile], roots: Sequence[str], output_dir: str):
  """Refuses an output folder inside an input folder, or one that holds an input file."""
  out = os.path.realpath(output_dir)
  inside = lambda path, folder: path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)
  for root in roots:
    if inside(out, os.path.realpath(root)):
      raise ValueError(f'output folder {output_dir} is inside the input folder {root}; '
                       'choose one outside it (inputs are never written to)')
  for item in inputs:
    if not item.error and inside(os.path.realpath(item.path), out):
      raise ValueError(f'input {item.path} lies inside the output folder {output_dir}; '
                       'choose an output folder that holds no input')


def shard_of(relative: str, count: int) -> int:
  """The shard (0 .. count - 1) of an input, from a hash of its relative path alone.

  The path's '/'-separated form is hashed (SHA-1, the first 8 bytes as an integer, modulo
  count), so an input keeps its shard on every machine and operating system, and adding or
  removing other files never moves it (`predict --shard K/N`).
  """
  key = relative.replace(os.sep, '/').encode('utf-8')
  return int.from_bytes(hashlib.sha1(key).digest()[:8], 'big') % count


# ----------------------------------------------------------------------------------------------
# Jobs: one input and the outputs it should produce.



@dataclasses.dataclass
class Job:
  path: str
  stem: str           # output path without suffix
  error: str = ''

  def outputs(self, options: Options) -> List[str]:
    return [self.stem + s for s in output_suffixes(options)]

  def done(self, options: Options) -> bool:
    return all(os.path.exists(p) for p in self.outputs(options))


def plan_jobs(inputs: Sequence[InputFile], output_dir: str, options: Options) -> List[Job]:
  """One job per input; inputs whose outputs would collide get their extension in the name.

  `a.jpg` and `a.png` in one folder both map to `a.png`, as `a_color.png` maps
  onto `a.png`'s colour mask: such inputs write `a.jpg.png`, `a.png.png`, ...
  Collisions left after that fail those inputs with a reason.
  """
  jobs = [Job(i.path, os.path.join(output_dir, os.path.splitext(i.relative)[0]), i.error)
          for i in inputs]
  for attempt in range(2):
    owners: Dict[str, List[int]] = {}
    for index, job in enumerate(jobs):
      if not job.error:
        for path in job.outputs(options):
          owners.setdefault(os.path.normcase(path), []).append(index)
    clashes = {i for owner in owners.values() if len(owner) > 1 for i in owner}
    for index in sorted(clashes):
      job = jobs[index]
      if attempt == 0:
        job.stem = os.path.join(output_dir, inputs[index].relative)
      else:
        others = sorted({jobs[j].path for o in owners.values() if index in o for j in o} -
                        {job.path})
        job.error = f'its outputs would overwrite those of {", ".join(others)}'
  return jobs

