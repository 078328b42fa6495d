"""`python -m jaxtrain ...` is the same as the `jaxtrain` console script."""
import sys

from jaxtrain.cli import main

sys.exit(main())
