"""Train-step throughput of the three families at matching sizes: tokens/s, TFLOP/s per device, MFU.

    python benchmarks/train_step.py --size tiny          # CPU-sized (default on CPU)
    python benchmarks/train_step.py --size 150m          # GPU: ~150M parameters
    python benchmarks/train_step.py --size 1b --dtype bfloat16
    python benchmarks/train_step.py --layers 2 8       # compile time vs depth (scanned layers)
    python benchmarks/train_step.py --loss-vocab-tile 0 128   # full logits vs a vocabulary-tiled loss

All models run the real jitted train step (``train.train_step``: AdamW, clipping, float32 master
weights) on one mesh over all local devices (data-parallel), on random tokens, in the same run.
FLOPs per token follow ``train.metrics.flops_per_token`` (``docs/mfu.md``): 6·N_matmul + causal
attention + the RWKV-7 state term. Prints a table with ratios to ``qwen2`` (WuNeng's step-time
overhead) and the step's compile time (``jit(...).lower(...).compile()``; with several ``--layers``
depths, each depth's compile time relative to the shallowest: the layer stack is scanned, so it should
barely grow), and writes ``benchmarks/results/train_step_<size>_<platform>.json``.
Goal (H100): MFU >= 40 % for the ~1B qwen2, WuNeng within 15 % of its step time.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import print_table, time_fn, write_results  # noqa: E402
from train.config import MeshConfig, OptimizerConfig  # noqa: E402
from train.mesh import make_mesh, mesh_context  # noqa: E402
from train.metrics import device_peak_flops, flops_dims, flops_per_token  # noqa: E402
from train.optimizer import make_optimizer  # noqa: E402
from train.state import count_params, init_state, make_layout  # noqa: E402
from train.train_step import jit_train_step, make_train_step  # noqa: E402
from wuneng_jax import sharding as S  # noqa: E402
from wuneng_jax.config import config_from_dict  # noqa: E402
from wuneng_jax.layers.vocab_tiling import DEFAULT_VOCAB_TILE  # noqa: E402
from wuneng_jax.models import build_model  # noqa: E402

# Matching widths per size: qwen2 and wuneng share the attention shape; rwkv7 gets the same width/depth.
SIZES = {
    "tiny": dict(hidden=128, layers=2, heads=4, kv=2, head_dim=32, ffn=352, vocab=512, seq=256, batch=4),
    "150m": dict(
        hidden=768, layers=12, heads=12, kv=4, head_dim=64, ffn=2048, vocab=32000, seq=2048, batch=16
    ),
    "1b": dict(
        hidden=2048, layers=16, heads=16, kv=4, head_dim=128, ffn=5632, vocab=32000, seq=4096, batch=8
    ),
}


def model_configs(size: str, dtype: str) -> dict[str, dict]:
    s = SIZES[size]
    attn = dict(
        vocab_size=s["vocab"],
        hidden_size=s["hidden"],
        num_layers=s["layers"],
        num_heads=s["heads"],
        num_kv_heads=s["kv"],
        head_dim=s["head_dim"],
        intermediate_size=s["ffn"],
        dtype=dtype,
        max_position_embeddings=s["seq"],
    )
    return {
        "qwen2": {"family": "qwen2", **attn},
        "wuneng": {"family": "wuneng", **attn},
        "rwkv7": {
            "family": "rwkv7",
            "vocab_size": s["vocab"],
            "n_embd": s["hidden"],
            "n_layer": s["layers"],
            "head_size": min(64, s["head_dim"]),
            "dim_ffn": s["ffn"],
            "dtype": dtype,
        },
    }


def bench_family(
    cfg_dict: dict, seq: int, batch: int, reps: int, vocab_tile: int = DEFAULT_VOCAB_TILE
) -> dict:
    import time

    cfg = config_from_dict(cfg_dict)
    mesh = make_mesh(MeshConfig(data=-1))
    rules = S.DEFAULT_RULES
    tx, schedule = make_optimizer(OptimizerConfig(warmup_steps=1), 1000)
    build = lambda rngs: build_model(cfg, rngs=rngs)  # noqa: E731
    layout = make_layout(build, tx, mesh, rules, seed=0)
    state = init_state(build, tx, mesh, rules, 0, layout)
    step = jit_train_step(
        make_train_step(layout.graphdef, tx, schedule, rules=rules, vocab_tile=vocab_tile),
        layout,
        mesh,
        rules,
    )
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg_dict["vocab_size"], (batch, seq + 1)).astype(np.int32)
    batch_arrays = {
        "tokens": jnp.asarray(tokens[:, :-1]),
        "targets": jnp.asarray(tokens[:, 1:]),
        "segment_ids": jnp.ones((batch, seq), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq)),
        "loss_mask": jnp.ones((batch, seq), jnp.float32),
    }
    holder = {"state": state}
    t0 = time.perf_counter()
    with mesh_context(mesh, rules):
        step = step.lower(state, batch_arrays).compile()
    compile_s = time.perf_counter() - t0

    def run():
        with mesh_context(mesh, rules):
            holder["state"], metrics = step(holder["state"], batch_arrays)
        return metrics["loss"]

    timing = time_fn(run, warmup=2, reps=reps)
    n_params = count_params(layout.abstract.params)
    flops = flops_per_token(flops_dims(cfg, n_params), seq)["total"]
    tokens_s = batch * seq / timing["median_s"]
    tflops = flops * tokens_s / jax.device_count() / 1e12
    peak = device_peak_flops(jax.devices()[0].device_kind)
    return {
        "params": n_params,
        "step_ms": timing["median_s"] * 1e3,
        "tokens_per_s": tokens_s,
        "tflops_per_device": tflops,
        "mfu": (tflops * 1e12 / peak) if peak else None,
        "flops_per_token": flops,
        "compile_s": compile_s,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument(
        "--dtype", default=None, help="compute dtype (default: float32 on CPU, bfloat16 elsewhere)"
    )
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--families", nargs="+", default=["qwen2", "wuneng", "rwkv7"])
    p.add_argument("--layers", nargs="+", type=int, default=None, help="depths to run (default: the size's)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the size's)")
    p.add_argument(
        "--loss-vocab-tile",
        nargs="+",
        type=int,
        default=[DEFAULT_VOCAB_TILE],
        help="vocabulary tile(s) of the loss to compare in one run (0 = full logits; default: the train "
        "config's default)",
    )
    args = p.parse_args(argv)
    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    seq = args.seq_len or SIZES[args.size]["seq"]
    batch = args.batch or SIZES[args.size]["batch"]
    batch = max(batch // jax.device_count(), 1) * jax.device_count()
    depths = args.layers or [SIZES[args.size]["layers"]]
    tiles = args.loss_vocab_tile
    results = {}
    for depth, tile in [(d, t) for d in depths for t in tiles]:
        configs = model_configs(args.size, dtype)
        for fam in args.families:
            key = (
                fam + ("" if len(depths) == 1 else f"@{depth}") + ("" if len(tiles) == 1 else f"/tile{tile}")
            )
            cfg = {**configs[fam], ("n_layer" if fam == "rwkv7" else "num_layers"): depth}
            if args.vocab:
                cfg["vocab_size"] = args.vocab
            r = {"family": fam, "layers": depth, "loss_vocab_tile": tile}
            results[key] = r = {**r, **bench_family(cfg, seq, batch, args.reps, tile)}
            print(
                f"{key}: {r['params']:,} params, compile {r['compile_s']:.1f} s, {r['step_ms']:.1f} ms/step, "
                f"{r['tokens_per_s']:.0f} tok/s",
                flush=True,
            )
    rows = []
    for key, r in results.items():
        base = results.get(key.replace(r["family"], "qwen2", 1))
        rel = r["step_ms"] / base["step_ms"] if base else float("nan")
        shallow = results.get(key.replace(f"@{r['layers']}", f"@{min(depths)}"), r)
        r["step_time_vs_qwen2"] = rel
        r["compile_vs_shallowest"] = r["compile_s"] / shallow["compile_s"]
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "n/a (no peak for this device)"
        rows.append(
            [
                key,
                f"{r['params']:,}",
                r["compile_s"],
                r["compile_vs_shallowest"],
                r["step_ms"],
                r["tokens_per_s"],
                r["tflops_per_device"],
                mfu,
                rel,
            ]
        )
    print(f"\ntrain step, size={args.size}, B={batch}, T={seq}, dtype={dtype}, median of {args.reps}")
    print_table(
        [
            "model",
            "params",
            "compile_s",
            "compile / shallowest",
            "step_ms",
            "tokens/s",
            "TFLOP/s/dev",
            "MFU",
            "step time / qwen2",
        ],
        rows,
    )
    path = write_results(
        f"train_step_{args.size}"
        + ("_layers" + "-".join(map(str, depths)) if args.layers else "")
        + (f"_vocab{args.vocab}" if args.vocab else "")
        + ("_tiles" + "-".join(map(str, tiles)) if len(tiles) > 1 else ""),
        {"config": {**vars(args), "dtype": dtype, "batch": batch, "seq_len": seq}, "results": results},
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
