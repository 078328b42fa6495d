"""Models in and out of jaxtrain as Hugging Face checkpoints (Llama / Qwen3 / Qwen3-MoE).

    architecture.py   jaxtrain's model section <-> a config.json of those families
    moe.py            model.moe <-> Qwen3-MoE (its fields, sparse layers, expert tensors, refusals)
    weights.py        parameters <-> tensors, with every parametrization factor folded in
    files.py          safetensors (numpy API, sharded + index) and tokenizer files
    importer.py       `train.init_from.huggingface` and `jaxtrain import`
`jaxtrain export` (a tool: it reads a saved run) is jaxtrain/tools/huggingface_export.py,
the run `jaxtrain import` makes is jaxtrain/tools/huggingface_import.py; the two CLI
commands, export and import, are in jaxtrain/commands/huggingface.py.
"""
