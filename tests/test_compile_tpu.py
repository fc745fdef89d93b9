"""``wuneng compile``: ahead-of-time compilation for TPU slices with the real TPU compiler (``libtpu``, the
``tpu-aot`` extra) on this CPU machine. The default JAX backend stays the CPU (tests/conftest.py).

Each compile happens once (one test per compile, module-scoped fixtures where two tests share one). The
checks compare the compiled program against independent expectations: the analytic model-FLOPs formula,
donation (aliased outputs), collectives implied by the mesh, one Mosaic kernel call per layer and
direction, and the compiler's own out-of-memory verdict.
"""

from __future__ import annotations

import math
import re

import jax
import pytest
import yaml
from train_support import TINY_MODEL

from train import cli
from train.aot import kernels
from train.aot.compile import (
    build_train,
    compile_inference,
    compile_train,
    read_executable_meta,
    run_compile,
    save_executable,
    split_overrides,
)
from train.aot.memory import largest_temporaries, parse_out_of_memory
from train.aot.topology import TopologyError, parse_topology, topology_devices
from train.mesh import MeshError

QWEN2_TINY = {**TINY_MODEL, "vocab_size": 128}


def _config(model: dict, **top):
    return kernels.tiny_train_config(model=dict(model), dtype="float32", **top)


def _write_yaml(path, model: dict) -> str:
    raw = {
        "run_dir": str(path / "run"),
        "model": dict(model),
        "data": {"store": str(path / "store")},
        "steps": 10,
        "global_batch_size": 4,
        "seq_len": 32,
        "dtype": "float32",
        "mesh": {"data": 1, "fsdp": 2, "tensor": 2},
    }
    out = path / "run.yaml"
    out.write_text(yaml.safe_dump(raw))
    return str(out)


# ------------------------------------------------------------------------------------------------ topologies


def test_topology_names_and_errors():
    t = parse_topology("v5p:4x4x4")
    assert (t.num_chips, t.slice_name, t.chip.hbm_bytes) == (64, "v5p-128", 96 * 2**30)
    assert parse_topology("v5litepod:16x16").name == "v5e:16x16"
    assert parse_topology("v6e:2x4").num_chips == 8
    for bad, match in (("v5e", "form"), ("v9:2x2", "unknown TPU generation"), ("v5e:2x2x2", "2 dimensions")):
        with pytest.raises(TopologyError, match=match):
            parse_topology(bad)
    assert split_overrides(["steps=3", "topology=v5e:2x2", "mesh.fsdp=4"]) == (
        "v5e:2x2",
        ["steps=3", "mesh.fsdp=4"],
    )


def test_slices_are_tpu_devices_while_the_backend_stays_cpu():
    kinds = {
        name: {d.device_kind for d in topology_devices(name)} for name in ("v5e:2x2", "v5p:2x2x1", "v6e:2x2")
    }
    assert kinds == {"v5e:2x2": {"TPU v5 lite"}, "v5p:2x2x1": {"TPU v5"}, "v6e:2x2": {"TPU v6 lite"}}
    assert len(topology_devices("v5e:4x4")) == 16
    # one chip: libtpu's default 2x2x1-chip host does not divide it (it refused v6e:1x1 before)
    assert [d.device_kind for d in topology_devices("v6e:1x1")] == ["TPU v6 lite"]
    assert [d.device_kind for d in topology_devices("v5e:1x1")] == ["TPU v5 lite"]
    assert jax.default_backend() == "cpu"


# ------------------------------------------------------------------------------------------------ train steps


@pytest.fixture(scope="module")
def qwen2_v5e():
    target = build_train(_config(QWEN2_TINY), parse_topology("v5e:2x2"))
    report, compiled = compile_train(target)
    return target, report, compiled


def test_qwen2_train_step_compiles_for_v5e_fsdp_tensor(qwen2_v5e):
    target, report, compiled = qwen2_v5e
    assert report.status == "fits", report.error
    assert dict(target.mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 2, "sequence": 1}
    assert {d.device_kind for d in target.mesh.devices.flat} == {"TPU v5 lite"}
    text = compiled.as_text()
    # fsdp x tensor sharding: parameters gathered / gradients reduced across chips
    assert re.search(r"all-gather|reduce-scatter|all-reduce", text)
    m = report.memory
    assert 0 < m.arguments and m.total == m.arguments + m.outputs - m.aliased + m.temporaries + m.code
    assert m.aliased >= 0.9 * m.outputs  # the donated state is updated in place
    # compiled FLOPs per chip vs the analytic MFU formula (6 N per token + attention), per chip
    flops = target.flops_per_token * 4 * 32 / 4
    assert report.model_flops == pytest.approx(flops)
    assert 0.9 < report.compiled_flops / flops < 2.5


def test_saved_executable_keeps_its_topology(qwen2_v5e, tmp_path):
    _, _, compiled = qwen2_v5e
    path = tmp_path / "train_step.aot"
    save_executable(compiled, path, {"topology": "v5e:2x2", "mesh": {"fsdp": 2, "tensor": 2}})
    assert path.stat().st_size > 10_000
    assert read_executable_meta(path)["topology"] == "v5e:2x2"
    with pytest.raises(ValueError, match="not a compiled step"):
        read_executable_meta(_write_yaml(tmp_path, QWEN2_TINY))


def test_prefill_and_decode_compile_with_the_kv_cache_sharded(qwen2_v5e):
    """``--inference``: prefill and one decode step for v5e:2x2, the KV cache ``[layers, batch, max_len,
    kv_heads, head_dim]`` split over the batch (fsdp=2) and the KV heads (tensor=2) and donated."""
    target = qwen2_v5e[0]
    batch, max_len = 4, 256
    steps = compile_inference(target, batch=batch, prompt_len=16, max_len=max_len)
    assert [r.step for r, _ in steps] == ["prefill", "decode"]
    m = QWEN2_TINY
    whole = (m["num_layers"], batch, max_len, m["num_kv_heads"], m["head_dim"])
    per_chip = (m["num_layers"], batch // 2, max_len, m["num_kv_heads"] // 2, m["head_dim"])
    shape = lambda dims: "f32[" + ",".join(map(str, dims)) + "]"
    for report, compiled in steps:
        assert report.status == "fits", report.error
        text = compiled.as_text()
        assert shape(per_chip) in text and shape(whole) not in text, report.step
        assert report.memory.aliased >= 2 * 4 * math.prod(per_chip)  # k and v updated in place


def test_cli_inference_flag(tmp_path, capsys):
    cfg = _write_yaml(tmp_path, QWEN2_TINY)
    args = ["compile", cfg, "topology=v5e:2x2", "--inference", "--prompt-len", "16", "--max-len", "32"]
    assert cli.main([*args, "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "[prefill]" in out and "[decode]" in out and "v5e:2x2: fits" in out
    steps = yaml.safe_load((tmp_path / "r.json").read_text())["steps"]
    assert [s["step"] for s in steps] == ["train", "prefill", "decode"]
    assert all(s["status"] == "fits" for s in steps)


@pytest.mark.parametrize("topology", ["v5p:2x2x1", "v6e:2x2"])
def test_wuneng_train_step_runs_the_pallas_kernels(topology):
    """The WuNeng train step on a 4-chip slice: wkv7 resolves to the Pallas kernel (as ``auto`` does on
    a TPU host), inside shard_map under fsdp x tensor; one Mosaic forward and one backward call per layer.
    v6e is the generation whose compiler rejected the chunked form's 1x1-block inverse step once."""
    model = {**kernels.TINY_WUNENG, "wkv_chunk_size": 16}  # 16: the smallest (fastest to compile) chunk
    target = build_train(_config(model), parse_topology(topology))
    assert target.impls == {"attention_impl": "xla", "wkv_impl": "pallas"}
    report, compiled = compile_train(target)
    assert report.status == "fits", report.error
    layers = kernels.TINY_WUNENG["num_layers"]
    assert kernels.mosaic_calls(compiled.as_text()) == {
        "wkv7_fused_fwd": layers,
        "wkv7_fused_bwd": layers,
        "middle_heads_fwd": layers,
        "middle_heads_bwd": layers,
    }


@pytest.mark.parametrize("topology", kernels.GENERATIONS)
def test_wkv7_kernels_forward_and_backward_compile(topology):
    """The fused forward and backward Mosaic kernels (wkv7 forward + backward with resets and an initial state),
    batch and heads sharded over 2 x 2 chips, compiled by the TPU compiler for v5e, v5p and v6e."""
    result = kernels.compile_op(topology)
    assert result.ok, result.error
    assert result.mosaic_calls == {
        "wkv7_fused_fwd": 1,
        "wkv7_fused_bwd": 1,
        "middle_heads_fwd": 1,
        "middle_heads_bwd": 1,
    }


# ------------------------------------------------------------------------------------------------ the command


def test_does_not_fit_verdict_names_the_largest_buffers(tmp_path, capsys):
    """2^26-token vocabulary: the logits alone are 8 GiB per chip; the TPU compiler refuses, exit code 1."""
    cfg = _write_yaml(tmp_path, QWEN2_TINY)
    code = cli.main(
        ["compile", cfg, "topology=v5e:2x2", "model.vocab_size=67108864", "--json", str(tmp_path / "r.json")]
    )
    out = capsys.readouterr().out
    assert code == 1
    assert "DOES NOT FIT" in out and "v5e:2x2: does not fit" in out
    assert "33554432" in out  # the vocabulary shard (2^26 / tensor=2) in the largest buffers' shapes
    report = yaml.safe_load((tmp_path / "r.json").read_text())
    step = report["steps"][0]
    assert step["status"] == "does not fit" and step["required_bytes"] > step["available_bytes"]
    assert step["available_bytes"] <= 16 * 2**30


def test_mesh_that_does_not_match_the_topology(tmp_path, capsys):
    cfg = _write_yaml(tmp_path, QWEN2_TINY)
    assert cli.main(["compile", cfg, "topology=v5e:2x2", "mesh.fsdp=4", "mesh.tensor=2"]) == 2
    err = capsys.readouterr().err
    assert "does not match topology v5e:2x2 (4 chips" in err and "product is 4" in err
    with pytest.raises(MeshError, match="v5p:2x2x1"):
        run_compile(_config(QWEN2_TINY, mesh={"data": 8}), "v5p:2x2x1")
    assert cli.main(["compile", cfg]) == 2
    assert "topology=" in capsys.readouterr().err
    assert cli.main(["compile", cfg, "topology=v5e:3"]) == 2


def test_out_of_memory_message_parsing(tmp_path):
    msg = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
        "(26.84G) exceeds available HBM (15.75G)."
    )
    need, have = parse_out_of_memory(msg)
    assert need == int(26.84 * 2**30) and have == int(15.75 * 2**30)
    assert parse_out_of_memory("INTERNAL: something else") == (None, None)
    dump = tmp_path / "module_0001.jit_step.after_optimizations-buffer-assignment.txt"
    dump.write_text(
        "BufferAssignment:\n"
        "allocation 0: size 64, parameter 0, shape |f32[16]| at ShapeIndex {}:\n"
        " value: <1 p @0> (size=64,offset=0): f32[16]{0}\n"
        "allocation 1: size 4096, preallocated-temp:\n"
        " value: <2 fusion.3 @0> (size=4096,offset=0): f32[32,32]{1,0}\n"
        " value: <3 fusion.3.remat2 @0> (size=4096,offset=0): f32[32,32]{1,0}\n"
        " value: <4 copy.7{0} @0> (size=1024,offset=0): bf16[16,32]{1,0}\n"
        "allocation 2: size 8192, color 1, preallocated-temp:\n"
        " value: <5 vmem.1 @0> (size=8192,offset=0): f32[64,32]{1,0}\n"
    )
    (tmp_path / "module_0001.jit_step.after_optimizations.txt").write_text(
        '  %fusion.3 = f32[32,32]{1,0} fusion(), metadata={op_name="jit(step)/jvp(Qwen2)/dot_general"}\n'
    )
    top = largest_temporaries(str(tmp_path))
    assert [(b.name, b.shape, b.nbytes) for b in top] == [
        ("fusion.3 (jit(step)/jvp(Qwen2)/dot_general) [2 copies: rematerialised]", "f32[32,32]", 4096),
        ("copy.7", "bf16[16,32]", 1024),
    ]
