"""Models: the versioned model registry (Keras format, builders, aliases) and TensorDB's example builders."""
