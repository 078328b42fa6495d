"""Pure math, first: the model and what says how its weights scale and lie.

    transformer.py      the Flax NNX decoder
    parametrization.py  SP / muP / NTK + depth-muP / CompleteP: the per-parameter table
    sharding.py         the mesh, logical -> mesh rules for parameters and activations

Imports only jaxtrain.config (never its file reader) and itself; reads no file.
"""
