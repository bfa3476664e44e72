"""TFDS builder for PASCAL VOC 2012 semantic segmentation (VOCdevkit layout) and SBD.

tensorflow-datasets' own `voc` dataset carries no segmentation masks, hence
this builder. Configs:

  voc2012    VOC's own splits: train 1,464, val 1,449, trainval 2,913.
  train_aug  DeepLab's augmented set: train_aug = VOC train + SBD train + SBD val
             - VOC val (10,582 images), and val = VOC val (1,449).
  embedded   a generated dataset written in the VOC layout (`seg.data.embedded`), so
             the out-of-the-box data goes through exactly the reader real VOC uses.
  folder     your own dataset: a folder in the VOC layout (`seg.data.folder`), its
             splits those its ImageSets/Segmentation lists; prepared under a name
             made from its contents (`folder_<digest>`).

Labels are palette PNGs read as class indices (never through RGB; 255 = void)
or, for images that only SBD annotates, `cls/<id>.mat` (`GTcls.Segmentation`)
read with SciPy. Where VOC and SBD both annotate an image, VOC's label (with
its void borders) is used.

Sources come from the manual directory (`--manual-dir`: the archives or their
extracted folders, the usual case behind a firewall) or else are downloaded by
TFDS's download manager. Archives are checked for size and MD5 before use.
"""

import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import socket
import sys
import time
import urllib.parse
from typing import Dict, Iterable, Iterator, Optional, Tuple

import numpy as np
import scipy.io
import tensorflow_datasets as tfds
from PIL import Image

from seg.data import embedded, folder, labels, tf_quiet  # noqa: F401 (TFDS imports TensorFlow)


@dataclasses.dataclass(frozen=True)
class Source:
  """A published archive and the folder inside it that the builder reads."""
  file_name: str
  url: str
  size: int
  md5: str
  folder: str


SOURCES = {
    'voc': Source('VOCtrainval_11-May-2012.tar',
                  'http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar',
                  1_999_639_040, '6cd6e144f989b92b3379bac3b3de84fd',
                  os.path.join('VOCdevkit', 'VOC2012')),
    'sbd': Source('benchmark.tgz',
                  'http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/'
                  'semantic_contours/benchmark.tgz',
                  1_419_539_633, '82b4d87ceb2ed10f6038a1cba92111cb',
                  os.path.join('benchmark_RELEASE', 'dataset')),
}

MANUAL_DOWNLOAD_INSTRUCTIONS = (
    'Put into the manual directory (--manual-dir) either the archives or their extracted '
    'folders: ' + '; '.join(f'{s.file_name} from {s.url} (or its folder {s.folder})'
                            for s in SOURCES.values()) + '.')


class SourceError(FileNotFoundError):
  """A source archive or folder is missing, truncated or not the published file."""


@dataclasses.dataclass
class VocSegmentationConfig(tfds.core.BuilderConfig):
  splits: Tuple[str, ...] = ('train', 'val')
  sources: Tuple[str, ...] = ()
  root: str = ''  # the 'folder' dataset's folder


class VocSegmentation(tfds.core.GeneratorBasedBuilder):
  """Semantic segmentation examples: image, label (uint8 indices, 255 = void), file name."""

  VERSION = tfds.core.Version('1.2.0')
  RELEASE_NOTES = {
      '1.0.0': 'Embedded generated dataset in the VOC 2012 layout.',
      '1.1.0': 'Embedded: five colour families x four textures.',
      '1.2.0': 'Embedded: coarser textures (period 12 to 20 pixels); VOC 2012 and train_aug.',
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = [
      VocSegmentationConfig(
          name='embedded',
          description=f'Generated scenes ({embedded.NUM_TRAIN} train, {embedded.NUM_VAL} val) '
                      'in the VOC 2012 layout; 20 object classes + background.'),
      VocSegmentationConfig(
          name='voc2012', splits=('train', 'val', 'trainval'), sources=('voc',),
          description='PASCAL VOC 2012 segmentation: train 1,464, val 1,449, trainval 2,913.'),
      VocSegmentationConfig(
          name='train_aug', splits=('train_aug', 'val'), sources=('voc', 'sbd'),
          description='VOC train + SBD train + SBD val - VOC val (10,582); val = VOC val.'),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    info = self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
            'label': tfds.features.Image(shape=(None, None, 1), encoding_format='png'),
            'file_name': tfds.features.Text(),
        }),
        supervised_keys=('image', 'label'),
        homepage='http://host.robots.ox.ac.uk/pascal/VOC/voc2012/',
        # A folder's own facts (`folder_facts`): its path, classes and pixels per class.
        metadata=tfds.core.MetadataDict() if self.builder_config.root else None,
    )
    # A builder whose data is not prepared yet asks TFDS for precomputed metadata on GCS;
    # TFDS 4.9 first makes an empty temporary folder for it, then finds GCS disabled and
    # never removes it: one folder left in /tmp by every such builder. These datasets are
    # never on GCS, so the lookup is skipped.
    info.initialize_from_bucket = lambda: None
    return info

  # TFDS's own lines around a preparation know no sizes for these datasets ("Downloading and
  # preparing dataset Unknown size (download: Unknown size, generated: Unknown size, ...")
  # and say "downloaded" of what was read from local archives: these say what happens.
  def _log_download_bytes(self) -> None:
    self._preparation_start = time.time()
    print(f'preparing {self.builder_config.name!r} in {self.data_dir} (once; later runs '
          f'reuse it): {self.builder_config.description}')

  def _log_download_done(self) -> None:
    seconds = time.time() - getattr(self, '_preparation_start', time.time())
    print(f'wrote the TFRecords of {self.builder_config.name!r} in {seconds:.0f}s')

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> Dict[str, Iterator]:
    name = self.builder_config.name
    if self.builder_config.root:
      return self._folder_split_generators(self.builder_config.root)
    if name == 'embedded':
      voc_root = embedded.write_voc_layout(
          os.path.join(dl_manager.download_dir, f'embedded-{self.VERSION}'))
      sbd_root = None
    else:
      roots = {key: locate_source(SOURCES[key], dl_manager) for key in self.builder_config.sources}
      voc_root, sbd_root = roots['voc'], roots.get('sbd')
    if name == 'train_aug':
      lists = {'train_aug': train_aug_ids(voc_root, sbd_root),
               'val': read_split_list(voc_root, 'val')}
    else:
      lists = {split: read_split_list(voc_root, split) for split in self.builder_config.splits}
    return {split: self._generate_examples(voc_root, sbd_root, ids)
            for split, ids in lists.items()}

  def _generate_examples(self, voc_root: str, sbd_root: Optional[str], ids: Iterable[str]):
    for name in ids:
      image_path, label = read_example(voc_root, sbd_root, name)
      yield name, {'image': image_path, 'label': label[..., None], 'file_name': name}

  def _folder_split_generators(self, root: str) -> Dict[str, Iterator]:
    splits = folder.check_layout(root)
    images = folder.image_files(root)
    folder.check_files(root, splits, images)
    classes = folder.folder_classes(root, splits)
    num_classes = len(classes.names) if classes else labels.IGNORE_LABEL
    metadata = self.info.metadata
    metadata.update({'root': os.path.abspath(root),
                     'names': list(classes.names) if classes else None,
                     'colours': [list(c) for c in classes.colours]
                                if classes and classes.colours else None,
                     'classes_from': classes.source if classes else None,
                     'class_pixels': {}, 'largest': {}})

    def examples(split, ids):
      pixels, largest = np.zeros(256, np.int64), [0, 0]
      for name in ids:
        image, label = folder.read_example(root, name, images.get(name), classes)
        labels.check(label, os.path.join(root, folder.LABELS, name + '.png'), num_classes)
        pixels += np.bincount(label.ravel(), minlength=256)
        largest = [max(largest[0], label.shape[0]), max(largest[1], label.shape[1])]
        metadata['class_pixels'][split], metadata['largest'][split] = pixels.tolist(), largest
        yield name, {'image': image, 'label': label[..., None], 'file_name': name}

    return {split: examples(split, ids) for split, ids in splits.items()}


def folder_facts(builder) -> Optional[dict]:
  """A prepared 'folder' dataset's {'root', 'names' and 'colours' (labelmap.txt's, VOC's for
  colour labels without it, or None), 'classes_from' (which of the two, or None),
  'class_pixels': {split: pixels per label value 0..255}, 'largest': {split: [largest height,
  largest width]}}; None for the other datasets."""
  return dict(builder.info.metadata) if builder.builder_config.root else None


def _manual_dir(dl_manager) -> Optional[str]:
  try:
    return os.fspath(dl_manager.manual_dir)
  except (AssertionError, ValueError):  # not given, missing or empty
    return None


def _md5(path: str) -> str:
  digest = hashlib.md5()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 22), b''):
      digest.update(block)
  return digest.hexdigest()


def verify_archive(path: str, source: Source) -> None:
  """Raises SourceError unless `path` has the published size and MD5 of `source`."""
  where = (f'; put the published {source.file_name} ({source.url}), or its extracted folder '
           f'{source.folder}, into the manual directory (--manual-dir)')
  size = os.path.getsize(path)
  if size != source.size:
    raise SourceError(f'{path} is {size:,} bytes, expected {source.size:,} '
                      f'(truncated or another file){where}')
  md5 = _md5(path)
  if md5 != source.md5:
    raise SourceError(f'{path} has MD5 {md5}, expected {source.md5}{where}')


def locate_source(source: Source, dl_manager) -> str:
  """The extracted `source.folder` from the manual dir (folder or archive) or a download."""
  manual = _manual_dir(dl_manager)
  if manual:
    folder = os.path.join(manual, source.folder)
    if os.path.isdir(folder):
      return folder
    archive = os.path.join(manual, source.file_name)
    if os.path.isfile(archive):
      verify_archive(archive, source)
      return os.path.join(os.fspath(dl_manager.extract(archive)), source.folder)
  try:
    _check_reachable(source.url)
    archive = os.fspath(dl_manager.download(source.url))
  except Exception as e:  # no network, blocked, moved: say what to do instead
    raise SourceError(
        f'{source.file_name} not found in the manual directory ({manual or "none given"}) and '
        f'its download from {source.url} failed ({type(e).__name__}: {e}). '
        + MANUAL_DOWNLOAD_INSTRUCTIONS) from e
  verify_archive(archive, source)
  return os.path.join(os.fspath(dl_manager.extract(archive)), source.folder)


def _check_reachable(url: str, timeout: float = 10.0) -> None:
  """Raises OSError at once if url's host takes no connection.

  Offline, TFDS's download manager retries for minutes before failing; one
  direct connection attempt answers in seconds. Skipped behind a proxy, whose
  reachability a direct connection cannot tell.
  """
  if any(os.environ.get(v) for v in ('http_proxy', 'https_proxy', 'HTTP_PROXY', 'HTTPS_PROXY',
                                     'all_proxy', 'ALL_PROXY')):
    return
  parts = urllib.parse.urlsplit(url)
  port = parts.port or (443 if parts.scheme == 'https' else 80)
  socket.create_connection((parts.hostname, port), timeout=timeout).close()


def train_aug_ids(voc_root: str, sbd_root: str) -> list:
  """DeepLab's train_aug: (VOC train | SBD train | SBD val) - VOC val, sorted."""
  def sbd_list(split):
    with open(os.path.join(sbd_root, split + '.txt')) as f:
      return {line.strip() for line in f if line.strip()}
  ids = set(read_split_list(voc_root, 'train')) | sbd_list('train') | sbd_list('val')
  return sorted(ids - set(read_split_list(voc_root, 'val')))


def read_example(voc_root: str, sbd_root: Optional[str], name: str):
  """(image path, label [h, w] uint8) of one image id: VOC's label first, else SBD's.

  Raises labels.LabelError (naming the file) for values other than 0..20 and 255.
  """
  image_path = os.path.join(voc_root, 'JPEGImages', name + '.jpg')
  label_path = os.path.join(voc_root, 'SegmentationClass', name + '.png')
  if os.path.isfile(label_path):
    return image_path, labels.check(read_label_png(label_path), label_path)
  if sbd_root is None:
    raise SourceError(f'{label_path} is missing')
  if not os.path.isfile(image_path):
    image_path = os.path.join(sbd_root, 'img', name + '.jpg')
  label_path = os.path.join(sbd_root, 'cls', name + '.mat')
  return image_path, labels.check(read_label_mat(label_path), label_path)


def read_label_mat(path: str) -> np.ndarray:
  """An SBD `cls/<id>.mat` as class indices: [height, width] uint8 (`GTcls.Segmentation`)."""
  mat = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
  return np.asarray(mat['GTcls'].Segmentation, np.uint8)


def read_split_list(voc_root: str, split: str) -> list:
  """Image ids listed in `ImageSets/Segmentation/<split>.txt`."""
  path = os.path.join(voc_root, 'ImageSets', 'Segmentation', split + '.txt')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} is missing: is {voc_root} a VOCdevkit/VOC2012 folder?')
  with open(path) as f:
    return [line.strip() for line in f if line.strip()]


def read_label_png(path: str) -> np.ndarray:
  """A VOC palette PNG as class indices: [height, width] uint8, 255 = void."""
  with Image.open(path) as png:
    if png.mode != 'P' and png.mode != 'L':
      raise labels.LabelError(f'{path}: labels must be palette (P) or index (L) PNGs of '
                              f'class indices, got mode {png.mode}')
    return np.array(png, np.uint8)


DATASETS = tuple(c.name for c in VocSegmentation.BUILDER_CONFIGS) + ('folder',)
# One config per folder and process: a folder changed while a run reads it keeps the dataset
# that the run started with (the next run prepares the new contents).
_FOLDER_CONFIGS: Dict[str, VocSegmentationConfig] = {}


def folder_config(root: str) -> VocSegmentationConfig:
  """The builder config of dataset folder `root`, named from its contents."""
  key = os.path.abspath(root) if root else ''
  if key not in _FOLDER_CONFIGS:
    splits = folder.check_layout(root)
    digest = folder.fingerprint(key, splits, folder.image_files(root))
    _FOLDER_CONFIGS[key] = VocSegmentationConfig(
        name=f'folder_{digest}', splits=tuple(sorted(splits)), root=key,
        description=folder.describe(key, splits))
  return _FOLDER_CONFIGS[key]


class _NoCustomConfigWarning(logging.Filter):
  def filter(self, record):  # TFDS's "Using custom data configuration" for every folder
    return 'custom data configuration' not in record.getMessage()


@contextlib.contextmanager
def _quiet_custom_config():
  logger, quiet = logging.getLogger('absl'), _NoCustomConfigWarning()
  logger.addFilter(quiet)
  try:
    yield
  finally:
    logger.removeFilter(quiet)


def get_builder(dataset: str, data_dir: str = '', root: str = '') -> VocSegmentation:
  """The builder of config `dataset` under `data_dir` ('' = TFDS's default); dataset
  'folder' reads the folder `root`."""
  if dataset not in DATASETS:
    raise ValueError(f'unknown dataset {dataset!r}; known: {", ".join(DATASETS)}')
  if dataset == 'folder':
    config = folder_config(root)
    with _quiet_custom_config():
      return VocSegmentation(config=config, data_dir=data_dir or None)
  if root:
    raise ValueError(f'a folder ({root}) is read only with the dataset \'folder\', not '
                     f'{dataset!r}')
  return VocSegmentation(config=dataset, data_dir=data_dir or None)


def prepare(dataset: str, data_dir: str = '', manual_dir: str = '',
            log=print, root: str = '') -> VocSegmentation:
  """Builds the dataset's TFRecords once (a no-op when already prepared).

  `manual_dir` holds the source archives or their extracted folders
  (default: DATA_DIR/downloads/manual); `root` the folder of dataset 'folder'.

  Safe to call from several processes at once (the processes of a multi-host
  run on one machine, or hosts sharing a data_dir): an exclusive lock on
  `DATA_DIR/voc_segmentation/DATASET/.prepare.lock` lets one of them build
  while the others wait and then reuse its result.
  """
  builder = get_builder(dataset, data_dir, root)
  # (TFDS's is_prepared() alone logs a warning for every dataset not prepared yet: "Variant
  # folder ... has no dataset_info.json".)
  if (os.path.exists(os.path.join(builder.data_dir, 'dataset_info.json'))
      and builder.is_prepared()):
    return builder
  lock_dir = os.path.dirname(builder.data_dir)  # DATA_DIR/voc_segmentation/DATASET
  os.makedirs(lock_dir, exist_ok=True)
  with open(os.path.join(lock_dir, '.prepare.lock'), 'a') as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      log(f'waiting for another process that prepares {dataset!r} in {lock_dir}')
      fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      # A fresh builder: one made before another process finished would not see its splits.
      builder = get_builder(dataset, data_dir, root)
      # TFDS's progress bars are for a terminal: in a log file they are lines of escape codes
      # and long paths, and the builder's own two lines say what happens.
      tfds.display_progress_bar(getattr(sys.stderr, 'isatty', lambda: False)())
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=manual_dir or None))
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return builder
