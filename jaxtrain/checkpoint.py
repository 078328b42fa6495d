"""orbax checkpoints of everything a run needs to continue exactly.

One checkpoint (`WORKDIR/checkpoints/<step>/`) holds three items:
  state  params, optimizer state, step and RNG key (sharded arrays, OCDBT/tensorstore)
  data   the grain iterator state (JSON): where the next batch comes from
  meta   tokens seen, the resolved config and parametrization table (JSON)

Saves are asynchronous by default: orbax copies device arrays to host before `save`
returns (so the next step may donate the buffers), then writes in a background thread.
Every checkpoint is written to a temporary directory and renamed when complete, so an
interrupted save is never mistaken for a checkpoint. `keep` newest are retained.
Restoring takes the target shardings, so a checkpoint restores onto whatever mesh the
current run uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from jaxtrain.config import CheckpointConfig


class Checkpointer:
    def __init__(self, workdir: Path, cfg: CheckpointConfig, read_only: bool = False):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep,
            enable_async_checkpointing=cfg.async_save,
            create=not read_only,
            read_only=read_only,
        )
        self._manager = ocp.CheckpointManager(
            Path(workdir).absolute() / "checkpoints", options=options,
            item_names=("state", "data", "meta"))
        self._every = cfg.every_steps

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, meta: dict, force: bool = False) -> bool:
        """Save if `step` is a multiple of `every_steps` (or `force`); returns whether it saved."""
        if not force and step % self._every:
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta),
        )
        return self._manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """abstract_state: ShapeDtypeStructs carrying the target shardings."""
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
        ))
        return restored.state, restored.data, restored.meta

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only the parameters (optimizer state is not read): for evaluation and inspection."""
        target = {"params": abstract_params}
        state = ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                       restore_args=ocp.checkpoint_utils.construct_restore_args(target))
        return self._manager.restore(step, args=ocp.args.Composite(state=state)).state["params"]

    def read_meta(self, step: int) -> dict:
        """Only the metadata item of a checkpoint (no arrays are read)."""
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
