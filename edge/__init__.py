"""malaria-edge runtime: what a Raspberry Pi installs (no TensorFlow, no Keras).

The Python API is `edge.Classifier` (see edge/classifier.py); it loads lazily, so `import edge.card`
stays light.
"""

__version__ = "0.2.0"
__all__ = ["Classifier", "Prediction"]


def __getattr__(name):
    if name in __all__:
        from edge import classifier
        return getattr(classifier, name)
    raise AttributeError(f"module 'edge' has no attribute {name!r}")
