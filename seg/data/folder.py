"""Your own dataset: a folder in the VOC layout (`config.data.dataset = 'folder'`).

    ROOT/JPEGImages/ID.jpg                  the images (.jpg, .png, or any format Pillow reads)
    ROOT/SegmentationClass/ID.png           the labels, one per image, at the image's size
    ROOT/ImageSets/Segmentation/SPLIT.txt   the ids of each split (train.txt, val.txt, ...)
    ROOT/labelmap.txt                       optional: the classes in order, `name:r,g,b::`

A label is a PNG of class indices (palette or grey-scale; 255 = void, ignored), as VOC's,
or a colour PNG whose colours labelmap.txt names, as CVAT and Datumaro export the VOC
format ("Segmentation mask"): the class of a colour is its line in labelmap.txt (a
`# ...` header skipped), VOC's void colour (224, 224, 192) is 255. Colour PNGs without a
labelmap.txt are VOC's 21 classes in VOC's colours (CVAT's rule: labelmap.txt is needed
only for labels other than VOC's). labelmap.txt also gives the classes' names (eval.json,
the exports) and colours (`predict`'s masks).

The folder is prepared as TFRecords once, under a name made from its contents (every
listed file's size and modification time, the lists, labelmap.txt): a folder changed
afterwards is prepared again, never read stale. An image whose label has its size only
after its EXIF orientation (the annotation tool rotated the photo) is stored upright
(as PNG); one whose label has neither size is an error naming both.
No TensorFlow here.
"""

import dataclasses
import hashlib
import io
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageOps

from seg.classes import VOC_CLASS_NAMES, voc_colormap
from seg.data import labels

IMAGES, LABELS = 'JPEGImages', 'SegmentationClass'
LISTS = os.path.join('ImageSets', 'Segmentation')
LABELMAP = 'labelmap.txt'
VOID_COLOUR = (224, 224, 192)  # VOC's void boundary colour
# The encoded bytes of these are stored as they are (the input pipeline decodes both).
_STORED_AS_IS = ('JPEG', 'PNG')
_SPLIT_NAME = re.compile(r'^[A-Za-z0-9_]+$')
_ORIENTATION = 0x0112


class FolderError(FileNotFoundError):
  """The folder is not in the layout, or a file in it cannot be used."""


@dataclasses.dataclass(frozen=True)
class Classes:
  """labelmap.txt: names in class order, and each class's colour (None: no colours given)."""
  names: Tuple[str, ...]
  colours: Optional[Tuple[Tuple[int, int, int], ...]]
  source: str = LABELMAP  # where they come from, for messages


# The classes of colour labels without labelmap.txt.
VOC_CLASSES = Classes(VOC_CLASS_NAMES,
                      tuple(tuple(c) for c in voc_colormap()[:len(VOC_CLASS_NAMES)].tolist()),
                      f'VOC\'s colour map (the folder has no {LABELMAP})')


def read_labelmap(root: str) -> Optional[Classes]:
  """ROOT/labelmap.txt (CVAT's and Datumaro's `name:r,g,b:parts:actions` lines, or one name a
  line), or None where there is none."""
  path = os.path.join(root, LABELMAP)
  if not os.path.isfile(path):
    return None
  names, colours = [], []
  with open(path, encoding='utf-8') as f:
    for number, line in enumerate(f, 1):
      line = line.strip()
      if not line or line.startswith('#'):
        continue
      name, _, rest = line.partition(':')
      colour = rest.partition(':')[0].strip()
      if colour:
        try:
          rgb = tuple(int(v) for v in colour.split(','))
        except ValueError:
          rgb = ()
        if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
          raise FolderError(f'{path}, line {number}: {colour!r} is not a colour r,g,b')
        colours.append(rgb)
      names.append(name.strip())
  if not names:
    raise FolderError(f'{path} names no class')
  if colours and len(colours) != len(names):
    raise FolderError(f'{path}: {len(colours)} of its {len(names)} classes have a colour; '
                      'give every class one, or none')
  if len(set(colours)) != len(colours):
    raise FolderError(f'{path}: two classes have the same colour')
  if len(names) > labels.IGNORE_LABEL:
    raise FolderError(f'{path} names {len(names)} classes; at most {labels.IGNORE_LABEL}')
  return Classes(tuple(names), tuple(colours) if colours else None)


def folder_classes(root: str, splits: Dict[str, List[str]]) -> Optional[Classes]:
  """The classes of the folder's labels: labelmap.txt's; without it VOC's when its labels are
  colour PNGs (the first listed one decides), else None (class indices)."""
  classes = read_labelmap(root)
  if classes is not None:
    return classes
  first = os.path.join(root, LABELS, next(iter(splits.values()))[0] + '.png')
  with Image.open(first) as png:
    return VOC_CLASSES if png.mode in ('RGB', 'RGBA') else None


def check_layout(root: str) -> Dict[str, List[str]]:
  """{split: ids} of ROOT/ImageSets/Segmentation/*.txt; FolderError naming what is missing."""
  if not root:
    raise FolderError("config.data.dataset='folder' reads config.data.folder, which is empty: "
                      'give the folder (--config.data.folder=DIR)')
  missing = [d for d in (IMAGES, LABELS, LISTS) if not os.path.isdir(os.path.join(root, d))]
  if missing:
    raise FolderError(f'{root} lacks {", ".join(missing)}: a dataset folder holds {IMAGES}/, '
                      f'{LABELS}/ and {LISTS}/SPLIT.txt (the VOC layout, seg/data/folder.py)')
  splits = {}
  for file_name in sorted(os.listdir(os.path.join(root, LISTS))):
    split, ext = os.path.splitext(file_name)
    if ext != '.txt':
      continue
    if not _SPLIT_NAME.match(split):
      raise FolderError(f'{os.path.join(root, LISTS, file_name)}: a split name has only '
                        'letters, digits and _')
    with open(os.path.join(root, LISTS, file_name), encoding='utf-8') as f:
      ids = [line.strip() for line in f if line.strip()]  # (an id may hold spaces)
    if ids:
      splits[split] = ids
  if not splits:
    raise FolderError(f'{os.path.join(root, LISTS)} holds no SPLIT.txt listing image ids '
                      '(one id a line, e.g. train.txt and val.txt)')
  return splits


def _files(folder: str) -> List[str]:
  """The files under `folder`, as paths relative to it ('a.jpg', 'sub/b.jpg'), hidden ones
  left out."""
  found = []
  for parent, folders, names in os.walk(folder):
    folders[:] = [f for f in folders if not f.startswith('.')]
    relative = os.path.relpath(parent, folder)
    found += [n if relative == '.' else os.path.join(relative, n) for n in names
              if not n.startswith('.')]
  return found


def image_files(root: str) -> Dict[str, str]:
  """{id: file name} of ROOT/JPEGImages (ids with folders, 'sub/name', as annotation tools
  write them for images in subfolders); FolderError where two files share an id."""
  found = {}
  for file_name in sorted(_files(os.path.join(root, IMAGES))):
    stem, ext = os.path.splitext(file_name)
    if not ext:
      continue
    if stem in found:
      raise FolderError(f'{os.path.join(root, IMAGES)} holds {found[stem]} and {file_name}: '
                        'which is the image of id ' + repr(stem) + '?')
    found[stem] = file_name
  return found


def check_files(root: str, splits: Dict[str, List[str]], images: Dict[str, str]) -> None:
  """FolderError naming the listed ids without an image or a label (all at once: before
  anything is read)."""
  label_files = set(_files(os.path.join(root, LABELS)))
  listed = sorted({i for ids in splits.values() for i in ids})
  problems = [f'{name}: ' + ' and '.join(
      what for what, lacking in (('no image', name not in images),
                                 (f'no {LABELS}/{name}.png', name + '.png' not in label_files))
      if lacking) for name in listed
      if name not in images or name + '.png' not in label_files]
  if problems:
    raise FolderError(
        f'{len(problems)} of the {len(listed):,} ids listed in {os.path.join(root, LISTS)} lack '
        f'their files: {"; ".join(problems[:5])}{"; ..." if len(problems) > 5 else ""} '
        f'(the image is {IMAGES}/ID.jpg or another format, the label {LABELS}/ID.png)')


def fingerprint(root: str, splits: Dict[str, List[str]], images: Dict[str, str]) -> str:
  """A digest of the folder's contents as the dataset reads them (12 hex digits)."""
  digest = hashlib.sha256()
  for split in sorted(splits):
    digest.update(f'{split}:{",".join(splits[split])}\n'.encode())
  labelmap = os.path.join(root, LABELMAP)
  paths = [labelmap] if os.path.isfile(labelmap) else []
  for name in sorted({i for ids in splits.values() for i in ids}):
    paths.append(os.path.join(root, IMAGES, images.get(name, name)))
    paths.append(os.path.join(root, LABELS, name + '.png'))
  for path in paths:
    try:
      stat = os.stat(path)
      digest.update(f'{path}:{stat.st_size}:{stat.st_mtime_ns}\n'.encode())
    except FileNotFoundError:
      digest.update(f'{path}:missing\n'.encode())
  return digest.hexdigest()[:12]


def read_label(path: str, classes: Optional[Classes]) -> np.ndarray:
  """A label PNG as class indices [h, w] uint8: palette or grey-scale indices as they are, a
  colour PNG through labelmap.txt's colours (VOC's void colour -> 255)."""
  if not os.path.isfile(path):
    raise FolderError(f'{path} is missing: every listed id needs its label')
  with Image.open(path) as png:
    if png.mode in ('P', 'L'):
      return np.array(png, np.uint8)
    if png.mode in ('I', 'I;16', 'I;16B'):
      values = np.array(png)
      if values.min() < 0 or values.max() > 255:
        raise labels.LabelError(f'{path}: 16-bit label values up to {values.max()}; class '
                                'indices are 0..254 (255 = void)')
      return values.astype(np.uint8)
    if png.mode not in ('RGB', 'RGBA'):
      raise labels.LabelError(f'{path}: a label PNG of mode {png.mode}; labels are palette, '
                              'grey-scale or (with labelmap.txt\'s colours) colour PNGs')
    if classes is None or classes.colours is None:
      raise labels.LabelError(
          f'{path} is a colour PNG: its classes need {LABELMAP} (name:r,g,b:: lines, the '
          'classes in order) in the dataset folder, or save labels as class indices')
    rgb = np.array(png.convert('RGB'), np.uint8)
  return _indices_of_colours(rgb, classes, path)


def _indices_of_colours(rgb: np.ndarray, classes: Classes, path: str) -> np.ndarray:
  colours = classes.colours
  codes = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
  palette = [(r << 16) | (g << 8) | b for r, g, b in colours]
  void = (VOID_COLOUR[0] << 16) | (VOID_COLOUR[1] << 8) | VOID_COLOUR[2]
  keys = np.array(palette + ([void] if void not in palette else []), np.int32)
  values = np.array(list(range(len(palette))) + ([labels.IGNORE_LABEL] if void not in palette
                                                  else []), np.uint8)
  order = np.argsort(keys)
  keys, values = keys[order], values[order]
  position = np.clip(np.searchsorted(keys, codes), 0, len(keys) - 1)
  known = keys[position] == codes
  if not known.all():
    unknown, counts = np.unique(codes[~known], return_counts=True)
    shown = ', '.join(f'({c >> 16}, {(c >> 8) & 255}, {c & 255}): {n} px'
                      for c, n in sorted(zip(unknown, counts), key=lambda x: -x[1])[:5])
    raise labels.LabelError(f'{path}: colours that {classes.source} does not name: {shown}'
                            + (', ...' if len(unknown) > 5 else ''))
  return values[position]


def read_example(root: str, name: str, image_file: Optional[str],
                 classes: Optional[Classes]) -> Tuple[bytes, np.ndarray]:
  """(encoded image, label [h, w] uint8) of id `name`: a JPEG or PNG as its bytes, other
  formats (and images stored upright, see the module docstring) as PNG bytes."""
  label_path = os.path.join(root, LABELS, name + '.png')
  if image_file is None:
    raise FolderError(f'{os.path.join(root, IMAGES, name)}.jpg (or another image of id '
                      f'{name!r}) is missing: every listed id needs its image')
  image_path = os.path.join(root, IMAGES, image_file)
  label = read_label(label_path, classes)
  label_size = label.shape[1], label.shape[0]
  try:
    with Image.open(image_path) as image:
      size, fmt = image.size, image.format
      orientation = image.getexif().get(_ORIENTATION, 1)
      upright = size[::-1] if orientation in (5, 6, 7, 8) else size
      if label_size == size and fmt in _STORED_AS_IS and image.mode in ('RGB', 'L'):
        with open(image_path, 'rb') as f:
          return f.read(), label
      if label_size not in (size, upright):
        raise FolderError(
            f'{label_path} is {label_size[0]}x{label_size[1]} but its image {image_path} is '
            f'{size[0]}x{size[1]}' + (f' ({upright[0]}x{upright[1]} upright)'
                                      if upright != size else '')
            + ': a label must have its image\'s size')
      if label_size != size:
        image = ImageOps.exif_transpose(image)
      buffer = io.BytesIO()
      image.convert('RGB').save(buffer, format='PNG', compress_level=1)
      return buffer.getvalue(), label
  except (OSError, SyntaxError) as e:  # Pillow's errors for unreadable or truncated images
    raise FolderError(f'{image_path} cannot be read as an image ({e})') from None


def label_pixels(facts: dict) -> np.ndarray:
  """[256] int64: the pixels of each label value over every split of a prepared folder
  (`seg.data.voc.folder_facts`)."""
  return np.sum([np.asarray(p, np.int64) for p in facts['class_pixels'].values()], axis=0)


def class_count(facts: dict) -> int:
  """A prepared folder's classes: labelmap.txt's, else the largest class index + 1."""
  if facts['names']:
    return len(facts['names'])
  used = np.flatnonzero(label_pixels(facts)[:labels.IGNORE_LABEL])
  return int(used[-1]) + 1 if len(used) else 1


def class_summary(facts: dict, data_dir: str = '') -> str:
  """The classes a prepared folder's labels hold, with their share of the labelled pixels,
  and the config fields that train on it (prepared in `data_dir`, '' = TFDS's default)."""
  pixels, names, count = label_pixels(facts), facts['names'], class_count(facts)
  labelled = max(int(pixels[:labels.IGNORE_LABEL].sum()), 1)
  source = (facts.get('classes_from') or LABELMAP) if names else 'class ids in the labels'
  lines = [f'  {count} classes ({source}), '
           f'share of the labelled pixels; void: {pixels[255]:,} pixels']
  for i in range(count):
    name = names[i] if names else str(i)
    lines.append(f'    {i:>3} {name:<20} {100 * pixels[i] / labelled:6.2f}%'
                 + ('  (in no label)' if not pixels[i] else ''))
  hint = rare_class_hint(pixels[:count] / labelled, names or [str(i) for i in range(count)])
  if hint:
    lines.append(hint)
  largest = facts.get('largest') or {}
  if largest:
    lines.append('  largest images (height x width): ' + ', '.join(
        f'{split} {h}x{w}' for split, (h, w) in sorted(largest.items())))
  lines.append(f'  train on it: --config.data.dataset=folder --config.data.folder={facts["root"]}'
               f' --config.model.num_classes={count}'
               + (f' --config.data.data_dir={data_dir}' if data_dir else '')
               + split_flags(sorted(facts['class_pixels'])))
  return '\n'.join(lines)


RARE_SHARE = 0.02   # a class under this share of the labelled pixels is called rare


def rare_class_hint(shares, names: Sequence[str]) -> str:
  """A line naming the classes present in under RARE_SHARE of the labelled pixels, with the
  label weights that lifted such a class in docs/training.md's measurement (5 for them, 1 for
  the others); '' when there are none (or when every present class is rare)."""
  present = [i for i, share in enumerate(shares) if share > 0]
  rare = [i for i in present if shares[i] < RARE_SHARE]
  if not rare or len(rare) == len(present):
    return ''
  weights = ', '.join('5' if i in rare else '1' for i in range(len(shares)))
  return (f'  rare (under {RARE_SHARE:.0%} of the labelled pixels): '
          + ', '.join(names[i] for i in rare)
          + f"; to weigh them up: --config.train.label_weights='({weights})' "
          '(docs/training.md, "The loss")')


def split_flags(splits: List[str]) -> str:
  """The split flags to add for a folder without train and val lists ('' with both): one list
  (CVAT's default.txt) sliced 80/20 by TFDS, else the choice."""
  if 'train' in splits and 'val' in splits:
    return ''
  if len(splits) == 1:
    return (f" --config.data.train_split='{splits[0]}[:80%]'"
            f" --config.data.eval_split='{splits[0]}[80%:]'")
  return f' --config.data.train_split=... --config.data.eval_split=... (of {", ".join(splits)})'


def describe(root: str, splits: Dict[str, List[str]]) -> str:
  counts = ', '.join(f'{split} {len(ids):,}' for split, ids in sorted(splits.items()))
  return f'the folder {root} in the VOC layout ({counts})'
