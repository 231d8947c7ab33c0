"""seer's data pipeline: everything between image files and augmented views.

Modules (import them directly; this package imports nothing heavy on purpose):

- ``decode``: safe image decoding (bomb check, truncation, odd modes, EXIF, JPEG draft).
- ``shards``: shard layout, atomic ``ShardWriter``, ``iter_shard`` reader (webdataset).
- ``manifest``: ``manifest.json`` + content-hash index of a shard folder, retention.
- ``shard_index``: per-shard member offsets in DALI's ``wds2idx`` format (``ensure_index``).
- ``sample_reader``: one sample read with one seek + read through a shard's index.
- ``ingest``: ``ingest()`` files/folders/lists into shards, ``watch()`` a drop folder.
- ``quarantine``: JSON-lines log of rejected inputs and failed samples.
- ``sample_corpus``: a demo corpus from photographs bundled in scikit-image/scikit-learn.
- ``stream``, ``stream_plan``: which sample each rank/worker reads next (a global permutation in
  fixed mode, size-independent draws online), and its resumable state.
- ``crops``: the CPU-worker stage of multi-crop (crop boxes, resize, flip -> uint8 views).
- ``augment``: the batched colour stage, run on the training device.

This package never imports from ``seer``.
"""
