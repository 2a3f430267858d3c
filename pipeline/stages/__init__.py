"""One module per command: each exposes ``main(args, params) -> int | None``.

A command too large for one file keeps its parts beside it as ``<command>_<part>.py`` (``predict_inputs``,
``evaluate_outputs``, ...); only the command's own module has a ``main``.
"""
