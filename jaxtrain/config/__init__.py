"""Base layer: the typed config and everything about reading it.

    schema.py   every section (pydantic, frozen, unknown keys rejected) and `Config`
    checks.py   rules across sections, checked after each section validated
    resume.py   which keys fix what a checkpoint holds (a resume may not change them)
    files.py    the one reader: YAML files, `--set a.b=c`, a workdir's config.yaml
    errors.py   UserError (one line, exit 2) and its kinds

Imports nothing of jaxtrain above it, and no JAX.
"""
