"""Training: a backward function beside each forward function.

    backward.py        one *_backward per function of layers.py (and the losses), same order
"""
