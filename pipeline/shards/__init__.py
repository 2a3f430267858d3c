"""The shards: WebDataset tars written from the prepared index, their manifest, and reading them back.

Writing (the ``shard`` stage, ``pipeline.stages.shard``):

- ``write``: index records -> deterministic, atomically written ``{split}-%06d.tar`` shards.
- ``manifest``: ``manifest.json``, what was written (sizes, sha256, where each sample's members lie) and the
  check run before reading (``load_manifest``).

Reading (training and evaluation):

- ``order``: which samples go into which batch of which rank in which epoch, and each sample's seed.
- ``reader``: one sample's two members by a ranged read located by the manifest.
- ``jpeg``: the JPEG decoder (libjpeg-turbo, PIL's pixels, reduced sizes by DCT scaling).
- ``samples``: members -> checked record, decoded image, augmented training sample.
- ``loader``: ``train_loader`` / ``eval_loader``, the batches a rank trains or evaluates on.

Import each name from the module that defines it; this package re-exports nothing, so importing one module
(the shard stage imports ``write``) does not import the others.
"""
