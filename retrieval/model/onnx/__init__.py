"""ONNX Runtime encoders (``--runtime onnx``): the towers of a loaded open_clip model exported
to ONNX (`export`), quantised to int8 with ONNX Runtime's own tooling (`quantize`), kept in an
on-disk cache keyed by the weights (`cache`), and run with thread settings that fit the machine
(`session`, whose `OnnxForward` is what `retrieval.model.encoder` calls).

onnx and onnxruntime come with the optional ``onnx`` extra; without it, `OnnxForward.load`
says so in one line. Imports torch, open_clip and the modules of `retrieval.model` below the
encoder (`tokens`, `runtime`, `forward`).
"""
