"""`python -m jaxtrain ...` is the same as the `jaxtrain` console script."""

from jaxtrain.cli import program

program()
