"""jaxtrain: a JAX pretraining stack for decoder-only language models.

The folders are the layers (docs/ARCHITECTURE.md; tests/test_layering.py enforces them):
config/ (base) <- model/, optim/ (pure math) <- step.py (the compiled boundary) <- run/
(the training core), with data/ and huggingface/ beside them, tools/ (every command beyond
training) and cli.py + commands/ (the entry) on top.
"""

__version__ = "0.1.0"
