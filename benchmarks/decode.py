"""Decode throughput and memory per sequence vs context length: qwen2, rwkv7 and wuneng at the same width.

    python benchmarks/decode.py --smoke                       # tiny shapes on CPU (a minute)
    python benchmarks/decode.py                               # Qwen2.5-0.5B shapes, contexts 1K..32K (GPU/TPU)
    python benchmarks/decode.py --contexts 1024 4096 --batch 8 --dtype bfloat16
    python benchmarks/decode.py --memory-only --dtype bfloat16    # state memory of the 0.5B shapes, any host

For each family and context length ``C`` the decode state is built for ``S_max = C + steps`` slots with
the first ``C`` marked as filled (a decode step's cost does not depend on the cached values, only on the
static shapes), then ``steps`` compiled decode steps run back to back (``Decoder.step``, greedy token
feedback on device). Reported per family and context:

* ``state MiB/seq``: bytes of the decode state per sequence (KV cache [L,S,G,D] in the compute dtype,
  RWKV-7 state [H,N,N] float32 and token-shift vectors), from the state's arrays;
* ``device MiB/seq``: the device allocator's ``bytes_in_use`` growth when the state is created, per
  sequence (accelerators only: CPU has no allocator statistics);
* ``tok/s``: generated tokens per second over the batch (median of repeats); ``ms/step``.

Same width: every family gets ``--width``, ``--layers`` and ``--vocab``; attention families ``--heads``
query heads, ``--kv-heads`` KV heads of ``--head-dim``; RWKV-7 heads of ``--head-dim``; WuNeng is the
qwen2 model with every layer hybrid (state heads of ``--head-dim``). Writes
``benchmarks/results/decode_<platform>.json`` and ``decode_memory_<platform>.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import RESULTS_DIR, device_info, print_table, write_results  # noqa: E402

FAMILIES = ("qwen2", "rwkv7", "wuneng")


def make_configs(args: argparse.Namespace) -> dict:
    from wuneng_jax.models.qwen2 import Qwen2Config
    from wuneng_jax.models.rwkv7 import RWKV7Config
    from wuneng_jax.models.wuneng_config import wuneng_config_from_qwen2

    qwen = Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.width,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        intermediate_size=args.ffn,
        tie_word_embeddings=True,
        max_position_embeddings=max(args.contexts) + args.steps,
        dtype=args.dtype,
    )
    rank = max(8, args.width // 32)
    rwkv = RWKV7Config(
        vocab_size=args.vocab,
        n_embd=args.width,
        n_layer=args.layers,
        head_size=args.head_dim,
        dim_ffn=args.ffn,
        d_decay=rank,
        d_aaa=rank,
        d_mv=rank,
        d_gate=rank,
        dtype=args.dtype,
    )
    wuneng = wuneng_config_from_qwen2(
        qwen, state_head_size=args.head_dim, decay_lora_rank=rank, iclr_lora_rank=rank, gate_lora_rank=rank
    )
    return {"qwen2": qwen, "rwkv7": rwkv, "wuneng": wuneng}


def build(cfg, seed: int = 0):
    """The model with random parameters initialised on the device (jitted init)."""
    from flax import nnx

    from wuneng_jax.models import build_model

    return nnx.jit(lambda: build_model(cfg, rngs=nnx.Rngs(seed)))()


def state_mib_per_seq(cfg, batch: int, max_len: int) -> float:
    """Decode-state MiB per sequence from shapes alone (abstract model and state: nothing allocated)."""
    from flax import nnx

    from wuneng_jax.decode import init_state, state_nbytes
    from wuneng_jax.models import build_model

    model = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
    state = jax.eval_shape(lambda: init_state(model, batch, max_len))
    return state_nbytes(state) / batch / 2**20


def _bytes_in_use() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats else int(stats.get("bytes_in_use", 0))


def bench_one(dec, batch: int, context: int, steps: int, reps: int) -> dict:
    from wuneng_jax.decode import state_nbytes

    before = _bytes_in_use()
    state = dec.init_state(batch, context + steps)
    jax.block_until_ready(state)
    after = _bytes_in_use()
    state_bytes = state_nbytes(state)
    if state.kv is not None:  # pretend the first `context` slots hold a prompt
        valid = jnp.broadcast_to(jnp.arange(context + steps) < context, state.kv.valid.shape)
        state = state._replace(kv=state.kv._replace(valid=valid))
    state = state._replace(index=jnp.int32(context), positions=jnp.full((batch,), context, jnp.int32))
    tok = jnp.zeros((batch,), jnp.int32)

    def run(state, tok, n):
        for _ in range(n):
            logits, state = dec.step(tok, state, check=False)
            tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return jax.block_until_ready((tok, state))

    t0 = time.perf_counter()
    run(jax.tree.map(jnp.copy, state), tok, 1)  # compile; every run starts from a copy (the step donates it)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        s = jax.tree.map(jnp.copy, state)
        t0 = time.perf_counter()
        run(s, tok, steps)
        times.append((time.perf_counter() - t0) / steps)
    step_s = float(np.median(times))
    out = {
        "context": context,
        "batch": batch,
        "state_mib_per_seq": state_bytes / batch / 2**20,
        "ms_per_step": step_s * 1e3,
        "tokens_per_s": batch / step_s,
        "compile_s": compile_s,
    }
    if before is not None and after is not None:
        out["device_mib_per_seq"] = (after - before) / batch / 2**20
    return out


def plot(results: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = all("tokens_per_s" in r for rows in results.values() for r in rows)
    fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(11, 4.2) if timed else (6, 4.2), squeeze=False)
    axes = axes[0]
    styles = {"qwen2": ("o", "-"), "rwkv7": ("^", "-"), "wuneng": ("s", "--")}
    for fam, rows in results.items():
        ctx = [r["context"] for r in rows]
        marker, line = styles.get(fam, ("o", "-"))
        for ax, key in zip(axes, ("state_mib_per_seq", "tokens_per_s"), strict=False):
            ax.plot(ctx, [r[key] for r in rows], marker=marker, linestyle=line, label=fam)
    for ax, ylabel in zip(axes, ("decode state per sequence (MiB)", "decode tokens/s"), strict=False):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes and short contexts (CPU)")
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=32, help="decode steps per timing")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--width", type=int, default=896)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--heads", type=int, default=14)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--ffn", type=int, default=4864)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"))
    p.add_argument("--tag", default="", help="suffix of the result file names")
    p.add_argument(
        "--memory-only",
        action="store_true",
        help="decode-state memory from shapes only (no model, no timing)",
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.width, args.layers, args.heads, args.kv_heads, args.head_dim = 64, 2, 4, 2, 16
        args.ffn, args.vocab, args.steps, args.reps = 128, 512, 32, 5
        if args.contexts == p.get_default("contexts"):
            args.contexts = [1024, 2048, 4096, 8192]
        args.tag = args.tag or "smoke"
    if args.dtype is None:
        args.dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return args


def main(argv=None) -> dict:
    from wuneng_jax.decode import Decoder

    args = parse_args(argv)
    cfgs = make_configs(args)
    results: dict[str, list[dict]] = {}
    table = []
    for fam in args.families:
        dec = None if args.memory_only else Decoder(build(cfgs[fam]))
        results[fam] = []
        for ctx in sorted(args.contexts):
            if dec is None:
                mib = state_mib_per_seq(cfgs[fam], args.batch, ctx + args.steps)
                r = {"context": ctx, "batch": args.batch, "state_mib_per_seq": mib}
            else:
                r = bench_one(dec, args.batch, ctx, args.steps, args.reps)
            results[fam].append(r)
            row = [fam, ctx, r["state_mib_per_seq"], r.get("device_mib_per_seq", "n/a")]
            row += [r.get("tokens_per_s", "n/a"), r.get("ms_per_step", "n/a")]
            table.append(row)
            print("  ".join(str(x if not isinstance(x, float) else f"{x:.4g}") for x in row), flush=True)
        del dec
    print()
    print_table(["family", "context", "state MiB/seq", "device MiB/seq", "tok/s", "ms/step"], table)
    info = device_info()
    name = "decode" + (f"_{args.tag}" if args.tag else "")
    shape = dict(
        width=args.width,
        layers=args.layers,
        heads=args.heads,
        kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        ffn=args.ffn,
        vocab=args.vocab,
        dtype=args.dtype,
        batch=args.batch,
        steps=args.steps,
    )
    path = write_results(name, {"shape": shape, "results": results})
    png = os.path.join(RESULTS_DIR, f"{name}_memory_{info['platform']}.png")
    where = "decode-state size from shapes" if args.memory_only else f"decode on {info['device_kind']}"
    title = (
        f"{where} ({args.dtype})\nd={args.width}, L={args.layers}, "
        f"H={args.heads}, G={args.kv_heads}, D={args.head_dim}, batch {args.batch}"
    )
    plot(results, png, title)
    print(f"\nwrote {path}\nwrote {png}")
    return results


if __name__ == "__main__":
    main()
