"""Your own dataset: DeepLab's MobileNetV2 recipe (width 1.0, OS16) on a folder in the VOC layout.

    python main.py prepare-data --dataset folder --folder /data/mine     # checks it, prints
    python main.py train --config experiments/folder.py --workdir runs/mine \
        --config.data.folder=/data/mine --config.model.num_classes=N \
        --config.train.init_from=runs/mobilenet_v2_1.0_224

The folder holds JPEGImages/ID.jpg, SegmentationClass/ID.png (class indices, or colours
with labelmap.txt) and ImageSets/Segmentation/train.txt and val.txt (docs/data.md, "Your
own dataset"); `prepare-data` prints its classes and the num_classes to give. Starts from
ImageNet weights as the VOC configs do (`import-weights`, docs/weights.md), or from a
VOC-trained workdir (all but its last layer when the classes differ, as DeepLab's
initialize_last_layer=False: train.init_part 'auto').

The recipe's 30,000 steps of 16 crops are ~45 passes over VOC's 10,582 images: for a
smaller folder, fewer steps (`--config.train.steps`) see it as often. Images larger than
data.eval_size (513) are evaluated whole, in one more compiled shape. A class in a small
share of the pixels can be weighed up with DeepLab's `--config.train.label_weights`
(`prepare-data` prints weights to try; docs/training.md, "The loss"). Every
`train.eval_every` steps (5,000; fewer for a short run) the val split is evaluated and
WORKDIR/best keeps the weights of the best evaluation (a workdir of its own: `eval`,
`predict` and `export` take `--workdir WORKDIR/best`).
"""

from seg.config import default_config


def get_config():
  config = default_config()
  config.data.dataset = 'folder'
  config.data.train_split = 'train'
  config.data.eval_split = 'val'
  return config
