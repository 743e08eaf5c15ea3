"""fastjepa: kernel-optimized I-JEPA pretraining, a drop-in for the reference trainer's modules."""

__version__ = "0.1.0"
