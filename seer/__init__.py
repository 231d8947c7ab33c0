"""seer: SEER-style self-supervised pretraining of vision backbones on streams of images."""

__version__ = "0.1.0"
