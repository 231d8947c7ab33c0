"""Ingestion side of seer's data pipeline: turn image files into webdataset shards.

Modules (import them directly; this package imports nothing heavy on purpose):

- ``decode``: safe image decoding (bomb check, truncation, odd modes, EXIF, JPEG draft).
- ``shards``: shard layout, atomic ``ShardWriter``, ``iter_shard`` reader (webdataset).
- ``manifest``: ``manifest.json`` + content-hash index of a shard folder, retention.
- ``ingest``: ``ingest()`` files/folders/lists into shards, ``watch()`` a drop folder.
- ``quarantine``: JSON-lines log of rejected inputs and failed samples.
- ``sample_corpus``: a demo corpus from photographs bundled in scikit-image/scikit-learn.

This package never imports from ``seer``.
"""
