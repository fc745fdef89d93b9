"""benchmarks/long_context.py's pure logic (no compiles): points and their config, the longest fitting context,
the HLO collective reader and the ring bound, the table and the progress line."""

from __future__ import annotations

from benchmarks import long_context as lc
from train.config import load_config

HLO = """\
HloModule jit_step, entry_computation_layout={()->()}

%body.12 (p: (s32[], bf16[1,8192,2,128])) -> (s32[], bf16[1,8192,2,128]) {
  %fusion.3 = bf16[1,8192,2,128]{3,2,1,0} fusion(%x), kind=kLoop
  %all-gather-start.1 = (bf16[1,8192,2,128]{3,2,1,0}, bf16[1,32768,2,128]{3,2,1,0}) all-gather-start(bf16[1,8192,2,128]{3,2,1,0} %fusion.3), channel_id=1, replica_groups=[1,4]<=[4], dimensions={1}, use_global_device_ids=true, metadata={op_name="jit(step)/jvp(WuNeng)/layers/attention/splash/all_gather" source_file="x.py"}
  %all-gather.2 = bf16[1,32768,2,128]{3,2,1,0} all-gather(bf16[1,8192,2,128]{3,2,1,0} %fusion.3), channel_id=2, dimensions={1}, metadata={op_name="jit(step)/jvp(WuNeng)/layers/attention/splash/all_gather"}
  %all-gather.3 = f32[1536,8960]{1,0} all-gather(f32[384,8960]{1,0} %p1), channel_id=3, dimensions={0}, metadata={op_name="jit(step)/mlp/up/all_gather"}
  %reduce-scatter.1 = bf16[1,8192,2,128]{3,2,1,0} reduce-scatter(bf16[1,32768,2,128]{3,2,1,0} %g), dimensions={1}, metadata={op_name="jit(step)/transpose(attention)/all_gather"}
  %small = f32[4]{0} all-reduce(f32[4]{0} %s), to_apply=%add
}
"""


def test_point_overrides_and_config():
    p = lc.Point("wuneng-1.5b", "v5p:2x2x1", 4, 131072, 4, "splash")
    assert (p.fsdp, p.global_batch_size, p.tokens_per_chip) == (1, 1, 32768)
    cfg = load_config(
        {"run_dir": "x", "data": {"store": "x"}, "steps": 10},
        [f"{k}={v!r}".replace("'", '"') for k, v in p.overrides().items()],
    )
    assert cfg.mesh.sizes() == (1, 1, 1, 4) and cfg.global_batch_size == 1 and cfg.seq_len == 131072
    assert dict(cfg.rules)["embed"] == ("fsdp", "sequence")  # the default rules: the state over all 4 chips
    assert "mesh.sequence=4" in p.command()
    q = lc.Point("wuneng-1.5b", "v5p:2x2x1", 4, 8192, 1, "splash")
    assert (q.fsdp, q.global_batch_size, q.tokens_per_chip) == (4, 4, 8192)
    assert "rules.embed" not in q.overrides() and "rules.embed" not in p.overrides()
    assert lc.Point.from_key(p.key, 4) == p
    assert lc.chips_of("v5p:2x2x1") == 4 and lc.fmt_tokens(131072) == "128K" and lc.fmt_tokens(2**20) == "1M"


def test_longest_fitting():
    def e(t, s, status):
        return {"preset": "m", "topology": "v5p:2x2x1", "seq_len": t, "sequence": s, "status": status}

    pts = {
        str(i): x
        for i, x in enumerate(
            [
                e(8192, 1, "fits"),
                e(16384, 1, "fits"),
                e(32768, 1, "does not fit"),
                e(65536, 1, "fits"),
                e(8192, 4, "fits"),
            ]
        )
    }
    assert lc.longest_fitting(pts, "m", "v5p:2x2x1", 1) == 16384
    assert lc.first_failure(pts, "m", "v5p:2x2x1", 1) == 32768
    assert lc.longest_fitting(pts, "m", "v5p:2x2x1", 4) == 8192
    assert lc.first_failure(pts, "m", "v5p:2x2x1", 4) is None


def test_collectives_and_ring_bound():
    cs = lc.collectives(HLO)
    names = {c["name"]: c for c in cs}
    assert "small" not in names  # below 1 MiB
    kv = 32768 * 2 * 128 * 2
    assert names["all-gather-start.1"]["bytes"] == kv and names["all-gather-start.1"]["kind"] == "all-gather"
    assert (
        names["all-gather-start.1"]["computation"] == "body.12" and names["all-gather.2"]["dimensions"] == "1"
    )
    assert names["all-gather.3"]["bytes"] == 1536 * 8960 * 4
    att = [c for c in cs if lc.is_attention_kv(c)]
    assert {c["name"] for c in att} == {"all-gather-start.1", "all-gather.2", "reduce-scatter.1"}
    seq = {c["name"] for c in cs if lc.is_sequence_gather(c, 32768, 4)}
    assert seq == {"all-gather-start.1", "all-gather.2", "reduce-scatter.1"}  # not the weight gather
    assert lc.is_attention_kv({**names["all-gather.3"], "op_name": "x"}, kv_dims=(8960,)) is False
    assert lc.is_attention_kv({**names["all-gather.2"], "op_name": "rope"}, kv_dims=(2, 128))
    ring = lc.ring_saving(att, 4, 10 * kv)
    assert ring["gathered_kv_bytes_one_call"] == 2 * kv
    assert ring["reduced_dkv_bytes_one_call"] == kv  # the reduce-scatter's full-length operand
    assert ring["ring_saving_bytes_at_most"] == 3 * kv // 2  # keeps 2 of 4 blocks
    assert abs(ring["ring_saving_fraction_of_total"] - 0.15) < 1e-12
    ar = {"kind": "all-reduce", "shape": "bf16[1,32768,2,128]", "dimensions": None, "op_name": None}
    assert lc.is_sequence_gather(ar, 32768, 4) and lc.is_attention_kv(ar, (2, 128))


def test_markdown_and_progress(tmp_path):
    cache = lc.Cache(tmp_path / "lc.json")
    cache.data["usable_hbm"]["v5p"] = 95 * lc.GIB
    for t, status, used in ((8192, "fits", 20 * lc.GIB), (16384, "does not fit", 120 * lc.GIB)):
        p = lc.Point("m", "v5p:2x2x1", 4, t, 1, "splash")
        cache.data["points"][p.key] = {
            **p.__dict__, "key": p.key, "tokens_per_chip": p.tokens_per_chip, "status": status, "used_bytes": used,
            "available_bytes": 95 * lc.GIB, "compile_s": 60.0, "memory": {"arguments": lc.GIB, "temporaries": lc.GIB},
            "largest": [{"kind": "temporary", "name": "fusion.1 (jvp/dot_general)", "shape": "f32[8]", "nbytes": lc.GIB}],
        }  # fmt: skip
    cache.save()
    text = lc.markdown(lc.Cache(tmp_path / "lc.json"))
    assert "| 8K | 8K |" in text and "**no** (needs 120.0 of 95.00)" in text
    assert "longest context that fits **8K** (16K: the compiler refuses it, out of HBM)" in text
    prog = lc.Progress(4)
    assert prog.step(None).startswith("[1/4]") and "ETA n/a" in prog.step(None)
    line = prog.step(60.0)
    assert line.startswith("[3/4]") and "1.00 compiles/min" in line and "ETA 1m00s" in line


REPORT = """\
Memory Space: default (color=0)
Total bytes: 39713824 (37.87MiB)
  cumulative_size;       size;       offset; used_by_n_values; shapes_list
  ------------------------------------------------------------
    4.00MiB(  4%);    4.00MiB;     17235968;                1; bf16[1,8192,2,16]
    6.00MiB(  8%);    2.00MiB;     13041664;                2; bf16[1,8192,2,16], f32[1,2048,2,16]
Memory Space: other (color=1)
    1.00MiB(  4%);    1.00MiB;     0;                1; f32[4]
"""


def test_heap_allocations():
    rows = lc.heap_allocations(REPORT)
    assert [r["bytes"] for r in rows] == [4 << 20, 2 << 20]
    assert rows[1] == {"bytes": 2 << 20, "values": 2, "shapes": "bf16[1,8192,2,16], f32[1,2048,2,16]"}
