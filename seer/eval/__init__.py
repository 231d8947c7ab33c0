"""Evaluation of frozen backbones on labelled images: ``seer eval knn|linear|lowshot``.

``datasets`` (image folders, .cls shards, IDX files), ``features`` (safe backbone loading,
cached feature extraction), ``probes`` (kNN, linear, low-shot, effective rank), ``runner``
(the command: tables, JSON, TensorBoard) and ``during_training`` (the kNN probe that
``eval.every_steps`` runs inside ``seer pretrain``).
"""
