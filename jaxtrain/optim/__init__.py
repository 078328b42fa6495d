"""Pure math, after model/: how the weights move.

    optimizer.py  the optax chain from the parametrization table
    muon.py       Muon's orthogonalized update for the hidden matrices
    schedules.py  learning-rate schedules, pure functions of tokens seen

Imports only jaxtrain.config, jaxtrain.model and itself; reads no file.
"""
