"""malaria-edge runtime: what a Raspberry Pi installs (no TensorFlow, no Keras)."""

__version__ = "0.1.0"
