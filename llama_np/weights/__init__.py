"""Where weights live while the model runs: codecs, kept and streamed tensors, memory."""
