"""Datasets of the reference trainer: ``fastjepa.datasets.imagenet1k`` (twin of the reference's
``src/datasets/imagenet1k.py``) and ``fastjepa.datasets.folder`` (an ImageFolder without torchvision)."""
