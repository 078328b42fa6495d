"""The communication of one execution of a compiled XLA program, read from its HLO text.

The input is what `jax.jit(f).lower(...).compile().as_text()` returns: the per-device
program after SPMD partitioning. Every collective instruction is counted with

    bytes  the size of its OUTPUT shape on one device (tuple outputs: the sum of the
           elements), with the element sizes in `_ELEMENT_BYTES`; sub-byte types (s4, u4,
           s2, u2, f4*) count as 1 byte, as XLA stores them unpacked by default;
    times  how often its computation runs per execution of the ENTRY computation.

`times` follows the call graph from ENTRY (1): a `while` with multiplicity m gives its
body m * n and its condition m * (n + 1) (the condition is evaluated once more to exit),
n being the `"known_trip_count":{"n":"..."}` XLA writes into the loop's backend_config
(XLA:CPU and GPU do). TPU loops carry none (the layer scan, and the ring loops into which
the TPU compiler decomposes a collective matmul, `windowed_dot_general_*`): there n is read
off the loop itself (`_derived_trip_count`), when it is a counted loop: the condition's ROOT
compares one tuple element i of its parameter with a constant (LT, LE, GT, GE, NE, either
side), element i starts as a constant (the while's operand is a tuple whose i-th operand
is one, through copies and bitcasts) and the body's ROOT tuple sets it to itself plus a
constant. A loop neither way counted raises ValueError if anything under it communicates
(a count would be a guess); otherwise it is harmless and its computations count zero times. Every other
reference (`calls=`, `to_apply=`, `branch_computations=`, `true_/false_computation=`,
`called_computations=`) passes m on, so each conditional branch counts as if it ran: an
upper bound. A computation reached from several places adds up their multiplicities.

A `ragged-all-to-all` counts as an all-to-all of its output: the buffer its operand rows are
written into, sized for the most rows it could receive, so an upper bound on what it moves
(the rows actually sent are data-dependent; the bound is what the HLO states).

Asynchronous collectives are counted once, at the op that completes them: `all-gather-done`,
`all-reduce-done`, `collective-permute-done` and the sugared `reduce-scatter-done`,
`all-to-all-done`. The output of a `-done` op is exactly the collective's result, whereas a
`-start` op's tuple also holds the operands and synchronisation flags. An unsugared
`async-start(...), calls=%wrapped` is counted through the plain collective inside
`%wrapped`; the `calls=` that `async-update`/`async-done` repeat is not followed, so that
collective is not counted twice.

XLA:CPU (jax 0.10) upcasts bf16 collectives to f32 and partitions a matmul with a sharded
output into all-reduce + dynamic-slice; the figures here are what the HLO really moves.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
# Opcodes counted as one of KINDS: a ragged all-to-all (`jax.lax.ragged_all_to_all`) is an
# all-to-all whose output is a preallocated buffer of the largest possible receipt.
_COUNTED_AS = {"ragged-all-to-all": "all-to-all"}

_ELEMENT_BYTES = {
    "pred": 1, "s2": 1, "u2": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8,
    "c128": 16, "token": 0,
}

_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*[({]")
_INSTRUCTION = re.compile(r"^(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"([\w\-]+)\(")
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([^\]]*)\]")
_LAYOUT = re.compile(r"\{[^{}]*\}")
_COMMENT = re.compile(r"/\*.*?\*/")
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
_SINGLE_REF = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_LIST_REF = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str  # one of KINDS
    bytes: int  # output bytes of one execution of the op, per device
    times: int  # executions per program execution (loop trip counts multiplied)
    shape: str  # output shape without layouts, e.g. "f32[4,128]" or "(f32[8], bf16[2,3])"
    computation: str  # the HLO computation it sits in


@dataclasses.dataclass(frozen=True)
class _Instruction:
    name: str
    shape: str
    opcode: str
    attributes: str  # everything after the opcode: operands and attributes
    root: bool = False  # the computation's ROOT


@dataclasses.dataclass(frozen=True)
class _Call:
    callee: str
    factor: int | None  # None: a while loop without a known trip count
    site: str  # the calling instruction, for error messages


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective that runs, with its per-device output bytes and run count."""
    computations, entry = _parse(hlo_text)
    times = _multiplicities(computations, entry)
    return [Collective(kind, _shape_bytes(instruction.shape), times[name], instruction.shape, name)
            for name, instructions in computations.items() if times[name]
            for instruction in instructions if (kind := _collective_kind(instruction.opcode))]


def bytes_by_kind(hlo_text: str) -> dict[str, int]:
    """Bytes per device per program execution for each kind in KINDS (0 where none)."""
    totals = dict.fromkeys(KINDS, 0)
    for collective in collectives(hlo_text):
        totals[collective.kind] += collective.bytes * collective.times
    return totals


def _collective_kind(opcode: str) -> str | None:
    """The kind an opcode counts as: plain collectives and `-done` ops, never `-start`."""
    kind = opcode.removesuffix("-done")
    kind = _COUNTED_AS.get(kind, kind)
    return kind if kind in KINDS else None


def _parse(hlo_text: str) -> tuple[dict[str, list[_Instruction]], str]:
    """The instructions of each computation, and the name of the ENTRY computation."""
    computations: dict[str, list[_Instruction]] = {}
    entry = current = None
    for raw_line in hlo_text.splitlines():
        line = _COMMENT.sub("", raw_line).strip()
        header = _HEADER.match(line) if line.endswith("{") else None
        if header:
            current = header.group(2)
            computations[current] = []
            entry = current if header.group(1) else entry
        elif line == "}":  # a computation's end; a line like "}}, metadata=..." ends a
            current = None  # string attribute that spans lines (a Mosaic kernel's config)
        elif current is not None and (instruction := _parse_instruction(line)):
            computations[current].append(instruction)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return computations, entry


def _parse_instruction(line: str) -> _Instruction | None:
    match = _INSTRUCTION.match(line)
    if not match:
        return None
    shape, rest = _split_shape(match.group(3))
    opcode = _OPCODE.match(rest)
    if not opcode:
        return None
    return _Instruction(match.group(2), _LAYOUT.sub("", shape), opcode.group(1), rest[opcode.end():],
                        bool(match.group(1)))


def _split_shape(text: str) -> tuple[str, str]:
    """(shape, the rest) of `SHAPE opcode(...)`; tuple shapes hold spaces and nested parens."""
    if not text.startswith("("):
        shape, _, rest = text.partition(" ")
        return shape, rest.lstrip()
    depth = 0
    for position, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            return text[: position + 1], text[position + 1:].lstrip()
    raise ValueError(f"unbalanced tuple shape in {text!r}")


def _shape_bytes(shape: str) -> int:
    return sum(_element_bytes(dtype) * math.prod(int(d.removeprefix("<=")) for d in dims.split(",") if d)
               for dtype, dims in _ARRAY.findall(shape))


def _element_bytes(dtype: str) -> int:
    if dtype in _ELEMENT_BYTES:
        return _ELEMENT_BYTES[dtype]
    if dtype.startswith(("f8", "f4")):
        return 1
    raise ValueError(f"unknown HLO element type {dtype!r}")


def _calls(instruction: _Instruction, computations: dict[str, list[_Instruction]], caller: str) -> list[_Call]:
    """The computations an instruction runs, each with how many times per execution."""
    if instruction.opcode in ("async-update", "async-done"):
        return []  # they repeat the async-start's calls=
    attributes = _QUOTED.sub('""', instruction.attributes)
    if instruction.opcode == "while":
        references = dict(_SINGLE_REF.findall(attributes))
        trip_count = _TRIP_COUNT.search(instruction.attributes.replace("\\", ""))
        n = int(trip_count.group(1)) if trip_count else _derived_trip_count(
            instruction, computations, caller, references["condition"], references["body"])
        return [_Call(references["body"], n, instruction.name),
                _Call(references["condition"], None if n is None else n + 1, instruction.name)]
    names = [name for _, name in _SINGLE_REF.findall(attributes)]
    for group in _LIST_REF.findall(attributes):
        names += [name.strip().lstrip("%") for name in group.split(",") if name.strip()]
    return [_Call(name, 1, instruction.name) for name in names]


_COMPARISONS = {"LT": lambda i, n: i < n, "LE": lambda i, n: i <= n, "GT": lambda i, n: i > n,
                "GE": lambda i, n: i >= n, "NE": lambda i, n: i != n}
_MIRRORED = {"LT": "GT", "LE": "GE", "GT": "LT", "GE": "LE", "NE": "NE"}
_PASS_THROUGH = ("copy", "bitcast", "convert", "reshape")


def _derived_trip_count(loop: _Instruction, computations: dict[str, list[_Instruction]], caller: str,
                        condition: str, body: str) -> int | None:
    """n of a counted loop without known_trip_count (module docstring), or None."""
    by_name = {name: {i.name: i for i in computations.get(name, ())} for name in (caller, condition, body)}
    compare = next((i for i in computations.get(condition, ()) if i.root), None)
    direction = re.search(r"direction=(\w+)", compare.attributes) if compare and compare.opcode == "compare" else None
    if direction is None or direction.group(1) not in _COMPARISONS:
        return None
    left, right = (_through(by_name[condition], name) for name in _operands(compare)[:2])
    if _constant(left) is not None:
        left, right, op = right, left, _MIRRORED[direction.group(1)]
    else:
        op = direction.group(1)
    index, bound = _tuple_index(left), _constant(right)
    init_tuple = by_name[caller].get(_operands(loop)[0])
    update = next((i for i in computations.get(body, ()) if i.root), None)
    if None in (index, bound, init_tuple, update) or "tuple" not in (init_tuple.opcode, update.opcode):
        return None
    start = _constant(_through(by_name[caller], _operands(init_tuple)[index]))
    step = _increment(by_name[body], _operands(update)[index], index)
    if start is None or not step:
        return None
    value, n = start, 0
    while _COMPARISONS[op](value, bound) and n <= 1_000_000:  # a counted loop, by simulation: no sign cases
        value, n = value + step, n + 1
    return n if n <= 1_000_000 else None


def _operands(instruction: _Instruction) -> list[str]:
    """The operand names (without % and types) of an instruction."""
    depth, end = 1, 0
    for end, char in enumerate(instruction.attributes):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            break
    return [piece.split()[-1].lstrip("%") for piece in instruction.attributes[:end].split(",") if piece.strip()]


def _through(scope: dict[str, _Instruction], name: str) -> _Instruction | None:
    """The instruction `name` stands for, through copies, bitcasts and converts."""
    instruction = scope.get(name)
    while instruction is not None and instruction.opcode in _PASS_THROUGH:
        instruction = scope.get(_operands(instruction)[0])
    return instruction


def _constant(instruction: _Instruction | None) -> int | None:
    if instruction is None or instruction.opcode != "constant":
        return None
    literal = instruction.attributes.split(")")[0].strip()
    return int(literal) if re.fullmatch(r"-?\d+", literal) else None


def _tuple_index(instruction: _Instruction | None) -> int | None:
    """i, where `instruction` is get-tuple-element(parameter, index=i)."""
    if instruction is None or instruction.opcode != "get-tuple-element":
        return None
    index = re.search(r"index=(\d+)", instruction.attributes)
    return int(index.group(1)) if index else None


def _increment(scope: dict[str, _Instruction], name: str, index: int) -> int | None:
    """k, where `name` is add(element `index` of the body's parameter, constant k)."""
    add = _through(scope, name)
    if add is None or add.opcode != "add":
        return None
    a, b = (_through(scope, operand) for operand in _operands(add)[:2])
    if _tuple_index(a) == index and _constant(b) is not None:
        return _constant(b)
    if _tuple_index(b) == index and _constant(a) is not None:
        return _constant(a)
    return None


def _multiplicities(computations: dict[str, list[_Instruction]], entry: str) -> dict[str, int]:
    """How many times each computation runs per execution of `entry`."""
    calls = {name: [call for instruction in instructions for call in _calls(instruction, computations, name)]
             for name, instructions in computations.items()}
    callers: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for caller, outgoing in calls.items():
        for call in outgoing:
            if call.factor is None and _communicates(call.callee, computations, calls):
                raise ValueError(f"while loop {call.site!r} in {caller!r} runs collectives "
                                 "but has no known_trip_count")
            callers[call.callee].append((caller, call.factor or 0))
    memo = {entry: 1}

    def times(name: str) -> int:
        if name not in memo:
            memo[name] = sum(times(caller) * factor for caller, factor in callers[name])
        return memo[name]

    return {name: times(name) for name in computations}


def _communicates(root: str, computations: dict[str, list[_Instruction]], calls: dict[str, list[_Call]]) -> bool:
    """Whether computation `root`, or anything it calls, holds a collective."""
    stack, seen = [root], set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if any(_collective_kind(instruction.opcode) for instruction in computations.get(name, ())):
            return True
        stack += [call.callee for call in calls.get(name, ())]
    return False
