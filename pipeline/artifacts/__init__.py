"""What the pipeline writes to disk, and the files it hands to people.

- ``atomic_write``: the one atomic file write (old file or whole new one, fsynced).
- ``output_folder``: the output folders a stage owns (marked, swapped in whole).
- ``model_file``: the trained-model file (``models/ssd.pt``): weights, preset, classes, params.
- ``onnx_export``: the model as an ONNX graph (optionally with NMS).
- ``onnx_verify``: an exported graph run with onnxruntime and checked against PyTorch; its sidecar JSON.

Import each name from the module that defines it; this package re-exports nothing.
"""
