"""Communication counted from compiled HLO: real XLA:CPU programs on 8 devices, and hand-written
HLO for what XLA:CPU does not emit (async start/done pairs, loops without a trip count)."""

import gzip
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxtrain.tools.hlo_collectives import KINDS, Collective, bytes_by_kind, collectives

RING = [(i, (i + 1) % 8) for i in range(8)]
STEP_BYTES = 64 * 128 * 4  # the f32[64,128] partial-sum all-reduce of one matmul step


def total_bytes(hlo_text: str) -> int:
    return sum(bytes_by_kind(hlo_text).values())


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    return Mesh(np.array(jax.devices()).reshape(8), ("x",))


def compiled_hlo(fn, *args, **jit_kwargs) -> str:
    return jax.jit(fn, **jit_kwargs).lower(*args).compile().as_text()


def only_kind(hlo: str, kind: str) -> dict[str, int]:
    return {k: 0 for k in KINDS} | {kind: total_bytes(hlo)}


def test_all_gather_of_a_sharded_array_is_the_full_array(mesh):
    x = jnp.ones((64, 128), jnp.float32)
    hlo = compiled_hlo(lambda x: x, x, in_shardings=NamedSharding(mesh, P("x")),
                       out_shardings=NamedSharding(mesh, P()))
    [gather] = collectives(hlo)
    assert (gather.kind, gather.bytes, gather.times, gather.shape) == ("all-gather", x.nbytes, 1, "f32[64,128]")
    assert bytes_by_kind(hlo) == only_kind(hlo, "all-gather") and total_bytes(hlo) == 32768


@pytest.mark.parametrize(("dtype", "hlo_type"), [(jnp.float16, "f16"), (jnp.int16, "s16"), (jnp.int8, "s8")])
def test_element_sizes_of_real_programs(mesh, dtype, hlo_type):
    hlo = compiled_hlo(lambda x: x, jnp.ones((64, 128), dtype), in_shardings=NamedSharding(mesh, P("x")),
                       out_shardings=NamedSharding(mesh, P()))
    [gather] = collectives(hlo)
    assert gather.shape == f"{hlo_type}[64,128]" and gather.bytes == 64 * 128 * jnp.dtype(dtype).itemsize


def test_bfloat16_counts_the_type_xla_communicates_in(mesh):
    hlo = compiled_hlo(lambda x: x, jnp.ones((64, 128), jnp.bfloat16), in_shardings=NamedSharding(mesh, P("x")),
                       out_shardings=NamedSharding(mesh, P()))
    [gather] = collectives(hlo)
    # XLA:CPU upcasts bf16 collectives to f32; a backend that keeps bf16 moves half the bytes.
    assert gather.bytes == 64 * 128 * {"bf16[64,128]": 2, "f32[64,128]": 4}[gather.shape]


def test_sum_over_the_sharded_axis_is_an_all_reduce_of_the_result(mesh):
    hlo = compiled_hlo(lambda x: jnp.sum(x, axis=0), jnp.ones((64, 128)),
                       in_shardings=NamedSharding(mesh, P("x")), out_shardings=NamedSharding(mesh, P()))
    assert collectives(hlo) == [Collective("all-reduce", 128 * 4, 1, "f32[128]", collectives(hlo)[0].computation)]


def test_matmul_with_the_contracted_dim_sharded_all_reduces_the_product(mesh):
    hlo = compiled_hlo(lambda x, y: x @ y, jnp.ones((64, 128)), jnp.ones((128, 32)),
                       in_shardings=(NamedSharding(mesh, P(None, "x")), NamedSharding(mesh, P("x"))),
                       out_shardings=NamedSharding(mesh, P()))
    assert bytes_by_kind(hlo) == only_kind(hlo, "all-reduce") and total_bytes(hlo) == 64 * 32 * 4


def test_every_kind_from_shard_map(mesh):
    def f(x):
        return (jax.lax.psum(x, "x"), jax.lax.all_gather(x, "x", tiled=True), jax.lax.psum_scatter(x, "x", tiled=True),
                jax.lax.all_to_all(x, "x", 0, 0, tiled=True), jax.lax.ppermute(x, "x", RING))

    mapped = jax.shard_map(f, mesh=mesh, in_specs=P("x"), out_specs=(P(), P(), P("x"), P("x"), P("x")),
                           check_vma=False)
    hlo = compiled_hlo(mapped, jnp.ones((64, 16)))  # 8 x 16 f32 = 512 bytes per device
    assert bytes_by_kind(hlo) == {"all-reduce": 512, "all-gather": 4096, "reduce-scatter": 64,
                                  "all-to-all": 512, "collective-permute": 512}
    [all_to_all] = [c for c in collectives(hlo) if c.kind == "all-to-all"]
    assert all_to_all.shape == "(" + ", ".join(8 * ["f32[1,16]"]) + ")"  # XLA's /*index=5*/ dropped


def matmul_step(mesh):
    def step(c, w):
        return jax.lax.with_sharding_constraint(jnp.tanh(c @ w), NamedSharding(mesh, P(None, "x")))
    return step


def compiled_steps(mesh, program) -> str:
    shardings = (NamedSharding(mesh, P(None, "x")), NamedSharding(mesh, P("x")))
    return compiled_hlo(program, jnp.ones((64, 128)), jnp.ones((128, 128)), in_shardings=shardings,
                        out_shardings=shardings[0])


def test_scan_counts_the_body_once_per_step(mesh):
    step = matmul_step(mesh)

    def scan(c, w, unroll=False):
        return jax.lax.scan(lambda c, _: (step(c, w), None), c, None, length=5, unroll=unroll)[0]

    def python_loop(c, w):
        for _ in range(5):
            c = step(c, w)
        return c

    once, looped = compiled_steps(mesh, step), compiled_steps(mesh, scan)
    assert '"known_trip_count":{"n":"5"}' in looped
    assert total_bytes(once) == STEP_BYTES
    assert [(c.kind, c.times) for c in collectives(looped)] == [("all-reduce", 5)]
    assert total_bytes(looped) == 5 * STEP_BYTES == total_bytes(compiled_steps(mesh, python_loop))
    assert total_bytes(compiled_steps(mesh, lambda c, w: scan(c, w, unroll=True))) == 5 * STEP_BYTES


def test_nested_scans_multiply(mesh):
    step = matmul_step(mesh)

    def nested(c, w):
        inner = lambda c, _: (step(c, w), None)  # noqa: E731
        outer = lambda c, _: (jax.lax.scan(inner, c, None, length=4)[0], None)  # noqa: E731
        return jax.lax.scan(outer, c, None, length=3)[0]

    hlo = compiled_steps(mesh, nested)
    assert [(c.kind, c.times) for c in collectives(hlo)] == [("all-reduce", 12)]
    assert total_bytes(hlo) == 12 * STEP_BYTES


def test_conditional_branches_count_as_if_taken(mesh):
    def f(pred, x):
        return jax.lax.cond(pred, lambda x: jax.lax.ppermute(x, "x", RING), lambda x: 2 * x, x)

    hlo = compiled_hlo(jax.shard_map(f, mesh=mesh, in_specs=(P(), P("x")), out_specs=P("x")), True, jnp.ones((64, 16)))
    assert [(c.kind, c.bytes, c.times) for c in collectives(hlo)] == [("collective-permute", 512, 1)]


def test_while_loop_without_trip_count_is_refused(mesh):
    def f(x):
        return jax.lax.while_loop(lambda x: jnp.sum(x) < 100.0, lambda x: 2 * jax.lax.ppermute(x, "x", RING), x)

    hlo = compiled_hlo(jax.shard_map(f, mesh=mesh, in_specs=P("x"), out_specs=P("x")), jnp.ones((64, 16)))
    assert "known_trip_count" not in hlo
    with pytest.raises(ValueError, match="while loop 'while.* has no known_trip_count"):
        collectives(hlo)


ASYNC_HLO = """\
HloModule async_pairs, is_scheduled=true

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

wrapped_all_to_all (p: f32[8,16]) -> f32[8,16] {
  p = f32[8,16]{1,0} parameter(0)
  ROOT a2a = f32[8,16]{1,0} all-to-all(p), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
}

ENTRY %main.7 (a: f32[1,16], b: f32[1024], c: bf16[8,16], d: f32[8,16]) -> (f32[8,16], f32[128]) {
  %a = f32[1,16]{1,0} parameter(0)
  %b = f32[1024]{0} parameter(1)
  %c = bf16[8,16]{1,0} parameter(2)
  d = f32[8,16]{1,0} parameter(3)
  %ags = (f32[1,16]{1,0}, f32[8,16]{1,0}) all-gather-start(%a), channel_id=1, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %agd = f32[8,16]{1,0} all-gather-done(%ags)
  %ars = f32[1024]{0} all-reduce-start(%b), channel_id=2, replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
  %ard = f32[1024]{0} all-reduce-done(%ars)
  %cps = (bf16[8,16]{1,0}, bf16[8,16]{1,0}, u32[], u32[]) collective-permute-start(%c), source_target_pairs={{0,1},{1,0}}
  %cpd = bf16[8,16]{1,0} collective-permute-done(%cps)
  %rss = ((f32[1024]{0}), f32[128]{0}) reduce-scatter-start(%b), replica_groups={}, dimensions={0}, to_apply=%add
  %rsu = ((f32[1024]{0}), f32[128]{0}) reduce-scatter-update(%rss)
  %rsd = f32[128]{0} reduce-scatter-done(%rsu)
  a2as = ((f32[8,16]{1,0}), f32[8,16]{1,0}, s32[]) async-start(d), calls=wrapped_all_to_all
  a2au = ((f32[8,16]{1,0}), f32[8,16]{1,0}, s32[]) async-update(a2as), calls=wrapped_all_to_all
  a2ad = f32[8,16]{1,0} async-done(a2au), calls=wrapped_all_to_all
  ROOT %out = (f32[8,16]{1,0}, f32[128]{0}) tuple(%agd, %rsd)
}
"""


@pytest.mark.parametrize("without_percent", [False, True])
def test_async_pairs_count_once_with_the_done_shape(without_percent):
    hlo = ASYNC_HLO.replace("%", "") if without_percent else ASYNC_HLO
    assert bytes_by_kind(hlo) == {"all-gather": 512, "all-reduce": 4096, "collective-permute": 256,
                                  "reduce-scatter": 512, "all-to-all": 512}
    assert [(c.kind, c.times, c.computation) for c in collectives(hlo)] == [
        ("all-to-all", 1, "wrapped_all_to_all"),  # inside async-start's calls=, not at the -done
        *[(kind, 1, "main.7") for kind in ("all-gather", "all-reduce", "collective-permute", "reduce-scatter")]]


TUPLE_HLO = """\
HloModule tuples

ENTRY %main (a: f32[8], b: bf16[2,3], c: s8[4], d: pred[]) -> f32[] {
  %a = f32[8]{0} parameter(0)
  %b = bf16[2,3]{1,0} parameter(1)
  %c = s8[4]{0} parameter(2)
  %d = pred[] parameter(3)
  %combined = (f32[8]{0:T(256)}, bf16[2,3]{1,0:T(8,128)(2,1)S(1)}, s8[4]{0}, pred[]) all-reduce(%a, %b, %c, %d), \
replica_groups={}, to_apply=%add
  %narrow = (f8e4m3fn[16]{0}, s4[16]{0}, c64[2]{0}, c128[2]{0}, f64[2]{0}, /*index=5*/u16[3]{0}) all-gather(%a), \
dimensions={0}
  ROOT %scalar = f32[] all-reduce(%a), replica_groups={}, to_apply=%add
}
"""


def test_tuple_outputs_add_their_elements():
    combined, narrow, scalar = collectives(TUPLE_HLO)
    assert combined.shape == "(f32[8], bf16[2,3], s8[4], pred[])" and combined.bytes == 32 + 12 + 4 + 1
    assert narrow.bytes == 16 + 16 + 16 + 32 + 16 + 6  # f8 and s4 count as one byte
    assert (scalar.shape, scalar.bytes) == ("f32[]", 4)


LOOPS_HLO = """\
HloModule loops

%inner_body (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %ar = f32[4]{0} all-reduce(%p), replica_groups={}, to_apply=%add
}

%no_comms (p: f32[4]) -> pred[] {
  %p = f32[4]{0} parameter(0)
  ROOT %t = pred[] constant(true)
}

%outer_body (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %inner = f32[4]{0} while(%p), condition=%no_comms, body=%inner_body, backend_config={"known_trip_count":{"n":"4"}}
}

%outer_cond (p: f32[4]) -> pred[] {
  %p = f32[4]{0} parameter(0)
  %ag = f32[32]{0} all-gather(%p), dimensions={0}
  ROOT %t = pred[] constant(true)
}

%shared (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %cp = f32[4]{0} collective-permute(%p), source_target_pairs={{0,1},{1,0}}
}

%idle_body (p: f32[4]) -> f32[4] {
  ROOT %p = f32[4]{0} parameter(0)
}

ENTRY %main (p: f32[4], flag: pred[]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  %flag = pred[] parameter(1)
  %outer = f32[4]{0} while(%p), condition=%outer_cond, body=%outer_body, backend_config={"known_trip_count":{"n":"3"}}
  %idle = f32[4]{0} while(%outer), condition=%no_comms, body=%idle_body
  %once = f32[4]{0} call(%idle), to_apply=%shared
  %twice = f32[4]{0} call(%once), to_apply=%shared
  ROOT %branch = f32[4]{0} conditional(%flag, %twice, %twice), true_computation=%shared, false_computation=%idle_body
}
"""


def test_loop_trip_counts_multiply_and_call_sites_add_up():
    times = {c.computation: c.times for c in collectives(LOOPS_HLO)}
    # inner 3 x 4; the outer condition runs once more than its body; shared: two calls + a branch
    assert times == {"inner_body": 12, "outer_cond": 4, "shared": 3}
    assert total_bytes(LOOPS_HLO) == 12 * 16 + 4 * 128 + 3 * 16


def test_loop_without_trip_count_around_a_collective_is_refused():
    hlo = LOOPS_HLO.replace(', backend_config={"known_trip_count":{"n":"4"}}', "")
    with pytest.raises(ValueError, match="'inner' in 'outer_body'"):
        collectives(hlo)


FIXTURES = Path(__file__).parent / "data" / "hlo"
# Real train steps compiled deviceless (gpt350m.yaml with model.remat=full, train.batch_size=8,
# n_layers=2, d_model=256, 4 heads, 2 kv heads, d_ff=512, vocab 1024, seq_len 128; mesh fsdp=8)
# for TPU v5p (libtpu 0.0.42) and H100 (jax-cuda12-plugin 0.10.2), metadata, backend_config
# (except on while loops) and TPU tiling annotations stripped to keep them small.


def fixture(name: str) -> str:
    return gzip.decompress((FIXTURES / f"step_{name}.hlo.gz").read_bytes()).decode()


def test_tpu_loops_without_known_trip_count_are_counted_from_their_condition():
    hlo = fixture("tpu")
    assert "known_trip_count" not in hlo
    layer_loop = [c for c in collectives(hlo) if c.times > 1]
    assert layer_loop and {c.times for c in layer_loop} == {2}  # n_layers, read off the compare
    assert {c.kind for c in layer_loop} == {"all-gather", "all-reduce"}
    # the weight gradients are summed in train.grad_reduce_dtype's float32, the gathers in bf16
    assert all(c.shape.startswith("(f32[") or c.shape.startswith("f32[") for c in layer_loop if c.kind == "all-reduce")
    assert all("bf16" in c.shape for c in layer_loop if c.kind == "all-gather" and c.bytes > 4096)


def test_gpu_async_pairs_count_once_and_gradients_reduce_scatter_in_float32():
    hlo = fixture("gpu")
    assert "all-gather-start" in hlo and "reduce-scatter-start" in hlo
    kinds = bytes_by_kind(hlo)
    assert kinds["reduce-scatter"] > 0 and kinds["all-gather"] > 0
    scattered = [c for c in collectives(hlo) if c.kind == "reduce-scatter"]
    assert all(dtype == "f32" for c in scattered for dtype in re.findall(r"([a-z0-9]+)\[", c.shape))
    assert any(c.times == 2 for c in scattered)  # one per layer, inside the scanned backward loop


def test_a_counted_loop_in_any_direction_without_known_trip_count():
    hlo = LOOPS_HLO.replace(', backend_config={"known_trip_count":{"n":"4"}}', "")
    counted = hlo.replace("%no_comms (p: f32[4]) -> pred[] {\n  %p = f32[4]{0} parameter(0)\n  ROOT %t = pred[] constant(true)",
                          "%no_comms (p: (s32[], f32[4])) -> pred[] {\n  %p = (s32[], f32[4]) parameter(0)\n"
                          "  %i = s32[] get-tuple-element(%p), index=0\n  %n = s32[] constant(7)\n"
                          "  ROOT %t = pred[] compare(%n, %i), direction=GT")
    counted = counted.replace("%inner_body (p: f32[4]) -> f32[4] {\n  %p = f32[4]{0} parameter(0)\n"
                              "  ROOT %ar = f32[4]{0} all-reduce(%p), replica_groups={}, to_apply=%add",
                              "%inner_body (p: (s32[], f32[4])) -> (s32[], f32[4]) {\n  %p = (s32[], f32[4]) parameter(0)\n"
                              "  %i = s32[] get-tuple-element(%p), index=0\n  %two = s32[] constant(2)\n"
                              "  %next = s32[] add(%two, %i)\n  %x = f32[4]{0} get-tuple-element(%p), index=1\n"
                              "  %ar = f32[4]{0} all-reduce(%x), replica_groups={}, to_apply=%add\n"
                              "  ROOT %out = (s32[], f32[4]) tuple(%next, %ar)")
    counted = counted.replace("  ROOT %inner = f32[4]{0} while(%p), condition=%no_comms, body=%inner_body",
                              "  %one = s32[] constant(1)\n  %start = s32[] copy(%one)\n"
                              "  %init = (s32[], f32[4]) tuple(%start, %p)\n"
                              "  ROOT %inner = (s32[], f32[4]) while(%init), condition=%no_comms, body=%inner_body")
    times = {c.computation: c.times for c in collectives(counted)}
    assert times["inner_body"] == 3 * 3  # i = 1, 3, 5 < 7, in each of the outer loop's 3 trips


RAGGED_HLO = """\
HloModule ragged

ENTRY %main (rows: bf16[6,16], out: bf16[12,16], offsets: s32[4], sizes: s32[4]) -> bf16[12,16] {
  %rows = bf16[6,16]{1,0} parameter(0)
  %out = bf16[12,16]{1,0} parameter(1)
  %offsets = s32[4]{0} parameter(2)
  %sizes = s32[4]{0} parameter(3)
  ROOT %r = bf16[12,16]{1,0} ragged-all-to-all(%rows, %out, %offsets, %sizes, %offsets, %sizes), \
replica_groups={{0,1,2,3}}
}
"""


def test_a_ragged_all_to_all_counts_as_an_all_to_all_of_its_output_buffer():
    """XLA:CPU cannot compile one (jax 0.10.2), GPU and TPU compilers emit it: its output is
    the receiving buffer (12 rows of 16 bf16), whatever the offsets and sizes say."""
    assert bytes_by_kind(RAGGED_HLO) == only_kind(RAGGED_HLO, "all-to-all") and total_bytes(RAGGED_HLO) == 12 * 16 * 2
