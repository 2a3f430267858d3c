"""The SSD training pipeline: DVC stages, Ray Train, MLflow tracking and the command line.

Imports flow one way: ``pipeline -> ssd_core``.
"""
