"""The trained model as an MLflow model: what predict and the served model share, the pyfunc, logging it,
the registry's challenger/champion aliases, and ``models:/`` URIs resolved to a model file.

* ``detect``: one batch through the model and SSD's post-processing (``predict`` and the pyfunc).
* ``pyfunc``: ``SsdDetector``, the MLflow ``PythonModel`` (imports MLflow).
* ``model_log``: the MLflow model folder (signature, input example, requirements, ONNX) and its logging.
* ``registry``: registered versions, the ``challenger``/``champion`` aliases, promotion.
* ``publish``: the end of a training job: the MLflow model logged to the run and registered, with provenance tags.
* ``model_uri``: ``models:/name@alias`` (or ``/version``) to a local model file.

Only ``detect`` is imported by ``predict`` on a plain file; the others import MLflow inside their functions
or at their top, and are imported only where MLflow is used.
"""
