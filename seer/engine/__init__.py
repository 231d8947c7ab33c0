"""Training engine: the loop (``train``), its parts (``setup``, ``data``, ``checkpoint``, ``optim``,
``guard``, ``metrics``), how a model is spread over ranks (``parallel``, ``syncbn``, ``meta_init``) and
the decisions ranks share (``distributed``)."""
