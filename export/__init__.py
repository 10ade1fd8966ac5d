"""malaria-edge export: Keras → TFLite and ONNX (float and int8), parity gate, Grad-CAM explainer."""
