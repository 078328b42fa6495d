"""The core: what `jaxtrain train` executes around the compiled step (jaxtrain/step.py).

    loop.py        run() and TrainingRun: resume, feed, log, evaluate, checkpoint
    preflight.py   every refusal before compiling; checkpoint.py orbax; metrics.py logs;
    evaluate.py, telemetry.py, memory.py, preemption.py, nonfinite.py, rewarm.py,
    distributed.py, xla_flags.py: one concept each (docs/ARCHITECTURE.md)

Never imports jaxtrain.tools.
"""
