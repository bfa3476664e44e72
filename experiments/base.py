"""Defaults shared by every experiment: the DeepLab recipe for MobileNetV2 (not an experiment itself).

Fields mirror DeepLab's `train.py` flags where one exists. Experiments import
`get_config()` from here and override a few fields.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  config.model = ml_collections.ConfigDict()
  config.model.num_classes = 21
  config.model.width = 1.0             # MobileNetV2 width (depth) multiplier
  config.model.output_stride = 16      # 8, 16 or 32
  config.model.head = 'reduced'        # 'reduced' (image pooling + 1x1) or 'aspp'
  config.model.dropout_rate = 0.1      # DeepLab's keep probability 0.9
  config.model.bn_momentum = 0.9997    # DeepLab's batch_norm_decay
  config.model.backbone_bn_epsilon = 1e-3  # TF-slim MobileNetV2
  config.model.head_bn_epsilon = 1e-5      # DeepLab's ASPP
  config.model.preprocessing = 'zero_mean_unit_range'  # inputs [-1, 1]; set by import-weights

  config.data = ml_collections.ConfigDict()
  config.data.dataset = 'embedded'     # a `seg.data.voc.VocSegmentation` config name
  config.data.data_dir = ''            # TFDS data_dir; '' = TFDS's default (~/tensorflow_datasets)
  config.data.train_split = 'train'
  config.data.eval_split = 'val'
  config.data.crop_size = 513          # training crop (k * 16 + 1 keeps grids aligned)
  config.data.eval_size = 513          # evaluation pads every image to this size
  config.data.min_scale = 0.5
  config.data.max_scale = 2.0
  config.data.scale_step = 0.25
  config.data.ignore_label = 255
  config.data.shuffle_buffer = 1000
  config.data.cache = 'decoded'        # 'decoded' | 'encoded' | 'none' (seg/data/pipeline.py)

  config.train = ml_collections.ConfigDict()
  config.train.steps = 30_000
  config.train.batch_size = 16         # global, split across every device
  config.train.learning_rate = 0.007   # base of the poly schedule
  config.train.lr_power = 0.9
  config.train.warmup_steps = 0
  config.train.momentum = 0.9
  config.train.weight_decay = 4e-5     # on conv kernels except depthwise, as TF-slim
  config.train.seed = 0
  config.train.log_every = 50
  config.train.checkpoint_every = 1000
  config.train.keep_checkpoints = 3
  config.train.eval_every = 5000       # 0 = only at the end
  # Initialisation of a new run (not of a resumed one) from a workdir, e.g. one written by
  # `import-weights`: init_part 'all' (whole network), 'backbone' (fresh head) or 'auto'
  # (whole network if its head fits the config's classes and head type, else backbone).
  config.train.init_from = ''
  config.train.init_part = 'auto'
  config.train.compute_dtype = 'float32'  # 'bfloat16': mixed precision (params, loss stay f32)
  config.train.skip_nonfinite = False  # True: skip (and count) steps with a NaN/inf loss or grad
  config.train.summary_images = 3      # validation images sent to TensorBoard at each eval

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 8           # global; the last batch is padded and masked
  config.eval.scales = (1.0,)          # DeepLab's eval_scales; e.g. (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
  config.eval.flip = False             # also the left-right flipped image (DeepLab's add_flipped_images)

  return config
