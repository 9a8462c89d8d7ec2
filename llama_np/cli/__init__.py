"""The ``llama-np`` command; ``main.main`` runs it, and ``main.py`` says which module holds each verb."""
