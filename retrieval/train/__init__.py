"""Training: contrastive fine-tuning of a dual encoder.

`config` (`TrainConfig`, torch-free), `loop` (epochs and steps), `gradcache` (one InfoNCE step
in chunks and across processes), `loss` (InfoNCE, pure tensors), `trainset` and `pixel_cache`
(decode-once training data), `sampling` (each epoch's pairs, batches and views), `augment`
(crops of the decoded images), `locking` (locked towers that stay as pretrained), `splits`
(where a tower's locked part ends), `feature_cache` (that part encoded once), `run` (the run
folder: checkpoints, `RunState`, metrics). Imports `model`, `corpus` and the layers below
them; a sibling of `index`, so neither imports the other.
"""
