"""seer's data pipeline: everything between image files and augmented views.

Modules (import them directly; this package imports nothing heavy on purpose):

- ``decode``: safe image decoding (bomb check, truncation, odd modes, EXIF, JPEG draft).
- ``storage``: where bytes are kept, local paths and ``s3://`` alike (``where``, ranged reads,
  listing, atomic writes and publishes: the project's one home for them), ``ShardReadError``;
  ``storage_remote`` holds its object-store side (``RemotePath``, clients, one-line errors).
- ``read_ahead``: reads issued ahead of their use, delivered in order (remote samples).
- ``shard_cache``: a node-local, bounded LRU copy of remote shards for DALI, which reads files.
- ``seeding``: ``derive_seed``, seeds named by what they are for.
- ``shards``: shard layout, atomic ``ShardWriter``, ``iter_shard`` reader (webdataset).
- ``manifest``: ``manifest.json`` + content-hash index of a shard folder, retention.
- ``shard_index``: per-shard member offsets in DALI's ``wds2idx`` format (``ensure_index``).
- ``sample_reader``: one sample read with one seek + read through a shard's index.
- ``ingest``: ``ingest()`` files/folders/lists into shards, ``watch()`` a drop folder.
- ``quarantine``: JSON-lines log of rejected inputs and failed samples.
- ``sample_corpus``: a demo corpus from photographs bundled in scikit-image/scikit-learn.
- ``stream``, ``stream_order``: which sample each rank/worker reads next (a global permutation in
  fixed mode, size-independent draws online), and its resumable state.
- ``crops``: the CPU-worker stage of multi-crop (crop boxes, resize, flip -> uint8 views).
- ``augment``: the batched color stage, run on the training device (``color_batched``: its
  accelerator path, whole-batch ops over a per-sample parameter table, optionally compiled;
  ``color_cpu``: its CPU path, per sample, with numba-fused kernels from ``color_jit`` where numba
  is installed, numpy ops otherwise).
- ``batch_source``: what the training loop sees of data, for both backends (``StreamBatchSource``
  here, ``dali_loader.DaliBatchSource``): device-ready views, commit, state, skipped count.

This package never imports from ``seer``.
"""
