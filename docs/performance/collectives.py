"""Collective bytes and temporary memory per device of the compiled train step, for
docs/scaling.sh: `python collectives.py HLO_COLLECTIVES_PY CONFIG [KEY=VALUE ...]`.

Uses only the train-step API that jaxtrain has had since its first release (model_spec,
build_steps, abstract_state, batch_sharding), so the same script measures an older
checkout (put it first on PYTHONPATH); the HLO is counted by the given hlo_collectives.py.
"""

import importlib.util
import json
import sys

import jax
import numpy as np

from jaxtrain import step as ts
from jaxtrain.config.files import load_config
from jaxtrain.model import sharding

spec_file, config, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
module_spec = importlib.util.spec_from_file_location("hlo_collectives", spec_file)
hlo_collectives = sys.modules["hlo_collectives"] = importlib.util.module_from_spec(module_spec)
module_spec.loader.exec_module(hlo_collectives)

cfg = load_config(config, overrides)
mesh = sharding.make_mesh(cfg.mesh)
spec = ts.model_spec(cfg)
steps = ts.build_steps(cfg, spec, mesh)
state = ts.abstract_state(cfg, spec, steps.tx, steps.shardings)
batch = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.data.seq_len + 1), np.int32,
                             sharding=sharding.batch_sharding(mesh))
compiled = steps.train.lower(state, batch, np.float32(cfg.optimizer.lr)).compile()
kinds = hlo_collectives.bytes_by_kind(compiled.as_text())
param_bytes = sum(leaf.size * 4 for leaf in jax.tree.leaves(spec.abstract_params))
print(json.dumps({"overrides": overrides, "param_bytes": param_bytes, "bytes_by_kind": kinds,
                  "total_bytes": sum(kinds.values()), "total_over_param_bytes": sum(kinds.values()) / param_bytes,
                  "temp_bytes": compiled.memory_analysis().temp_size_in_bytes}))
