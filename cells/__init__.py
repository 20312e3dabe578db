"""What every smearscope stage must agree on: the model contract, the crop function, cell finding.

This package imports no other smearscope package and never TensorFlow, so the batch job and the
serving client stay light.
"""
