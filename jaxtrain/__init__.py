"""jaxtrain: a JAX pretraining stack for decoder-only language models.

Modules, one concept each: config, model, sharding, schedules, optimizer, train_step
(the compiled boundary), train (the loop), checkpoint, metrics, preemption, data/, cli.
"""

__version__ = "0.1.0"
