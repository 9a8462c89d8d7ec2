"""The ``llama-np`` command."""
