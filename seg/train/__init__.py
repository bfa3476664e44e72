"""Training: the step (`step.py`: state, schedule, optimiser, pmapped SGD step), the loss
(`loss.py`), the resumable run (`loop.py`), TensorBoard (`tensorboard.py`) and
`benchmark --train` (`benchmark.py`)."""
