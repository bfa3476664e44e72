"""Pretrained weights: readers per format (`deeplab_tf.py`, `hf.py`, `keras.py`), mapping and
checks (`mapping.py`), the workdir writer (`importer.py`) and training initialisation
(`init_from.py`). docs/weights.md says where the files are published and how they differ."""
