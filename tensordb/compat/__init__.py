"""Compatibility: TensorLayer's ``TensorHub`` API on TensorDB."""
