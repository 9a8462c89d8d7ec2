"""How bytes on disk become named tensors, and how a model is found and written."""
