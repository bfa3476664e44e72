"""Your own dataset (`data.dataset='folder'`): a folder in the VOC layout, written here in the
formats annotation tools export (colour PNGs with CVAT's labelmap.txt, palette and grey-scale
PNGs; JPEG, PNG, BMP and EXIF-rotated images)."""

import io
import json
import os
import re

import numpy as np
import pytest
from PIL import Image, ImageOps

from helpers import ROOT, voc_colormap
from seg import classes, config as config_lib
from seg.cli import commands
from seg.cli.parser import build_parser
from seg.data import folder, labels, pipeline, voc
from seg.inference.engine import Engine
from seg.predict.options import Options
from seg.predict.runner import predict_paths
from seg.train import loop

NAMES = ('background', 'road', 'car')
COLOURS = ((0, 0, 0), (250, 50, 50), (50, 50, 250))
TRAIN = [f'img{i:02d}' for i in range(8)]
VAL = [f'img{i:02d}' for i in range(8, 12)]


def _indices(rng, h, w):
  """A label of the 3 classes with a void (255) row."""
  label = np.zeros((h, w), np.uint8)
  top, left = (int(v) for v in rng.integers(0, 20, 2))
  label[top:top + h // 3, left:left + w // 2] = 1
  label[h // 2:, w // 3:] = 2
  label[0] = labels.IGNORE_LABEL
  return label


def _paint(label, colours=COLOURS):
  """Class indices -> the colour PNG pixels an annotation tool exports (void: VOC's colour)."""
  palette = np.zeros((256, 3), np.uint8)
  palette[:len(colours)] = colours
  palette[labels.IGNORE_LABEL] = folder.VOID_COLOUR
  return palette[label]


def _height(name):
  """The height of image `name` of `_write_folder` (all are 80 wide)."""
  return 60 + 3 * (TRAIN + VAL).index(name)


def _write_folder(root, labelmap=True, label_format='rgb'):
  """The dataset folder; returns {id: label indices}."""
  rng = np.random.default_rng(0)
  for d in (folder.IMAGES, folder.LABELS, folder.LISTS):
    os.makedirs(os.path.join(root, d), exist_ok=True)
  if labelmap:
    with open(os.path.join(root, folder.LABELMAP), 'w') as f:
      f.write('# label:color_rgb:parts:actions\n')
      for name, (r, g, b) in zip(NAMES, COLOURS):
        f.write(f'{name}:{r},{g},{b}::\n')
  written = {}
  for i, name in enumerate(TRAIN + VAL):
    h, w = _height(name), 80
    label = _indices(rng, h, w)
    pixels = (np.array(COLOURS, np.uint8)[np.minimum(label, 2)]
              + rng.integers(0, 40, (h, w, 3)).astype(np.uint8))
    Image.fromarray(pixels).save(
        os.path.join(root, folder.IMAGES, name + ('.png' if i % 2 else '.jpg')))
    label_path = os.path.join(root, folder.LABELS, name + '.png')
    if label_format == 'rgb':
      Image.fromarray(_paint(label)).save(label_path)
    else:
      Image.fromarray(label).save(label_path)
    written[name] = label
  for split, ids in (('train', TRAIN), ('val', VAL)):
    with open(os.path.join(root, folder.LISTS, split + '.txt'), 'w') as f:
      f.write('\n'.join(ids) + '\n')
  return written


def _folder_config(tmp_path, config=None, **write):
  """(`config` (default: the defaults) reading a new dataset folder, its root, the labels
  written)."""
  root = str(tmp_path / 'mine')
  written = _write_folder(root, **write)
  config = config or config_lib.default_config()
  config.data.dataset, config.data.folder = 'folder', root
  config.data.data_dir = str(tmp_path / 'tfds')
  return config, root, written


@pytest.fixture(autouse=True)
def _fresh_folder_configs():
  voc._FOLDER_CONFIGS.clear()  # each test's folders fingerprinted afresh
  yield
  voc._FOLDER_CONFIGS.clear()


def test_labelmap_of_cvat_and_plain_names(tmp_path):
  (tmp_path / 'labelmap.txt').write_text(
      '# label:color_rgb:parts:actions\nbackground:0,0,0::\nroad:128,64,128:a:b\n\n')
  assert folder.read_labelmap(str(tmp_path)) == folder.Classes(
      ('background', 'road'), ((0, 0, 0), (128, 64, 128)))
  (tmp_path / 'labelmap.txt').write_text('background\nroad\ncar\n')
  assert folder.read_labelmap(str(tmp_path)) == folder.Classes(NAMES, None)
  (tmp_path / 'labelmap.txt').write_text('background:0,0,0::\nroad:0,0::\n')
  with pytest.raises(folder.FolderError, match="line 2: '0,0' is not a colour"):
    folder.read_labelmap(str(tmp_path))
  (tmp_path / 'labelmap.txt').write_text('background:0,0,0::\nroad::\n')
  with pytest.raises(folder.FolderError, match='1 of its 2 classes have a colour'):
    folder.read_labelmap(str(tmp_path))
  assert folder.read_labelmap(str(tmp_path / 'none')) is None


def test_colour_labels_become_the_labelmap_indices(tmp_path):
  rng = np.random.default_rng(1)
  label = rng.integers(0, 3, (37, 53)).astype(np.uint8)
  label[5:9] = labels.IGNORE_LABEL
  path = str(tmp_path / 'a.png')
  Image.fromarray(_paint(label)).save(path)
  classes = folder.Classes(NAMES, COLOURS)
  np.testing.assert_array_equal(folder.read_label(path, classes), label)
  Image.fromarray(np.dstack([_paint(label), np.full(label.shape, 255, np.uint8)])).save(path)
  np.testing.assert_array_equal(folder.read_label(path, classes), label)  # RGBA
  painted = _paint(label)
  painted[3, 4:7] = (1, 2, 3)
  Image.fromarray(painted).save(path)
  with pytest.raises(labels.LabelError, match=r'a.png: colours that labelmap.txt does not name: '
                                              r'\(1, 2, 3\): 3 px'):
    folder.read_label(path, classes)
  with pytest.raises(labels.LabelError, match='colour PNG: its classes need labelmap.txt'):
    folder.read_label(path, None)
  Image.fromarray(label).save(path)                  # grey-scale indices
  np.testing.assert_array_equal(folder.read_label(path, None), label)
  palette = Image.fromarray(label)
  palette.putpalette(_paint(np.arange(256, dtype=np.uint8)).ravel().tolist())
  assert palette.mode == 'P'
  palette.save(path)                                 # palette indices, as VOC's
  np.testing.assert_array_equal(folder.read_label(path, None), label)


def test_colour_labels_without_labelmap_are_vocs_classes(tmp_path):
  """CVAT's rule: labelmap.txt is needed only for labels other than VOC's."""
  voc_colours = voc_colormap()   # written out apart from seg.classes
  assert tuple(voc_colours[255]) == folder.VOID_COLOUR
  config, root, written = _folder_config(tmp_path, labelmap=False, label_format='L')
  for name, label in written.items():   # the same labels as colour PNGs in VOC's colours
    Image.fromarray(voc_colours[label]).save(os.path.join(root, folder.LABELS, name + '.png'))
  with pytest.raises(ValueError, match=r"VOC's colour map \(the folder has no labelmap.txt\) "
                                       r'names 21 classes; config.model.num_classes is 3: add '
                                       r'--config.model.num_classes=21'):
    pipeline.prepare(config.data, num_classes=3)
  classes = pipeline.prepare(config.data, num_classes=21)
  assert classes['names'][15] == 'person' and len(classes['names']) == 21
  np.testing.assert_array_equal(classes['colours'], voc_colours[:21])
  for ex in pipeline.split_examples(config.data, 'val').as_numpy_iterator():
    np.testing.assert_array_equal(ex['label'][..., 0], written[ex['file_name'].decode()])


def test_images_stored_as_files_converted_or_upright(tmp_path):
  root = str(tmp_path)
  for d in (folder.IMAGES, folder.LABELS):
    os.makedirs(os.path.join(root, d))
  rng = np.random.default_rng(2)
  pixels = rng.integers(0, 255, (30, 50, 3), np.uint8)
  label = np.zeros((30, 50), np.uint8)
  Image.fromarray(label).save(os.path.join(root, folder.LABELS, 'a.png'))
  jpeg = os.path.join(root, folder.IMAGES, 'a.jpg')
  Image.fromarray(pixels).save(jpeg, quality=90)
  encoded, read = folder.read_example(root, 'a', 'a.jpg', None)
  assert encoded == open(jpeg, 'rb').read()       # a JPEG goes in as its bytes
  np.testing.assert_array_equal(read, label)
  os.remove(jpeg)
  Image.fromarray(pixels).save(os.path.join(root, folder.IMAGES, 'a.bmp'))
  encoded, _ = folder.read_example(root, 'a', 'a.bmp', None)
  assert encoded[:8] == b'\x89PNG\r\n\x1a\n'     # another format: lossless PNG
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encoded))), pixels)
  # A phone photo stored sideways with EXIF orientation 6, labelled upright (50 x 30 -> 30 x 50
  # wide): stored upright, as Pillow's exif_transpose turns it.
  sideways = Image.fromarray(np.ascontiguousarray(np.rot90(pixels)))   # 50 high, 30 wide
  exif = Image.Exif()
  exif[0x0112] = 6
  sideways.save(os.path.join(root, folder.IMAGES, 'b.jpg'), exif=exif, quality=95)
  Image.fromarray(label).save(os.path.join(root, folder.LABELS, 'b.png'))
  encoded, _ = folder.read_example(root, 'b', 'b.jpg', None)
  with Image.open(os.path.join(root, folder.IMAGES, 'b.jpg')) as original:
    upright = np.asarray(ImageOps.exif_transpose(original).convert('RGB'))
  assert upright.shape == (30, 50, 3)
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encoded))), upright)
  Image.fromarray(np.zeros((31, 50), np.uint8)).save(
      os.path.join(root, folder.LABELS, 'b.png'))
  with pytest.raises(folder.FolderError, match=r'b.png is 50x31 but its image .*b.jpg is 30x50 '
                                               r'\(50x30 upright\)'):
    folder.read_example(root, 'b', 'b.jpg', None)


def test_layout_errors_say_what_is_missing(tmp_path):
  root = str(tmp_path / 'mine')
  with pytest.raises(folder.FolderError, match='lacks JPEGImages, SegmentationClass, '
                                               'ImageSets/Segmentation'):
    folder.check_layout(root)
  _write_folder(root)
  os.remove(os.path.join(root, folder.LISTS, 'train.txt'))
  os.remove(os.path.join(root, folder.LISTS, 'val.txt'))
  with pytest.raises(folder.FolderError, match='holds no SPLIT.txt'):
    folder.check_layout(root)
  with open(os.path.join(root, folder.LISTS, 'train.txt'), 'w') as f:
    f.write('img00\nnothere\nimg01\n')
  os.remove(os.path.join(root, folder.LABELS, 'img01.png'))
  with pytest.raises(folder.FolderError, match=r'2 of the 3 ids listed in .*Segmentation lack '
                                               r'their files: img01: no SegmentationClass/img01'
                                               r'.png; nothere: no image and no Segmentation'):
    voc.prepare('folder', str(tmp_path / 'tfds'), root=root)
  with pytest.raises(ValueError, match="only with the dataset 'folder', not 'voc2012'"):
    voc.get_builder('voc2012', str(tmp_path / 'tfds'), root)


def test_prepared_folder_reads_back_its_images_labels_and_classes(tmp_path):
  config, root, written = _folder_config(tmp_path)
  assert pipeline.prepare(config.data, num_classes=3) == {
      'names': list(NAMES), 'colours': [list(c) for c in COLOURS],
      'eval_side': max(_height(name) for name in VAL)}
  order = {}
  for split, ids in (('train', TRAIN), ('val', VAL)):
    examples = list(pipeline.split_examples(config.data, split).as_numpy_iterator())
    order[split] = [ex['file_name'].decode() for ex in examples]
    assert sorted(order[split]) == ids   # (in TFDS's order)
    for ex in examples:
      name = ex['file_name'].decode()
      np.testing.assert_array_equal(ex['label'][..., 0], written[name])
      path = os.path.join(root, folder.IMAGES, name + ('.png' if int(name[3:]) % 2 else '.jpg'))
      np.testing.assert_array_equal(ex['image'], np.asarray(Image.open(path).convert('RGB')))
  facts = voc.folder_facts(pipeline.prepared(config.data))
  assert facts['names'] == list(NAMES) and facts['root'] == os.path.abspath(root)
  for split, ids in (('train', TRAIN), ('val', VAL)):
    expected = np.sum([np.bincount(written[i].ravel(), minlength=256) for i in ids], axis=0)
    np.testing.assert_array_equal(facts['class_pixels'][split], expected)
  # Images above eval_size are found from their headers, PNG and JPEG alike.
  config.data.eval_size = 74   # val images are 84 to 93 x 80: all larger
  indices, shape = pipeline.oversize_images(config.data, 'val')
  assert list(indices) == [0, 1, 2, 3] and shape == (129, 129)
  config.data.eval_size = 90   # 93 high (img11, a PNG) and 90 high (img10, a JPEG)
  assert list(pipeline.oversize_images(config.data, 'val')[0]) == [order['val'].index('img11')]


def test_ids_in_subfolders_as_annotation_tools_write_them(tmp_path):
  root = str(tmp_path / 'mine')
  written = _write_folder(root, labelmap=False, label_format='L')
  for d in (folder.IMAGES, folder.LABELS):
    os.makedirs(os.path.join(root, d, 'day 2'))
  pixels = np.full((50, 40, 3), 90, np.uint8)
  Image.fromarray(pixels).save(os.path.join(root, folder.IMAGES, 'day 2', 'x.png'))
  Image.fromarray(written['img00'][:50, :40]).save(os.path.join(root, folder.LABELS, 'day 2',
                                                                'x.png'))
  with open(os.path.join(root, folder.LISTS, 'train.txt'), 'a') as f:
    f.write('day 2/x\n')
  builder = voc.prepare('folder', str(tmp_path / 'tfds'), root=root)
  read = {ex['file_name'].decode(): ex for ex in builder.as_dataset(split='train')
          .as_numpy_iterator()}
  assert sorted(read) == sorted(TRAIN + ['day 2/x'])
  np.testing.assert_array_equal(read['day 2/x']['image'], pixels)
  np.testing.assert_array_equal(read['day 2/x']['label'][..., 0], written['img00'][:50, :40])


def test_one_list_is_split_by_slices_as_the_error_says(tmp_path, capsys):
  config, root, _ = _folder_config(tmp_path)
  lists = os.path.join(root, folder.LISTS)
  with open(os.path.join(lists, 'default.txt'), 'w') as f:   # CVAT's one list
    f.write('\n'.join(TRAIN + VAL) + '\n')
  os.remove(os.path.join(lists, 'train.txt'))
  os.remove(os.path.join(lists, 'val.txt'))
  flags = "--config.data.train_split='default[:80%]' --config.data.eval_split='default[80%:]'"
  with pytest.raises(ValueError, match=re.escape(f'has the splits default; for one list: add '
                                                 f'{flags}')):
    pipeline.prepare(config.data, num_classes=3)
  commands.prepare_data(dataset='folder', data_dir=config.data.data_dir, folder=root)
  assert capsys.readouterr().out.rstrip().endswith(flags)
  config.data.train_split, config.data.eval_split = 'default[:80%]', 'default[80%:]'
  pipeline.prepare(config.data, num_classes=3)
  names = {split: [ex['file_name'].decode() for ex in
                   pipeline.split_examples(config.data, split).as_numpy_iterator()]
           for split in (config.data.train_split, config.data.eval_split)}
  train, val = names.values()
  assert sorted(train + val) == TRAIN + VAL and 8 <= len(train) <= 10   # apart, all of them


def test_a_changed_folder_is_prepared_again(tmp_path):
  root, data_dir = str(tmp_path / 'mine'), str(tmp_path / 'tfds')
  _write_folder(root, labelmap=False, label_format='L')
  first = voc.prepare('folder', data_dir, root=root)
  assert voc.prepare('folder', data_dir, root=root).data_dir == first.data_dir
  changed = np.full((60, 80), 1, np.uint8)
  Image.fromarray(changed).save(os.path.join(root, folder.LABELS, 'img00.png'))
  voc._FOLDER_CONFIGS.clear()  # a new process
  second = voc.prepare('folder', data_dir, root=root)
  assert second.data_dir != first.data_dir
  read = {ex['file_name'].decode(): ex['label'][..., 0]
          for ex in second.as_dataset(split='train').as_numpy_iterator()}
  np.testing.assert_array_equal(read['img00'], changed)


def test_classes_the_model_does_not_fit_stop_before_training(tmp_path):
  config, root, _ = _folder_config(tmp_path)
  with pytest.raises(ValueError, match='labelmap.txt names 3 classes; config.model.num_classes '
                                       'is 21: add --config.model.num_classes=3'):
    pipeline.prepare(config.data, num_classes=21)
  os.remove(os.path.join(root, folder.LABELMAP))   # colour labels: VOC's colours, not these
  voc._FOLDER_CONFIGS.clear()
  with pytest.raises(labels.LabelError, match=r"colours that VOC's colour map \(the folder has "
                                              r'no labelmap.txt\) does not name: \(50, 50, 250\)'):
    pipeline.prepare(config.data, num_classes=3)
  _write_folder(root, labelmap=False, label_format='L')   # indices 0..2 and 255
  voc._FOLDER_CONFIGS.clear()
  with pytest.raises(ValueError, match='hold class 2; config.model.num_classes is 2: add '
                                       '--config.model.num_classes=3'):
    pipeline.prepare(config.data, num_classes=2)
  notes = []   # no labelmap.txt: no names or colours to keep; the val images' largest side
  assert pipeline.prepare(config.data, num_classes=5, log=notes.append) == {
      'names': None, 'colours': None, 'eval_side': max(_height(name) for name in VAL)}
  assert notes == [f'note: the labels of {os.path.abspath(root)} hold classes 0..2 only; '
                   'config.model.num_classes is 5 (--config.model.num_classes=3 if the dataset '
                   'has no more)']


def test_eval_images_above_eval_size_are_noted_with_the_side_predict_runs_whole(tmp_path):
  config, root, _ = _folder_config(tmp_path)
  notes = []
  config.data.eval_size = 93   # the val images: 84 to 93 high, 80 wide
  assert pipeline.prepare(config.data, num_classes=3, log=notes.append)['eval_side'] == 93
  assert notes == []
  config.data.eval_size = 81
  pipeline.prepare(config.data, num_classes=3, log=notes.append)
  assert notes == [
      f"note: the 'val' images of {os.path.abspath(root)} reach 93x80, above "
      'data.eval_size=81: eval runs them whole, in one more compiled shape '
      '(--config.data.eval_size=129 avoids it); `predict` runs inputs up to 93 px whole too '
      '(data.predict_max_side=93; larger ones downscaled to it)']
  config.data.predict_max_side = 85   # the config's own value is kept, and said
  pipeline.prepare(config.data, num_classes=3, log=notes.append)
  assert notes[-1].endswith('(--config.data.eval_size=129 avoids it); `predict` downscales '
                            'inputs above data.predict_max_side=85 px')


def test_a_decoded_cache_larger_than_the_memory_stops_before_training(tmp_path, monkeypatch):
  config, root, written = _folder_config(tmp_path)
  needed = 4 * sum(written[name].size for name in TRAIN)   # 4 bytes a training pixel
  page = 4096
  sysconf = {'SC_PAGE_SIZE': page}
  monkeypatch.setattr(os, 'sysconf', lambda name: sysconf.get(name, needed // page - 1))
  with pytest.raises(ValueError, match=rf"data.cache='decoded' keeps the training images "
                                       rf"decoded: {needed / 2**30:.1f} GiB in each process .* "
                                       r'add --config.data.cache=encoded'):
    pipeline.prepare(config.data, num_classes=3)
  notes = []
  pipeline.prepare(config.data, num_classes=3, log=notes.append, process_count=2)  # half each
  assert len(notes) == 1 and notes[0].startswith("note: data.cache='decoded' keeps")
  config.data.cache = 'encoded'
  assert pipeline.prepare(config.data, num_classes=3)['names'] == list(NAMES)


def test_class_names_and_colours_of_a_config():
  assert classes.class_names('folder', 3, 'background, road ,car') == list(NAMES)
  assert classes.class_names('folder', 3) == ['0', '1', '2']          # no names: the ids
  assert classes.class_names('voc2012', 21)[15] == 'person'
  table = classes.palette('0,0,0;250,50,50;50,50,250')
  np.testing.assert_array_equal(table[:3], COLOURS)
  np.testing.assert_array_equal(table[3:], classes.voc_colormap()[3:])  # the rest: VOC's
  with pytest.raises(ValueError, match="'250,50' is not a colour r,g,b"):
    classes.palette('0,0,0;250,50')
  with pytest.raises(ValueError, match=r'palette must be \[256, 3\] colours, got shape \(3, 3\)'):
    Options(palette=np.array(COLOURS))   # the kernel reads 256 colours


def test_config_fields_of_a_folder_are_checked():
  config = config_lib.default_config()
  config.data.dataset = 'folder'
  with pytest.raises(ValueError, match="dataset='folder' needs config.data.folder"):
    config_lib.validate(config)
  config.data.dataset, config.data.folder = 'voc2012', '/data/mine'
  with pytest.raises(ValueError, match="folder is read only with config.data.dataset='folder'"):
    config_lib.validate(config)
  config.data.dataset, config.data.class_names = 'folder', 'a, b'
  with pytest.raises(ValueError, match='class_names has 2 names, config.model.num_classes is 21'):
    config_lib.validate(config)
  config.data.class_names, config.data.class_colours = '', '1,2,3'
  with pytest.raises(ValueError, match='class_colours has 1 colours, config.model.num_classes'):
    config_lib.validate(config)


def test_the_folder_experiment_is_the_voc_recipe_on_a_folder():
  with pytest.raises(ValueError, match='--config.data.folder=DIR'):
    config_lib.load_experiment(os.path.join(ROOT, 'experiments', 'folder.py'))
  config = config_lib.load_experiment(os.path.join(ROOT, 'experiments', 'folder.py'),
                                      [('data.folder', '/data/mine'), ('model.num_classes', '5')])
  recipe = config_lib.load_experiment(os.path.join(ROOT, 'experiments', 'voc_mnv2_os16.py'))
  assert (config.data.dataset, config.data.folder, config.model.num_classes) == (
      'folder', '/data/mine', 5)
  assert config.train == recipe.train and config.eval == recipe.eval
  assert {k: v for k, v in config.model.items() if k != 'num_classes'} == {
      k: v for k, v in recipe.model.items() if k != 'num_classes'}


def test_prepare_data_prints_the_classes_and_how_to_train(tmp_path, capsys):
  root = str(tmp_path / 'mine')
  written = _write_folder(root)
  commands.prepare_data(dataset='folder', data_dir=str(tmp_path / 'tfds'), folder=root)
  out = capsys.readouterr().out
  pixels = np.sum([np.bincount(v.ravel(), minlength=256) for v in written.values()], axis=0)
  shares = 100 * pixels[:3] / pixels[:3].sum()
  assert '  train            8 examples\n  val              4 examples\n' in out
  assert f'void: {pixels[255]:,} pixels' in out
  assert '  largest images (height x width): train 81x80, val 93x80\n' in out  # 60 + 3 i high
  for i, name in enumerate(NAMES):
    assert f'    {i:>3} {name:<20} {shares[i]:6.2f}%\n' in out
  assert 'rare' not in out   # every class above 2% of the labelled pixels
  assert (f'--config.data.dataset=folder --config.data.folder={os.path.abspath(root)} '
          f'--config.model.num_classes=3 --config.data.data_dir={tmp_path / "tfds"}\n') in out
  with pytest.raises(commands.CommandError, match='--dataset folder needs --folder DIR'):
    commands.prepare_data(dataset='folder', data_dir=str(tmp_path / 'tfds'))
  args = build_parser().parse_args(['prepare-data', '--dataset', 'folder', '--folder', root])
  assert (args.dataset, args.folder) == ('folder', root)


def test_training_on_a_folder_keeps_its_classes_and_the_side_predict_runs_whole(tmp_path,
                                                                               tiny_config):
  config, root, _ = _folder_config(tmp_path, tiny_config)
  config.model.num_classes = 3
  config.train.steps = 2
  config.data.eval_size = 81   # below the val images' 84-93 px: eval runs them whole
  workdir = str(tmp_path / 'run')
  report = loop.train_and_evaluate(config, workdir, log=lambda _: None)
  assert list(report['per_class_iou']) == list(NAMES)
  assert report['num_images'] == len(VAL)
  with open(os.path.join(workdir, 'config.json')) as f:
    data = json.load(f)['data']
  assert data['class_names'] == ','.join(NAMES)
  assert data['class_colours'] == ';'.join(','.join(map(str, c)) for c in COLOURS)
  assert data['predict_max_side'] == max(_height(name) for name in VAL) == 93
  # predict pads those images to the one square canvas eval pads them to (the image pooling
  # sees the same padding): 129 = 2 * 64 + 1 holds 93.
  engine, _ = Engine.from_workdir(workdir)
  assert pipeline.oversize_images(config.data, 'val')[1] == (129, 129)
  assert engine.bucket(84, 80) == engine.bucket(93, 80) == (129, 129)
  assert engine.bucket(81, 60) == (81, 81) and engine.bucket(200, 80) == (257, 129)
  # predict draws the masks in labelmap.txt's colours, and runs the largest val image whole,
  # as eval did; with --max-side at the eval size it would have downscaled it.
  image = os.path.join(root, folder.IMAGES, VAL[-1] + '.png')
  for max_side, resized in ((None, []), (81, ['  resized           1  above 81 px'])):
    lines = []
    options = Options(overlay=True, max_side=max_side, overwrite=True,
                      memory_budget=16 << 30)  # the test process holds more
    assert predict_paths(workdir, [image], str(tmp_path / 'masks'), options, batch_size=4,
                         log=lines.append) == 0
    summary = '\n'.join(lines).splitlines()
    assert [line[:34] for line in summary if 'resized' in line] == resized
  with Image.open(str(tmp_path / 'masks' / VAL[-1]) + '.png') as png:
    mask = np.asarray(png)
    palette = np.asarray(png.getpalette()[:9], np.uint8).reshape(3, 3)
  assert mask.shape == (93, 80)
  np.testing.assert_array_equal(palette, COLOURS)
  coloured = np.asarray(Image.open(str(tmp_path / 'masks' / VAL[-1]) + '_color.png'))
  np.testing.assert_array_equal(coloured, np.array(COLOURS, np.uint8)[mask])


def test_rare_classes_are_named_with_the_weights_to_lift_them():
  names = ['background', 'blob', 'speck', 'absent', 'dot']
  hint = folder.rare_class_hint(np.array([0.88, 0.105, 0.007, 0.0, 0.008]), names)
  assert hint == ("  rare (under 2% of the labelled pixels): speck, dot; to weigh them up: "
                  "--config.train.label_weights='(1, 1, 5, 1, 5)' "
                  '(docs/training.md, "The loss")')
  # The weights are a valid config value for as many classes.
  config = config_lib.default_config()
  config.model.num_classes = 5
  config_lib.apply_overrides(config, [('train.label_weights', re.search(
      r"label_weights='(.*?)'", hint).group(1))])
  config_lib.validate(config)
  assert folder.rare_class_hint(np.array([0.5, 0.3, 0.2]), names) == ''
  assert folder.rare_class_hint(np.array([0.01, 0.0]), names) == ''  # all present are rare
