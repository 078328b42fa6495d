"""Peak FLOP/s by device kind (jaxtrain/tools/accelerators.py): whole-word matches, so one card's
figure never lands on another; MFU and the roofline read the same row."""

from types import SimpleNamespace

import jax
import pytest

from jaxtrain.config.errors import UserError
from jaxtrain.tools import accelerators, targets


@pytest.mark.parametrize("device_kind, key", [
    ("NVIDIA H100 80GB HBM3", "H100"),
    ("NVIDIA H100 PCIe", "H100 PCIe"),  # not the SXM card's row: the most specific key wins
    ("NVIDIA H200", "H200"),
    ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA A100 80GB PCIe", "A100"),
    ("NVIDIA L4", "L4"),
    ("NVIDIA L40S", None),  # 'L4' is a prefix of the word, not the word
    ("NVIDIA GH200 480GB", None),  # nor is 'H200' of 'GH200'
    ("TPU v4", "TPU v4"),
    ("TPU v4 lite", None),  # v4i, a different chip
    ("TPU v5", "TPU v5"),  # v5p
    ("TPU v5 lite", "TPU v5 lite"),  # v5e, not v5p
    ("TPU v6 lite", "TPU v6 lite"),
    ("TPU7x", None),
    ("cpu", None),
])
def test_device_kinds_match_table_entries_by_whole_words(device_kind, key):
    assert accelerators.table_entry(device_kind) == key


def test_peak_flops_reads_the_table_for_a_known_kind_and_measures_an_unknown_one():
    l4 = SimpleNamespace(device_kind="NVIDIA L4")  # a device is only asked its kind here
    assert accelerators.peak_flops(l4, "bfloat16") == (121e12, "table: L4 bfloat16")
    assert accelerators.peak_flops(SimpleNamespace(device_kind="TPU v5 lite"), "float32")[0] == 197e12
    # an L40S is not an L4: its peak is measured on this machine, not read from L4's row
    peak, source = accelerators.peak_flops(SimpleNamespace(device_kind="NVIDIA L40S"), "float32")
    assert source == "measured: 2048^3 float32 matmul on NVIDIA L40S"
    assert 0 < peak < 121e12 or jax.default_backend() != "cpu"


def test_the_targets_are_rows_of_the_table_mfu_reads():
    h100 = SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3")
    assert targets.target("h100").hardware is accelerators.ACCELERATORS[accelerators.table_entry(h100.device_kind)]
    assert accelerators.peak_flops(h100, "bfloat16")[0] == targets.target("h100x8").hardware.bf16_flops
    assert targets.target("tpu-v5p-8").hardware is accelerators.ACCELERATORS[accelerators.table_entry("TPU v5")]
    for t in targets.TARGETS.values():  # a target carries what the roofline and the fit read
        row = t.hardware
        assert row.link_bytes_per_s and row.devices_per_node and row.internode_bytes_per_s and row.note
        assert row.hbm_bytes and row.hbm_note
    assert [t.devices for t in map(targets.target, ("h100x8x4", "tpu-v5p-8", "tpu-v5p-32", "tpu-v6e-8"))] == [32, 4, 16, 8]
    with pytest.raises(UserError, match="--target abacus: not one of h100, h100x8, "):
        targets.target("abacus")
