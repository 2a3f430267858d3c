"""Readers that turn a dataset on disk into validated index records for ``prepare``.

One module, one job:

- ``images``: safe image inspection (decompression-bomb guard before decoding, truncation, EXIF
  orientation of image and boxes, conversion of any colour mode to RGB).
- ``report``: counted outcomes; every image and box is either kept or rejected for a named reason.
- ``records``: the source-neutral ``Candidate`` (what an annotation says) and ``IndexRecord`` (what the
  index holds), and ``finalize`` which validates one into the other.
- ``voc``, ``coco``, ``synthetic``: one reader per ``data.source``.
"""
