"""benchmarks/roofline.py on a hand-written optimized-HLO module: loop trips, declared and undeclared Pallas
kernel costs, collectives over ICI, and the speed/MFU arithmetic (expected values written out by hand)."""

from __future__ import annotations

import pytest

from benchmarks.roofline import ROOFLINE_VERSION, costed_as_current, predict, speed

F32 = 128 * 128 * 4  # bytes of an f32[128,128]
HLO = """HloModule m, entry_computation_layout={(f32[128,128]{1,0})->f32[128,128]{1,0}}

%body (p: (s32[], f32[128,128])) -> (s32[], f32[128,128]) {
  %p = (s32[], f32[128,128]{1,0}) parameter(0)
  %x = f32[128,128]{1,0} get-tuple-element(%p), index=1
  %d = f32[128,128]{1,0} dot(%x, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[128,128]{1,0}) tuple(%i, %d)
}

%cond (q: (s32[], f32[128,128])) -> pred[] {
  %q = (s32[], f32[128,128]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%j, %n), direction=LT
}

ENTRY %main (a: f32[128,128]) -> f32[128,128] {
  %a = f32[128,128]{1,0} parameter(0)
  %g = f32[256,128]{1,0} all-gather(%a), dimensions={0}
  %k = f32[128,128]{1,0} custom-call(%a), custom_call_target="tpu_custom_call", backend_config={"custom_call_config":{"body":"x","cost_estimate":{"flops":"1000000","transcendentals":"0","bytes_accessed":"99999999"}}}
  %s = f32[128,128]{1,0} custom-call(%a), custom_call_target="tpu_custom_call", backend_config={"custom_call_config":{"body":"y"}}
  %c = s32[] constant(0)
  %tu = (s32[], f32[128,128]{1,0}) tuple(%c, %a)
  %w = (s32[], f32[128,128]{1,0}) while(%tu), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  ROOT %r = f32[128,128]{1,0} get-tuple-element(%w), index=1
}
"""
CHIP = dict(peak_flops=1e12, hbm_bandwidth=1e9, ici_bandwidth=1e8)


def test_every_loop_trip_kernel_and_collective_is_costed():
    r = predict(HLO, **CHIP, attention_flops=1e9)
    dot = max(2 * 128**3 / 1e12, 3 * F32 / 1e9)  # two operands + result, memory-bound at these rates
    declared = max(1e6 / 1e12, 99999999 / 1e9)  # the kernel's own estimate (its bytes exceed its operands)
    undeclared = max(2 * F32 / 1e9, 1e9 / 1e12)  # operand + result vs the attention FLOPs
    gather = 256 * 128 * 4 / 1e8
    assert r["ops_s"] == pytest.approx(5 * dot + declared)
    assert r["uncosted_kernels_s"] == pytest.approx(undeclared)
    assert r["ici_s"] == pytest.approx(gather)
    assert r["step_s"] == pytest.approx(5 * dot + declared + undeclared + gather)
    assert r["flops"] == pytest.approx(5 * 2 * 128**3 + 1e6 + 1e9)
    assert (r["declared_kernels"], r["uncosted_kernels"]) == (1, 1)


def test_speed_and_mfu():
    s = speed({"step_s": 2.0}, model_flops_per_token=6e9, tokens_per_chip=4096, peak_flops=1e14)
    assert s["tokens_per_s_per_chip"] == pytest.approx(2048)
    assert s["mfu"] == pytest.approx(6e9 * 4096 / (1e14 * 2.0))


ON_CHIP_HLO = """HloModule m, entry_computation_layout={(f32[128,128]{1,0})->f32[128,128]{1,0}}

ENTRY %main (a: f32[128,128]) -> f32[128,128] {
  %a = f32[128,128]{1,0} parameter(0)
  %cs = (f32[128,128]{1,0:S(1)}, f32[128,128]{1,0}, u32[]{:S(2)}) copy-start(%a)
  %v = f32[128,128]{1,0:S(1)} copy-done(%cs)
  %e = f32[128,128]{1,0:S(1)} exponential(%v)
  %ev = (f32[128,128]{1,0}, f32[128,128]{1,0:S(1)}, u32[]{:S(2)}) copy-start(%e)
  %h = f32[128,128]{1,0} copy-done(%ev)
  %x = f32[128,128]{1,0} copy-start(%h)
  ROOT %n = f32[128,128]{1,0} negate(%h)
}
"""


def test_on_chip_arrays_are_not_hbm_traffic():
    """A prefetch into VMEM (``S(1)``) reads HBM once, an eviction writes it once, an HBM-to-HBM copy reads and
    writes, a reader of the on-chip copy costs no HBM bytes; the HBM negate reads and writes."""
    r = predict(ON_CHIP_HLO, **CHIP, attention_flops=0.0)
    expected = F32 + 0 + F32 + 2 * F32 + 2 * F32  # prefetch, exp on chip, eviction, HBM copy, negate
    assert r["hbm_bytes"] == pytest.approx(expected)
    assert r["ops_s"] == pytest.approx(expected / 1e9)


NESTED_SLICE_HLO = """HloModule m, entry_computation_layout={(f32[4,128,128]{2,1,0}, s32[])->f32[128,128]{1,0}}

%inner (x: f32[4,128,128], i: s32[]) -> f32[128,128] {
  %x = f32[4,128,128]{2,1,0} parameter(0)
  %i = s32[] parameter(1)
  %z = s32[] constant(0)
  %ds = f32[1,128,128]{2,1,0} dynamic-slice(%x, %i, %z, %z), dynamic_slice_sizes={1,128,128}
  ROOT %b = f32[128,128]{1,0} bitcast(%ds)
}

%outer (p0: f32[4,128,128], p1: s32[]) -> f32[128,128] {
  %p0 = f32[4,128,128]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %f = f32[128,128]{1,0} fusion(%p0, %p1), kind=kLoop, calls=%inner
  ROOT %e = f32[128,128]{1,0} exponential(%f)
}

ENTRY %main (s: f32[4,128,128], j: s32[]) -> f32[128,128] {
  %s = f32[4,128,128]{2,1,0} parameter(0)
  %j = s32[] parameter(1)
  ROOT %o = f32[128,128]{1,0} fusion(%s, %j), kind=kLoop, calls=%outer
}
"""


def test_a_stacked_operand_sliced_in_a_nested_fusion_costs_its_slice():
    """One layer's ``[128,128]`` slice of a stacked ``[4,128,128]`` array, dynamic-sliced inside a nested
    fusion: the read is the slice (plus the 4-byte index and the result), not the whole stack."""
    r = predict(NESTED_SLICE_HLO, **CHIP, attention_flops=0.0)
    assert r["hbm_bytes"] == pytest.approx(F32 + 4 + F32)


WINDOWED_HLO = """HloModule m, entry_computation_layout={(f32[128,128]{1,0})->f32[128,128]{1,0}}

%wbody (p: (f32[128,128], u32[])) -> (f32[128,128], u32[]) {
  %p = (f32[128,128]{1,0}, u32[]) parameter(0)
  %x = f32[128,128]{1,0} get-tuple-element(%p), index=0
  %d = f32[128,128]{1,0} dot(%x, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %i = u32[] get-tuple-element(%p), index=1
  %two = u32[] constant(2)
  %next = u32[] add(%i, %two)
  ROOT %t = (f32[128,128]{1,0}, u32[]) tuple(%d, %next)
}

%wcond (q: (f32[128,128], u32[])) -> pred[] {
  %q = (f32[128,128]{1,0}, u32[]) parameter(0)
  %n = u32[] constant(7)
  %j = u32[] get-tuple-element(%q), index=1
  ROOT %lt = pred[] compare(%j, %n), direction=LT
}

ENTRY %main (a: f32[128,128]) -> f32[128,128] {
  %a = f32[128,128]{1,0} parameter(0)
  %one = u32[] constant(1)
  %c = u32[] copy(%one)
  %tu = (f32[128,128]{1,0}, u32[]) tuple(%a, %c)
  %w = (f32[128,128]{1,0}, u32[]) while(%tu), condition=%wcond, body=%wbody
  ROOT %r = f32[128,128]{1,0} get-tuple-element(%w), index=0
}
"""


def test_a_loop_without_a_known_trip_count_is_counted_from_its_counter():
    """The SPMD partitioner's windowed collective-matmul loops carry no known_trip_count: a ``u32`` counter
    from a (copied) constant, stepped by 2 in the body, compared with a bound. From 1 by 2 while < 7: 1, 3, 5,
    three trips (roofline version 2 counted the body once)."""
    r = predict(WINDOWED_HLO, **CHIP, attention_flops=0.0)
    assert r["flops"] == pytest.approx(3 * 2 * 128**3)
    # the body's add (two u32 operands + result) per trip, the entry's copy (operand + result)
    counter = 3 * (4 + 4 + 4) + (4 + 4)
    assert r["ops_s"] == pytest.approx(3 * max(2 * 128**3 / 1e12, 3 * F32 / 1e9) + counter / 1e9)


def test_version_2_predictions_count_as_current_only_on_up_to_4_chips():
    assert costed_as_current({"roofline": ROOFLINE_VERSION}, 64)
    assert costed_as_current({"roofline": 2}, 4)
    assert not costed_as_current({"roofline": 2}, 8)
    assert not costed_as_current({"roofline": 1}, 1)
    assert not costed_as_current({}, 1)
