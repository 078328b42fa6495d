"""The compiled boundary: TrainState, its sharded init, and the pure train/eval steps.

    train_step(state, batch, lr) -> (state, metrics)      jitted once, state donated

lr is the step's learning rate, computed by the host from the tokens seen
(jaxtrain/optim/schedules.py): a scalar argument, so every value reuses the one compilation.
Optional measurements (telemetry) reach the step only as an `ExtraMetrics` function the
caller passes to `build_steps`; it is compiled into a second variant of the step, and
the plain one is the same program with or without it.

`build_steps` returns `Steps`: the jitted train step(s), the evaluation (`compile_eval`,
also what `jaxtrain eval` runs on a saved checkpoint), the sharded init, and the step's
arguments as sharded ShapeDtypeStructs (`Steps.abstract_arguments`), from which bench,
dry-run --compile and the collective counts compile the very program the loop runs
(`Steps.compile_train`; under data.packing its batch carries the segment ids).

Params are a plain nested dict of arrays (`nnx.to_pure_dict`); the NNX module is rebuilt
from the static graph definition inside each step (`nnx.merge`), so no stateful object
lives across steps and the state is an ordinary pytree for optax and orbax. The
parametrization table (`ModelSpec.table`) scales params at init and multiplies them by
their forward multipliers inside the step (`bind_model`).

Loss (float32), with z-loss (Chowdhery et al. 2022, "PaLM"; Wortsman et al. 2023):
    L = mean_t[ logsumexp(z_t) - z_t[y_t] ] + c_z * mean_t[ logsumexp(z_t)^2 ]
and with model.moe.n_experts > 0 the routers' load-balancing and z-losses, averaged over
layers (model/moe.py `router_losses`: the same forward pass sows what they need). With
model.moe.bias_update_rate > 0 the step also moves each MoE block's balance bias, model
state stored among the params (`balance_bias`), by that step's expert loads
(model/moe.py `update_balance_bias`), after the optimizer update.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from jaxtrain.config.schema import Config, ModelConfig
from jaxtrain.model import block_stack, execution, parametrization, sharding
from jaxtrain.model.parametrization import Table
from jaxtrain.model.moe import BALANCE_BIAS, MOE_SOWABLE, router_losses, update_balance_bias
from jaxtrain.model.transformer import Transformer, forward_sown
from jaxtrain.optim.optimizer import make_optimizer

NONFINITE = "nonfinite"  # train-step metric: 1 when the step's loss or gradients are not finite
# Not a logged metric: loss_and_metrics' per-MoE-block expert loads (blocks, E), which
# train_step takes out to update the balance bias.
EXPERT_LOADS = "expert_loads"

# tokens (B, T+1), or {"tokens", "segment_ids"} (both (B, T+1)) under data.packing
Batch = jax.Array | dict[str, jax.Array]

# (params before the update, params after it, gradients, batch) -> more metrics of the step
ExtraMetrics = Callable[[Any, Any, Any, Batch], dict[str, jax.Array]]


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of updates applied
    params: Any  # nested dict of float32 arrays
    opt_state: Any
    rng: jax.Array  # raw uint32 PRNG key; per-step keys are fold_in(rng, step)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything static about the model that the compiled functions close over."""

    graphdef: Any
    abstract_params: Any  # ShapeDtypeStructs
    logical_axes: Any  # same tree, PartitionSpecs of logical names
    table: Table  # the resolved parametrization: one rule per parameter path
    model: ModelConfig  # the model section as compiled: dtype and attention concrete for the target

    def params_by_path(self) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
        """Dotted parameter path -> (logical axes, stored shape), in model order."""
        axes = jax.tree_util.tree_flatten_with_path(self.logical_axes, is_leaf=lambda x: isinstance(x, P))[0]
        shapes = jax.tree.leaves(self.abstract_params)
        return {parametrization.path_str(key_path): (tuple(names), tuple(leaf.shape))
                for (key_path, names), leaf in zip(axes, shapes, strict=True)}


def _unit_model(cfg: Config, rngs: nnx.Rngs) -> Transformer:
    return Transformer(cfg.model, rngs, parametrization.forward_scales(cfg))


def model_spec(cfg: Config, platform: str | None = None) -> ModelSpec:
    """The model as compiled for devices of `platform` ("cpu", "gpu", "tpu"; None: this
    process's backend, jax.default_backend()): `model.dtype` and `model.attention` are
    resolved for it once (model/execution.py), and the model built from that config, so
    a deviceless compile for a GPU / TPU mesh passes mesh.devices.flat[0].platform."""
    cfg = execution.resolve(cfg, platform)
    abstract_model = nnx.eval_shape(lambda: _unit_model(cfg, nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract_model)
    return ModelSpec(graphdef, nnx.to_pure_dict(abstract_state),
                     nnx.to_pure_dict(nnx.get_partition_spec(abstract_state)),
                     parametrization.build_table(cfg, abstract_state), cfg.model)


def init_params(cfg: Config, spec: ModelSpec, key: jax.Array) -> Any:
    unit = nnx.to_pure_dict(nnx.state(_unit_model(cfg, nnx.Rngs(params=key))))
    return parametrization.scale_init(spec.table, unit)


def bind_model(spec: ModelSpec, params: Any) -> Transformer:
    """The NNX module holding the weights the forward pass uses (multipliers applied)."""
    return nnx.merge(spec.graphdef, parametrization.effective_params(spec.table, params))


def _init_state(cfg: Config, spec: ModelSpec, tx: optax.GradientTransformation,
                seed_key: jax.Array) -> TrainState:
    param_key, rng = jax.random.split(seed_key)
    params = init_params(cfg, spec, param_key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng)


def _abstract_init(cfg: Config, spec: ModelSpec, tx: optax.GradientTransformation) -> TrainState:
    """The TrainState's shapes and dtypes, traced without allocating anything."""
    return jax.eval_shape(functools.partial(_init_state, cfg, spec, tx), jax.random.PRNGKey(0))


def state_shardings(cfg: Config, spec: ModelSpec, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """Shardings for every leaf of the TrainState: optimizer moments follow their params."""
    abstract = _abstract_init(cfg, spec, tx)
    params = sharding.param_shardings(spec.logical_axes, spec.abstract_params, mesh)
    rep = sharding.replicated(mesh)
    # optax.partition leaves a MaskedNode where a param belongs to another role: keep it.
    masked = lambda x: isinstance(x, optax.MaskedNode)
    opt = optax.tree_map_params(tx, lambda leaf, s: leaf if masked(leaf) else s, abstract.opt_state, params,
                                transform_non_params=lambda _: rep, is_leaf=masked)
    return TrainState(step=rep, params=params, opt_state=opt, rng=rep)


def abstract_state(cfg: Config, spec: ModelSpec, tx: optax.GradientTransformation,
                   shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs with target shardings: the restore target for orbax."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        _abstract_init(cfg, spec, tx), shardings)


def init_state(cfg: Config, spec: ModelSpec, tx: optax.GradientTransformation,
               shardings: TrainState) -> TrainState:
    """Sharded init: every leaf is created directly on its devices."""
    init = jax.jit(functools.partial(_init_state, cfg, spec, tx), out_shardings=shardings)
    return init(jax.random.PRNGKey(cfg.train.seed))


def abstract_batch(cfg: Config, mesh: Mesh) -> Batch:
    """The global batch the loop feeds, as sharded ShapeDtypeStructs (jaxtrain/data/pipeline.py
    reads int32 tokens, and segment ids beside them when packing)."""
    tokens = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.data.seq_len + 1), jnp.int32,
                                  sharding=sharding.batch_sharding(mesh))
    return {"tokens": tokens, "segment_ids": tokens} if cfg.data.packing else tokens


def batch_tokens(batch: Batch) -> tuple[jax.Array, jax.Array | None]:
    """(tokens (B, T+1), segment ids (B, T+1) or None) of a batch: a token array, or
    {"tokens", "segment_ids"} when documents are packed (jaxtrain/data/pipeline.py)."""
    if isinstance(batch, dict):
        return batch["tokens"], batch["segment_ids"]
    return batch, None


def model_inputs(batch: Batch) -> tuple[jax.Array, jax.Array | None]:
    """What the model reads of a batch: tokens[:, :-1], and their segment ids when packed."""
    tokens, segments = batch_tokens(batch)
    return tokens[:, :-1], None if segments is None else segments[:, :-1]


def target_weights(batch: Batch, dtype: Any = jnp.float32) -> jax.Array:
    """(B, T) weights of the targets tokens[:, 1:]: all 1, or under packing 0 for a target in
    another document than its input (the first token of the next document)."""
    tokens, segments = batch_tokens(batch)
    if segments is None:
        return jnp.ones(tokens[:, 1:].shape, dtype)
    return (segments[:, 1:] == segments[:, :-1]).astype(dtype)


def loss_and_metrics(params: Any, spec: ModelSpec, batch: Batch, z_loss: float,
                     dropout_key: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Predicts tokens[:, 1:] from tokens[:, :-1]. Packed: each document attends only to
    itself, and targets in another document than their input (one per boundary) are not
    counted, so the mean is over the predictions made within documents."""
    targets = batch_tokens(batch)[0][:, 1:]
    inputs, segment_ids = model_inputs(batch)
    model, moe = bind_model(spec, params), spec.model.moe
    if moe.enabled:  # the routers' statistics come out of the same forward pass
        logits, sown = forward_sown(model, inputs, MOE_SOWABLE, segment_ids, dropout_key)
    else:
        logits = model(inputs, dropout_key=dropout_key, segment_ids=segment_ids)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    weights = target_weights(batch, log_z.dtype)
    mean = lambda x: jnp.sum(weights * x) / jnp.maximum(jnp.sum(weights), 1.0)
    ce = mean(log_z - target_logit)
    z_term = z_loss * mean(log_z**2)
    if not moe.enabled:
        return ce + z_term, {"loss": ce, "z_loss": z_term}
    router_term, router_metrics = router_losses(sown, moe)
    metrics = {"loss": ce, "z_loss": z_term, **router_metrics}
    if moe.bias_update_rate > 0:  # the bias this step routed with, and the loads it routed
        metrics.update({"moe/bias_abs_max": jnp.max(jnp.abs(balance_bias(params))),
                        EXPERT_LOADS: sown["router_load"]})
    return ce + z_term + router_term, metrics


def balance_bias(params: Any) -> jax.Array:
    """The MoE blocks' balance biases (MoE blocks, E), stored among the params."""
    return params[block_stack.MAIN]["mlp"][BALANCE_BIAS]


def _with_balance_bias(params: Any, bias: jax.Array) -> Any:
    main = params[block_stack.MAIN]
    return {**params, block_stack.MAIN: {**main, "mlp": {**main["mlp"], BALANCE_BIAS: bias}}}


def _grads_and_metrics(params: Any, spec: ModelSpec, batch: Batch, z_loss: float,
                       dropout_key: jax.Array | None, microbatches: int) -> tuple[Any, dict]:
    """Gradient and metrics of the whole batch, accumulated over `microbatches` slices.

    Slice j holds rows j, j+k, j+2k, ... so that every device keeps its own rows (the
    batch is split over devices in contiguous blocks). Equal slices make the mean of the
    slice means the batch mean, so the result equals the one-pass gradient up to rounding
    (with packed documents, slices may count a few more or fewer targets: each slice's
    mean weighs its own targets).
    """
    grad_fn = jax.value_and_grad(loss_and_metrics, has_aux=True)
    if microbatches == 1:
        (_, metrics), grads = grad_fn(params, spec, batch, z_loss, dropout_key)
        return grads, metrics
    slices = jax.tree.map(lambda x: x.reshape(-1, microbatches, x.shape[-1]).swapaxes(0, 1), batch)

    def accumulate(total, indexed_slice):
        index, micro = indexed_slice
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
        (_, metrics), grads = grad_fn(params, spec, micro, z_loss, key)
        return jax.tree.map(jnp.add, total, (grads, metrics)), None

    metric_shapes = jax.eval_shape(lambda: loss_and_metrics(params, spec, jax.tree.map(lambda x: x[0], slices),
                                                            z_loss)[1])
    zeros = (jax.tree.map(jnp.zeros_like, params),
             jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), metric_shapes))
    total, _ = jax.lax.scan(accumulate, zeros, (jnp.arange(microbatches), slices))
    return jax.tree.map(lambda x: x / microbatches, total)


def train_step(state: TrainState, batch: Batch, lr: jax.Array, *, spec: ModelSpec,
               tx: optax.GradientTransformationExtraArgs, z_loss: float, dropout: bool, microbatches: int = 1,
               skip_nonfinite: bool = False, extra_metrics: ExtraMetrics | None = None) -> tuple[TrainState, dict]:
    """One optimizer step. metrics[NONFINITE] is 1 when the loss or any gradient is not
    finite; with `skip_nonfinite` such a step keeps the old params and optimizer state (the
    step counter still advances: the batch is consumed, the schedule moves on).
    `extra_metrics`, if given, adds its metrics of the step (e.g. jaxtrain/run/telemetry.py's)."""
    dropout_key = jax.random.fold_in(state.rng, state.step) if dropout else None
    grads, metrics = _grads_and_metrics(state.params, spec, batch, z_loss, dropout_key, microbatches)
    loads = metrics.pop(EXPERT_LOADS, None)  # the mean over microbatches: the whole step's load
    updates, opt_state = tx.update(grads, state.opt_state, state.params, learning_rate=lr)
    params = optax.apply_updates(state.params, updates)
    if loads is not None:
        rate = spec.model.moe.bias_update_rate
        params = _with_balance_bias(params, update_balance_bias(balance_bias(params), loads, rate))
    grad_norm = optax.tree_utils.tree_norm(grads)  # non-finite iff some gradient entry is
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    if skip_nonfinite:
        keep_old = lambda new, old: jnp.where(finite, new, old)
        params = jax.tree.map(keep_old, params, state.params)
        opt_state = jax.tree.map(keep_old, opt_state, state.opt_state)
    metrics = {**metrics, "grad_norm": grad_norm, "lr": lr,
               NONFINITE: jnp.logical_not(finite).astype(jnp.int32)}
    if extra_metrics is not None:
        metrics.update(extra_metrics(state.params, params, grads, batch))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, batch: Batch, *, spec: ModelSpec) -> jax.Array:
    """Mean next-token cross-entropy (nats/token) of one batch, no z-loss."""
    return loss_and_metrics(params, spec, batch, 0.0)[1]["loss"]


def compile_eval(spec: ModelSpec, mesh: Mesh) -> Callable:
    """jit eval_step(params, batch) -> loss with explicit shardings (params in their storage
    layout, the batch over the batch axes): the loop's (`Steps.evaluate`) and `jaxtrain eval`'s."""
    params = sharding.param_shardings(spec.logical_axes, spec.abstract_params, mesh)
    return jax.jit(sharding.traced_on(mesh, functools.partial(eval_step, spec=spec)),
                   in_shardings=(params, sharding.batch_sharding(mesh)), out_shardings=sharding.replicated(mesh))


def compile_steps(cfg: Config, spec: ModelSpec, tx: optax.GradientTransformation, shardings: TrainState,
                  mesh: Mesh, extra_metrics: ExtraMetrics | None = None) -> tuple[Callable, Callable | None]:
    """jit the pure train step once, with explicit in/out shardings and the state donated:
    the plain step, and the step with `extra_metrics` (None without them)."""
    batch_sh = sharding.batch_sharding(mesh)
    rep = sharding.replicated(mesh)
    step = functools.partial(train_step, spec=spec, tx=tx,
                             z_loss=cfg.train.z_loss, dropout=cfg.model.dropout > 0,
                             microbatches=cfg.train.microbatches,
                             skip_nonfinite=cfg.train.on_nonfinite == "skip")
    jit_step = lambda fn: jax.jit(sharding.traced_on(mesh, fn, cfg.train.grad_reduce_dtype),
                                  in_shardings=(shardings, batch_sh, rep), out_shardings=(shardings, rep),
                                  donate_argnums=0)
    train = jit_step(step)
    # compiled on first use only, i.e. only on the steps that ask for the extra metrics
    train_extra = None if extra_metrics is None else jit_step(functools.partial(step, extra_metrics=extra_metrics))
    return train, train_extra


@dataclasses.dataclass(frozen=True)
class Steps:
    """Everything a run, a benchmark or a test needs to step a model on a mesh; what
    `build_steps` was given (cfg, spec, mesh) is kept, so nothing asks for it again."""

    cfg: Config
    spec: ModelSpec
    mesh: Mesh
    tx: optax.GradientTransformation
    shardings: TrainState
    train: Callable  # jitted train_step(state, batch, lr) -> (state, metrics)
    train_extra: Callable | None  # the same step, its metrics with build_steps' extra_metrics
    evaluate: Callable  # jitted eval_step(params, batch) -> loss

    def init(self) -> TrainState:
        """The initial state (seeded by train.seed), every leaf created on its devices."""
        return init_state(self.cfg, self.spec, self.tx, self.shardings)

    def abstract_state(self) -> TrainState:
        return abstract_state(self.cfg, self.spec, self.tx, self.shardings)

    def abstract_arguments(self) -> tuple[TrainState, Batch, jax.ShapeDtypeStruct]:
        """(state, batch, lr) of the train step as sharded ShapeDtypeStructs: what
        `train.lower` takes to compile the step without allocating anything."""
        lr = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(self.mesh))
        return self.abstract_state(), abstract_batch(self.cfg, self.mesh), lr

    def compile_train(self) -> Any:
        """The plain train step compiled from `abstract_arguments` (nothing allocated): the
        program `jaxtrain bench` times and `dry-run --compile` counts, the loop's own."""
        return self.train.lower(*self.abstract_arguments()).compile()


def build_steps(cfg: Config, spec: ModelSpec, mesh: Mesh, extra_metrics: ExtraMetrics | None = None) -> Steps:
    """config -> optax chain from the table -> shardings -> jitted steps (with a variant
    adding `extra_metrics` when given)."""
    tx = make_optimizer(cfg.optimizer, spec.table)
    shardings = state_shardings(cfg, spec, tx, mesh)
    train, train_extra = compile_steps(cfg, spec, tx, shardings, mesh, extra_metrics)
    return Steps(cfg, spec, mesh, tx, shardings, train, train_extra, compile_eval(spec, mesh))
