"""Seizure detector: dataset from the simulator, training, ONNX export (see MODEL_CARD.md)."""
