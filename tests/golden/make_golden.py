"""Regenerate the golden files in tests/golden/ from third-party reference code.

Run from the repository root, in a SEPARATE environment that has the `oracle` extra (see README.md):

    /work/oracle-venv/bin/python tests/golden/make_golden.py

It imports nothing from this repository. The oracles are:
  * BlinkDL's `rwkv` pip package (x070 path, RWKV_V7_ON=1, CPU): the exact WKV loop of its CPU
    `RWKV_x070_TMix_seq` (extracted from the installed source and executed, see `_rwkv_pkg_loop`), and the
    full RWKV-7 model (`rwkv.model.RWKV`, strategy 'cpu fp32').
  * fla-core's `dplr_recurrence` (`fla/ops/generalized_delta_rule/dplr/naive.py`, pure torch).
  * Hugging Face transformers' `Qwen2ForCausalLM` (eager attention), built from a random config.
  * Small independent numpy float64 implementations written below (`*_np64`), used to measure how far each
    float32 oracle is from exact arithmetic and stored for float64 (x64) tests.
Everything is seeded; the script is deterministic up to the last ulp of multi-threaded BLAS (threads = 1).
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import os
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path

os.environ["RWKV_V7_ON"] = "1"  # must be set before rwkv.model is imported
os.environ["RWKV_JIT_ON"] = "1"
os.environ["RWKV_CUDA_ON"] = "0"

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
torch.manual_seed(0)

OUT = Path(__file__).resolve().parent
WKV_DIR = OUT / "wkv7_cases"
REPORT: dict[str, dict] = {}


def rel(x, ref) -> float:
    """max|x - ref| / max|ref| in float64."""
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


def bf16_exact(x) -> np.ndarray:
    """Round to the nearest bfloat16-representable float32 (low 16 mantissa bits zero).

    Model weights are stored this way: still float32 files, but they compress ~2x in git and cast to bf16
    losslessly. Ties round away from zero; NaN/inf are not expected.
    """
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((u + np.uint32(0x8000)) & np.uint32(0xFFFF0000)).view(np.float32)


def maxabs(x, ref) -> float:
    return float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(ref, np.float64))))


# ---------------------------------------------------------------------------------------------------------
# Part a: the WKV7 recurrence
# ---------------------------------------------------------------------------------------------------------


def _load_rwkv_pkg_loop():
    """Extract the per-token WKV loop from the CPU `RWKV_x070_TMix_seq` of the installed rwkv package.

    The package has no standalone WKV function: the recurrence is a `for t in range(T)` loop inlined in
    `RWKV_x070_TMix_seq` (CPU branch, taken when RWKV_CUDA_ON != '1'), between the projections and the
    GroupNorm. We take that loop's source text verbatim from the installed `rwkv/model.py` and execute it
    with the loop's own free variables (T, H, N, r, w, k, v, kk, a, state, xx, x) bound to our tensors.
    In the loop, `a` is the in-context learning rate (iclr), and the DPLR terms are a = -kk, b = kk*iclr.
    """
    import rwkv.model as rm

    src = inspect.getsource(rm)
    tree = ast.parse(src)
    loops = []
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef) and fn.name == "RWKV_x070_TMix_seq":
            loops += [node for node in fn.body if isinstance(node, ast.For)]
    if len(loops) != 1:
        raise RuntimeError(f"expected exactly one WKV for-loop in RWKV_x070_TMix_seq, found {len(loops)}")
    lines = src.splitlines()[loops[0].lineno - 1 : loops[0].end_lineno]
    loop_src = textwrap.dedent("\n".join(lines))
    for must in ("ab = (-kk_).view(H,N,1) @ (kk_*a_).view(H,1,N)", "state = state * w_.view(H,1,N)"):
        if must not in loop_src:
            raise RuntimeError(f"rwkv package WKV loop changed; missing {must!r}:\n{loop_src}")
    return compile(loop_src, f"{rm.__file__}:RWKV_x070_TMix_seq", "exec"), loop_src


def wkv_rwkv_pkg(r, w, k, v, kk, iclr, s0):
    """Run the rwkv package's loop. Inputs float32 [B,T,H,N], s0 [B,H,N,N]. Returns o [B,T,H,N], S [B,H,N,N]."""
    code, _ = _load_rwkv_pkg_loop()
    B, T, H, N = r.shape
    o = np.zeros((B, T, H, N), np.float32)
    s_out = np.zeros((B, H, N, N), np.float32)
    for bi in range(B):
        t32 = lambda x, bi=bi: torch.from_numpy(np.ascontiguousarray(x[bi].reshape(T, H * N), np.float32))
        ns = dict(
            T=T,
            H=H,
            N=N,
            r=t32(r),
            w=t32(w),
            k=t32(k),
            v=t32(v),
            kk=t32(kk),
            a=t32(iclr),
            state=torch.from_numpy(s0[bi].astype(np.float32).copy()),
            xx=torch.zeros(T, H * N, dtype=torch.float32),
            x=torch.zeros(1, dtype=torch.float32),
        )
        with torch.no_grad():
            exec(code, {"torch": torch}, ns)
        o[bi] = ns["xx"].numpy().reshape(T, H, N)
        s_out[bi] = ns["state"].numpy()
    return o, s_out


def _load_fla_dplr_recurrence():
    """Import fla's naive dplr_recurrence from its file: `import fla` pulls in triton, which is not needed."""
    import fla

    path = Path(fla.__file__).parent / "ops" / "generalized_delta_rule" / "dplr" / "naive.py"
    spec = importlib.util.spec_from_file_location("fla_dplr_naive", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.dplr_recurrence


def wkv_fla(r, log_w, k, v, a, b, s0):
    """fla dplr_recurrence in the rwkv layout. fla: [B,H,T,D] inputs, state h = S^T [K,V], q scaled by K^-0.5.

    We pass q = r and multiply its output by sqrt(K) afterwards (in float64, then round): exact for K = 16, 64.
    gk = log_w (fla computes exp(gk) in float32 after casting gk to float32).
    """
    fn = _load_fla_dplr_recurrence()
    N = r.shape[-1]
    tt = lambda x: torch.from_numpy(np.ascontiguousarray(np.swapaxes(x, 1, 2)))
    with torch.no_grad():
        o, h = fn(
            tt(r.astype(np.float32)),
            tt(k),
            tt(v),
            tt(a),
            tt(b),
            tt(log_w),
            initial_state=torch.from_numpy(np.ascontiguousarray(np.swapaxes(s0, -1, -2))),
            output_final_state=True,
        )
    o = np.swapaxes(o.numpy(), 1, 2).astype(np.float64) * np.sqrt(N)
    return o.astype(np.float32), np.ascontiguousarray(np.swapaxes(h.numpy(), -1, -2))


def wkv_np64(r, w, k, v, a, b, s0, dtype=np.float64):
    """Independent float64 loop of the recurrence in rwkv-package semantics (rwkv7-and-kernels.md 7.1)."""
    f = lambda x: np.asarray(x, dtype)
    r, w, k, v, a, b = map(f, (r, w, k, v, a, b))
    S = f(s0).copy()  # [B,H,Nv,Nk]
    B, T, H, N = r.shape
    o = np.zeros((B, T, H, N), dtype)
    for t in range(T):
        sa = np.einsum("bhij,bhj->bhi", S, a[:, t])
        S = (
            S * w[:, t, :, None, :]
            + sa[..., None] * b[:, t, :, None, :]
            + v[:, t, :, :, None] * k[:, t, :, None, :]
        )
        o[:, t] = np.einsum("bhij,bhj->bhi", S, r[:, t])
    return o, S


def _l2norm(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def make_wkv_case(
    seed,
    B,
    T,
    H,
    N,
    *,
    w_mode="rwkv",
    iclr_mode="random",
    generic_ab=False,
    kscale=1.0,
    vscale=1.0,
    random_s0=False,
):
    """Inputs with RWKV-7 statistics (rwkv7-and-kernels.md 7.1), then the requested adversarial twist.

    Returns float32 arrays r, w, k, v, a, b, s0 plus kk, iclr (float32) such that a = -kk and b = fl32(kk*iclr)
    exactly (the product the rwkv package loop forms itself).
    """
    rng = np.random.default_rng(seed)
    shp = (B, T, H, N)
    r = rng.standard_normal(shp)
    k = rng.standard_normal(shp)
    v = rng.standard_normal(shp)
    k_k = 0.71 + 0.1 * rng.uniform(-0.5, 0.5, (H, N))
    k_a = 1.02 + 0.05 * rng.standard_normal((H, N))
    if w_mode == "rwkv":  # w = exp(-0.606531 * sigmoid(z)), z spanning the w0 init range [-6, 3]
        z = rng.uniform(-6.0, 3.0, (H, N)) + 0.5 * rng.standard_normal(shp)
        w = np.exp(-0.606531 * _sigmoid(z))
    elif w_mode == "floor":
        w = np.full(shp, 0.545)
    elif w_mode == "near_zero":
        w = 10.0 ** rng.uniform(-8.0, -1.0, shp)
    elif w_mode == "mixed":  # -log(w) log-uniform in [1e-6, -log(1e-4)], fixed per channel, jittered in time
        e = rng.uniform(np.log10(1e-6), np.log10(-np.log(1e-4)), (H, N)) + 0.05 * rng.standard_normal(shp)
        w = np.clip(np.exp(-(10.0**e)), 1e-4, 1 - 1e-6)
    elif w_mode == "one":
        w = np.ones(shp)
    elif w_mode == "near_one":
        w = 1.0 - rng.uniform(0.0, 1e-5, shp)
    else:
        raise ValueError(w_mode)
    w = w.astype(np.float32)
    if w_mode == "near_one":
        w = np.minimum(w, np.nextafter(np.float32(1), np.float32(0)))  # strictly < 1 after rounding
    if iclr_mode == "random":
        iclr = _sigmoid(1.5 * rng.standard_normal(shp))
    elif iclr_mode in ("zero", "one"):
        iclr = np.full(shp, 0.0 if iclr_mode == "zero" else 1.0)
    else:
        raise ValueError(iclr_mode)
    kk = _l2norm(k * k_k)  # from k before the iclr modification, as in the model
    k = k * (1 + (iclr - 1) * k_a)
    kk32 = kk.astype(np.float32)
    if generic_ab:  # independent random a and b: a = -kk, iclr chosen so that kk * iclr ~ b_target
        kk32 = (0.6 * rng.standard_normal(shp) / np.sqrt(N)).astype(np.float32)
        b_target = 0.6 * rng.standard_normal(shp) / np.sqrt(N)
        iclr = b_target / kk32.astype(np.float64)
    iclr32 = iclr.astype(np.float32)
    a = -kk32
    b = kk32 * iclr32  # float32 product, bit-identical to what the package loop forms
    s0 = (0.5 * rng.standard_normal((B, H, N, N))) if random_s0 else np.zeros((B, H, N, N))
    f32 = lambda x: np.ascontiguousarray(x, np.float32)
    return dict(
        r=f32(r),
        w=w,
        k=f32(k * kscale),
        v=f32(v * vscale),
        a=f32(a),
        b=f32(b),
        s0=f32(s0),
        kk=kk32,
        iclr=iclr32,
    )


WKV_CASES = [
    # name, description, kwargs
    ("realistic_t1_n32", "RWKV-7 statistics, T=1, random S0", dict(B=2, T=1, H=2, N=32, random_s0=True)),
    ("realistic_t15_n16", "RWKV-7 statistics, T=15", dict(B=1, T=15, H=2, N=16)),
    (
        "realistic_t17_n16_s0",
        "RWKV-7 statistics, T=17, B=2, random S0",
        dict(B=2, T=17, H=2, N=16, random_s0=True),
    ),
    ("realistic_t63_n32", "RWKV-7 statistics, T=63", dict(B=1, T=63, H=1, N=32)),
    (
        "realistic_t100_n64_s0",
        "RWKV-7 statistics, T=100, N=64, random S0",
        dict(B=1, T=100, H=1, N=64, random_s0=True),
    ),
    (
        "realistic_t128_n32_s0",
        "RWKV-7 statistics, T=128 (multiple of every chunk size), random S0",
        dict(B=1, T=128, H=1, N=32, random_s0=True),
    ),
    (
        "decay_floor_t65_n16",
        "w = 0.545 everywhere (float32(0.545)), T=65",
        dict(B=1, T=65, H=2, N=16, w_mode="floor"),
    ),
    (
        "decay_near_zero_t33_n16",
        "w log-uniform in [1e-8, 0.1]",
        dict(B=1, T=33, H=2, N=16, w_mode="near_zero"),
    ),
    (
        "decay_mixed_t64_n32",
        "per-channel decays from 1e-4 to 1-1e-6 in one head (jittered over time)",
        dict(B=1, T=64, H=1, N=32, w_mode="mixed", random_s0=True),
    ),
    (
        "decay_one_iclr_one_t64_n16",
        "w exactly 1, iclr exactly 1 (a=-kk, b=kk)",
        dict(B=1, T=64, H=1, N=16, w_mode="one", iclr_mode="one"),
    ),
    (
        "decay_near_one_t1000_n16",
        "w uniform in [1-1e-5, 1), T=1000, RWKV-7 a/b",
        dict(B=1, T=1000, H=1, N=16, w_mode="near_one", random_s0=True),
    ),
    (
        "generic_dplr_t40_n32",
        "independent random a and b (generic DPLR), random S0",
        dict(B=1, T=40, H=1, N=32, generic_ab=True, random_s0=True),
    ),
    (
        "large_kv_t33_n32",
        "RWKV-7 statistics with k*10, v*30",
        dict(B=1, T=33, H=1, N=32, kscale=10.0, vscale=30.0),
    ),
    (
        "iclr_zero_t31_n16",
        "iclr exactly 0 (b = 0)",
        dict(B=1, T=31, H=2, N=16, iclr_mode="zero", random_s0=True),
    ),
    ("iclr_one_t31_n16", "iclr exactly 1 (b = kk = -a)", dict(B=1, T=31, H=2, N=16, iclr_mode="one")),
]


def make_wkv():
    if WKV_DIR.exists():
        shutil.rmtree(WKV_DIR)
    WKV_DIR.mkdir()
    _, loop_src = _load_rwkv_pkg_loop()
    print("rwkv package WKV loop used:\n" + textwrap.indent(loop_src, "    "))
    for i, (name, desc, kw) in enumerate(WKV_CASES):
        c = make_wkv_case(1000 + i, **kw)
        log_w = np.log(c["w"].astype(np.float64))
        o_pkg, s_pkg = wkv_rwkv_pkg(c["r"], c["w"], c["k"], c["v"], c["kk"], c["iclr"], c["s0"])
        o_fla, s_fla = wkv_fla(c["r"], log_w, c["k"], c["v"], c["a"], c["b"], c["s0"])
        o64, s64 = wkv_np64(c["r"], c["w"], c["k"], c["v"], c["a"], c["b"], c["s0"])
        # the same numpy loop run in float32, to show plain float32 rounding of a sequential loop
        o32, s32 = wkv_np64(*(c[x] for x in ("r", "w", "k", "v", "a", "b", "s0")), dtype=np.float32)
        rep = dict(
            desc=desc,
            shape=[int(s) for s in c["r"].shape],
            max_abs_o=float(np.abs(o64).max()),
            max_abs_state=float(np.abs(s64).max()),
            o_rwkv_vs_np64=rel(o_pkg, o64),
            state_rwkv_vs_np64=rel(s_pkg, s64),
            o_fla_vs_np64=rel(o_fla, o64),
            state_fla_vs_np64=rel(s_fla, s64),
            o_rwkv_vs_fla=rel(o_pkg, o_fla),
            state_rwkv_vs_fla=rel(s_pkg, s_fla),
            o_np32_vs_np64=rel(o32, o64),
            state_np32_vs_np64=rel(s32, s64),
        )
        REPORT.setdefault("wkv7", {})[name] = rep
        for key in ("o_rwkv_vs_np64", "state_rwkv_vs_np64", "o_fla_vs_np64", "state_fla_vs_np64"):
            if not rep[key] < 1e-5:
                raise RuntimeError(f"{name}: oracle disagreement {key}={rep[key]:.3g}")
        np.savez_compressed(
            WKV_DIR / f"{name}.npz",
            description=np.array(desc),
            r=c["r"],
            w=c["w"],
            log_w=log_w,
            k=c["k"],
            v=c["v"],
            a=c["a"],
            b=c["b"],
            s0=c["s0"],
            o_rwkv=o_pkg,
            state_rwkv=s_pkg,
            o_fla=o_fla,
            state_fla=s_fla,
            o_np64=o64,
            state_np64=s64,
        )
        print(f"wkv7 {name}: " + ", ".join(f"{k}={v:.2e}" for k, v in rep.items() if isinstance(v, float)))


# ---------------------------------------------------------------------------------------------------------
# Part b: Qwen2 (transformers)
# ---------------------------------------------------------------------------------------------------------

QWEN_COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    max_position_embeddings=256,
    hidden_act="silu",
    use_sliding_window=False,
    attention_dropout=0.0,
)


def build_qwen2(seed: int, rope_theta: float, tied: bool, emb_std: float, head_std: float):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        **QWEN_COMMON,
        tie_word_embeddings=tied,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
    )
    cfg._attn_implementation = "eager"
    model = Qwen2ForCausalLM(cfg).eval()
    rng = np.random.default_rng(seed)
    C = cfg.hidden_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            shp = tuple(p.shape)
            if name.endswith("norm.weight") or "layernorm" in name:
                val = 1.0 + 0.2 * rng.standard_normal(shp)
            elif name.endswith(".bias"):  # q/k/v biases (HF initialises them to 0)
                val = 0.3 * rng.standard_normal(shp)
            elif "embed_tokens" in name:
                val = emb_std * rng.standard_normal(shp)
            elif name == "lm_head.weight":
                val = head_std * rng.standard_normal(shp)
            elif any(s in name for s in ("q_proj", "k_proj")):
                val = 2.0 / np.sqrt(C) * rng.standard_normal(shp)  # sharp enough attention
            else:
                val = 1.0 / np.sqrt(shp[1]) * rng.standard_normal(shp)
            p.copy_(torch.from_numpy(bf16_exact(val)))
    return model


def qwen2_np64(sd: dict, cfg: dict, tokens: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
    """Independent float64 Qwen2 forward (rwkv7-and-kernels.md 7.3). sd: HF names -> float64 arrays."""
    B, T = tokens.shape
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    C = cfg["hidden_size"]
    hd = C // nh
    eps = cfg["rms_norm_eps"]
    theta = cfg["rope_theta"]
    pos = np.broadcast_to(np.arange(T), (B, T)) if positions is None else positions
    rms = lambda x, w: w * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)
    inv = theta ** (-np.arange(0, hd, 2) / hd)
    ang = pos[..., None] * np.concatenate([inv, inv])  # [B,T,hd]
    cos, sin = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
    rope = lambda q: q * cos + np.concatenate([-q[..., hd // 2 :], q[..., : hd // 2]], -1) * sin
    x = sd["model.embed_tokens.weight"][tokens]
    causal = np.tril(np.ones((T, T), bool))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        lin = lambda n, h=h, p=p: h @ sd[p + n + ".weight"].T + sd.get(p + n + ".bias", 0.0)
        q = rope(lin("self_attn.q_proj").reshape(B, T, nh, hd))
        k = rope(lin("self_attn.k_proj").reshape(B, T, nkv, hd))
        v = lin("self_attn.v_proj").reshape(B, T, nkv, hd)
        k = np.repeat(k, nh // nkv, axis=2)
        v = np.repeat(v, nh // nkv, axis=2)
        s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
        s = np.where(causal, s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        s = s / s.sum(-1, keepdims=True)
        o = np.einsum("bhqk,bkhd->bqhd", s, v).reshape(B, T, C)
        x = x + o @ sd[p + "self_attn.o_proj.weight"].T
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        g = h @ sd[p + "mlp.gate_proj.weight"].T
        u = h @ sd[p + "mlp.up_proj.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ sd[p + "mlp.down_proj.weight"].T
    x = rms(x, sd["model.norm.weight"])
    head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    return x @ head.T


def _hf_logits(model, tokens: np.ndarray, **kw) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(tokens.astype(np.int64)), **kw).logits.numpy()


def _to_4x_config(path: Path, rope_theta: float):
    """Rewrite a transformers-5.x config.json into the transformers-4.x layout (top-level rope_theta)."""
    cfg = json.loads(path.read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = rope_theta
    cfg["rope_scaling"] = None
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    cfg["transformers_version"] = "4.45.0"
    path.write_text(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n")


def make_qwen2():
    from safetensors.numpy import load_file
    from transformers import Qwen2ForCausalLM

    rng = np.random.default_rng(7)
    B, T = 2, 24
    tokens = rng.integers(0, QWEN_COMMON["vocab_size"], (B, T)).astype(np.int32)
    # packed case: segment_ids (>=1 document id, 0 = padding), positions restart at 0 per document
    seg = np.array([[1] * 10 + [2] * 9 + [3] * 5, [1] * 15 + [2] * 6 + [0] * 3], np.int32)
    pos = np.zeros_like(seg)
    for bi in range(B):
        for t in range(1, T):
            pos[bi, t] = pos[bi, t - 1] + 1 if seg[bi, t] == seg[bi, t - 1] else 0
    out = dict(tokens=tokens, packed_segment_ids=seg, packed_positions=pos)

    specs = [  # name, seed, rope_theta, tied, emb_std, head_std
        ("untied", 11, 1e6, False, 1.0, 0.35),
        ("tied", 12, 1e4, True, 0.3, None),
    ]
    for name, seed, theta, tied, emb_std, head_std in specs:
        model = build_qwen2(seed, theta, tied, emb_std, head_std)
        d = OUT / f"qwen2_tiny_{name}"
        if d.exists():
            shutil.rmtree(d)
        model.save_pretrained(d)
        files = sorted(p.name for p in d.iterdir())
        sd = {k: v.astype(np.float64) for k, v in load_file(d / "model.safetensors").items()}
        if tied and "lm_head.weight" in sd:
            raise RuntimeError("tied model wrote lm_head.weight")
        cfg = dict(QWEN_COMMON, rope_theta=theta)
        reloaded = Qwen2ForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
        lg32 = _hf_logits(reloaded, tokens)
        lg_direct = _hf_logits(model, tokens)
        if not np.array_equal(lg32, lg_direct):
            raise RuntimeError("save/reload changed the logits")
        lg64 = _hf_logits(reloaded.double(), tokens)
        np64 = qwen2_np64(sd, cfg, tokens)
        # packed: HF with a block-diagonal causal 4D mask + restarting position_ids, and per-document runs
        lg_docs = np.zeros_like(lg32)
        for bi in range(B):
            for sid in np.unique(seg[bi]):
                if sid == 0:
                    continue
                idx = np.nonzero(seg[bi] == sid)[0]
                lg_docs[bi, idx] = _hf_logits(reloaded.float(), tokens[bi : bi + 1, idx])[0]
        same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
        allowed = same & np.tril(np.ones((T, T), bool))[None]
        allowed |= np.eye(T, dtype=bool)[None] & (seg[:, :, None] == 0)  # padding rows attend to themselves
        mask4 = torch.from_numpy(np.where(allowed, 0.0, torch.finfo(torch.float32).min).astype(np.float32))[
            :, None
        ]
        lg_packed_mask = _hf_logits(
            reloaded.float(),
            tokens,
            attention_mask=mask4,
            position_ids=torch.from_numpy(pos.astype(np.int64)),
        )
        valid = seg > 0
        np64_docs = np.zeros_like(np64)
        for bi in range(B):
            for sid in np.unique(seg[bi]):
                if sid == 0:
                    continue
                idx = np.nonzero(seg[bi] == sid)[0]
                np64_docs[bi, idx] = qwen2_np64(sd, cfg, tokens[bi : bi + 1, idx])[0]
        rep = dict(
            files=files,
            max_abs_logit=float(np.abs(np64).max()),
            hf32_vs_np64=maxabs(lg32, np64),
            hf64_vs_np64=maxabs(lg64, np64),
            hf32_vs_hf64=maxabs(lg32, lg64),
            packed_4dmask_vs_per_doc=maxabs(lg_packed_mask[valid], lg_docs[valid]),
            packed_per_doc_vs_np64=maxabs(lg_docs[valid], np64_docs[valid]),
        )
        REPORT.setdefault("qwen2", {})[name] = rep
        print(f"qwen2 {name}: {rep}")
        if rep["hf32_vs_np64"] > 1e-4 or rep["packed_4dmask_vs_per_doc"] > 1e-4:
            raise RuntimeError(f"qwen2 {name}: oracles disagree {rep}")
        out[f"{name}_logits_f32"] = lg32.astype(np.float32)
        out[f"{name}_logits_hf64"] = lg64.astype(np.float64)
        out[f"{name}_logits_np64"] = np64
        out[f"{name}_packed_logits_f32"] = np.where(valid[..., None], lg_docs, 0.0).astype(np.float32)
        if name == "untied":  # sharded copy with a transformers-4.x style config.json
            ds = OUT / "qwen2_tiny_sharded"
            if ds.exists():
                shutil.rmtree(ds)
            model.save_pretrained(ds, max_shard_size="200KB")
            _to_4x_config(ds / "config.json", theta)
            rs = Qwen2ForCausalLM.from_pretrained(ds, attn_implementation="eager").eval()
            if rs.config.rope_parameters["rope_theta"] != theta:
                raise RuntimeError("4.x config: rope_theta not picked up")
            d_sh = maxabs(_hf_logits(rs, tokens), lg32)
            REPORT["qwen2"]["sharded_4x_config_vs_untied"] = d_sh
            REPORT["qwen2"]["sharded_files"] = sorted(p.name for p in ds.iterdir())
            if d_sh != 0.0:
                raise RuntimeError(f"sharded reload differs by {d_sh}")
    np.savez_compressed(OUT / "qwen2_logits.npz", **out)


# ---------------------------------------------------------------------------------------------------------
# Part c: RWKV-7 model (rwkv package, x070 path)
# ---------------------------------------------------------------------------------------------------------


def _ortho(rng, rows, cols, gain):
    a = rng.standard_normal((max(rows, cols), min(rows, cols)))
    q, r = np.linalg.qr(a)
    q = q * np.sign(np.diag(r))
    q = q if rows >= cols else q.T
    if rows > cols:
        gain = gain * np.sqrt(rows / cols)
    return gain * q[:rows, :cols]


HEAD_BOOST = 3.0  # makes the logits O(1-5) instead of O(0.5)


def build_rwkv7_sd(seed, L, C, N, F, V, Dw, Da, Dv, Dg) -> dict[str, np.ndarray]:
    """BlinkDL init recipe (rwkv7-and-kernels.md 1.5) with random perturbations so nothing is zero."""
    rng = np.random.default_rng(seed)
    H = C // N
    n = np.arange(C)
    ddd = n / C
    linear = n / (C - 1) - 0.5
    zz = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
    zz = zz * np.abs(zz)
    jit = lambda s=0.05: s * rng.standard_normal(C)
    vec = lambda x: x.reshape(1, 1, C)
    sd = {"emb.weight": 0.5 * rng.standard_normal((V, C))}
    sd["blocks.0.ln0.weight"] = 1 + 0.1 * rng.standard_normal(C)
    sd["blocks.0.ln0.bias"] = 0.1 * rng.standard_normal(C)
    for i in range(L):
        p = f"blocks.{i}."
        r0, r1 = i / (L - 1), 1 - i / L
        sd[p + "ln1.weight"] = 1 + 0.1 * rng.standard_normal(C)
        sd[p + "ln1.bias"] = 0.1 * rng.standard_normal(C)
        sd[p + "ln2.weight"] = 1 + 0.1 * rng.standard_normal(C)
        sd[p + "ln2.bias"] = 0.1 * rng.standard_normal(C)
        for m, pw in zip("rwkvag", (0.2, 0.9, 0.7, 0.7, 0.9, 0.2), strict=True):
            sd[p + f"att.x_{m}"] = vec(np.clip(1 - ddd ** (pw * r1) + jit(0.1), 0, 1))
        www = -6 + 6 * (n / (C - 1)) ** (1 + r0**0.3)
        sd[p + "att.w0"] = vec(www + 0.5 + 2.5 * zz + jit(0.3))
        sd[p + "att.w1"] = 0.1 * rng.standard_normal((C, Dw)) / np.sqrt(C) * 3
        sd[p + "att.w2"] = _ortho(rng, Dw, C, 0.1) * 3
        sd[p + "att.a0"] = vec(-0.19 + 0.3 * zz + 0.4 * linear + jit(0.3))
        sd[p + "att.a1"] = 0.3 * rng.standard_normal((C, Da)) / np.sqrt(C)
        sd[p + "att.a2"] = _ortho(rng, Da, C, 0.3)
        sd[p + "att.v0"] = vec(0.73 - 0.4 * linear + jit(0.3))
        sd[p + "att.v1"] = 0.3 * rng.standard_normal((C, Dv)) / np.sqrt(C)
        sd[p + "att.v2"] = _ortho(rng, Dv, C, 0.3)
        sd[p + "att.g1"] = 0.3 * rng.standard_normal((C, Dg)) / np.sqrt(C)
        sd[p + "att.g2"] = _ortho(rng, Dg, C, 0.3)
        sd[p + "att.k_k"] = vec(0.71 - 0.1 * linear + jit())
        sd[p + "att.k_a"] = vec(1.02 + jit())
        sd[p + "att.r_k"] = -0.04 + 0.3 * rng.standard_normal((H, N))
        sd[p + "att.receptance.weight"] = _ortho(rng, C, C, 1.0)
        sd[p + "att.key.weight"] = _ortho(rng, C, C, 0.5)
        sd[p + "att.value.weight"] = _ortho(rng, C, C, 1.0)
        sd[p + "att.output.weight"] = _ortho(rng, C, C, 0.5)
        sd[p + "att.ln_x.weight"] = ((i + 1) / L) ** 0.7 + jit(0.1)
        sd[p + "att.ln_x.bias"] = jit(0.1)
        sd[p + "ffn.x_k"] = vec(np.clip(1 - ddd ** (r1**4) + jit(0.1), 0, 1))
        sd[p + "ffn.key.weight"] = _ortho(rng, F, C, 1.0)
        sd[p + "ffn.value.weight"] = _ortho(rng, C, F, 0.5)
    sd["ln_out.weight"] = 1 + 0.1 * rng.standard_normal(C)
    sd["ln_out.bias"] = 0.1 * rng.standard_normal(C)
    sd["head.weight"] = _ortho(rng, V, C, 0.5 * HEAD_BOOST)  # recipe gain 0.5*sqrt(V/C) (V > C), boosted
    return {k: bf16_exact(v) for k, v in sd.items()}


def rwkv7_np64(sd: dict, tokens, state=None):
    """Independent float64 RWKV-7 forward (rwkv7-and-kernels.md 7.2). Returns logits [T,V], state list."""
    f = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    H, N = f["blocks.0.att.r_k"].shape
    C = H * N
    L = 1 + max(int(k.split(".")[1]) for k in f if k.startswith("blocks."))
    ln = lambda x, w, b, eps=1e-5: (
        (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * w + b
    )
    sig = lambda x: 1 / (1 + np.exp(-x))
    x = ln(f["emb.weight"][np.asarray(tokens)], f["blocks.0.ln0.weight"], f["blocks.0.ln0.bias"])
    T = x.shape[0]
    if state is None:
        state = [np.zeros(C), np.zeros((H, N, N)), np.zeros(C)] * L
    state = [np.asarray(s, np.float64).copy() for s in state]
    v_first = None
    shift = lambda xa, prev: np.concatenate([prev[None], xa[:-1]]) - xa
    for i in range(L):
        p = f"blocks.{i}.att."
        g_ = lambda n, p=p: f[p + n].reshape(-1) if f[p + n].ndim == 3 else f[p + n]
        xa = ln(x, f[f"blocks.{i}.ln1.weight"], f[f"blocks.{i}.ln1.bias"])
        dx = shift(xa, state[3 * i])
        xr, xw, xk, xv, xa_, xg = (xa + dx * g_("x_" + m) for m in "rwkvag")
        r = xr @ f[p + "receptance.weight"].T
        k = xk @ f[p + "key.weight"].T
        v = xv @ f[p + "value.weight"].T
        w = np.exp(-0.606531 * sig(g_("w0") + np.tanh(xw @ f[p + "w1"]) @ f[p + "w2"]))
        iclr = sig(g_("a0") + (xa_ @ f[p + "a1"]) @ f[p + "a2"])
        g = sig(xg @ f[p + "g1"]) @ f[p + "g2"]
        kk = (k * g_("k_k")).reshape(T, H, N)
        kk = (kk / np.maximum(np.linalg.norm(kk, axis=-1, keepdims=True), 1e-12)).reshape(T, C)
        k = k * (1 + (iclr - 1) * g_("k_a"))
        if i == 0:
            v_first = v
        else:
            v = v + (v_first - v) * sig(g_("v0") + (xv @ f[p + "v1"]) @ f[p + "v2"])
        rs = lambda z: z.reshape(1, T, H, N)
        o, S = wkv_np64(rs(r), rs(w), rs(k), rs(v), rs(-kk), rs(kk * iclr), state[3 * i + 1][None])
        o = o[0]
        mu = o.mean(-1, keepdims=True)
        y = ((o - mu) / np.sqrt(o.var(-1, keepdims=True) + 64e-5)).reshape(T, C) * f[p + "ln_x.weight"]
        y = y + f[p + "ln_x.bias"]
        y = y + (
            (r * k * f[p + "r_k"].reshape(C)).reshape(T, H, N).sum(-1, keepdims=True) * v.reshape(T, H, N)
        ).reshape(T, C)
        x = x + (y * g) @ f[p + "output.weight"].T
        xf = ln(x, f[f"blocks.{i}.ln2.weight"], f[f"blocks.{i}.ln2.bias"])
        kf = xf + shift(xf, state[3 * i + 2]) * f[f"blocks.{i}.ffn.x_k"].reshape(C)
        x = (
            x
            + np.maximum(kf @ f[f"blocks.{i}.ffn.key.weight"].T, 0) ** 2 @ f[f"blocks.{i}.ffn.value.weight"].T
        )
        state[3 * i], state[3 * i + 1], state[3 * i + 2] = xa[-1], S[0], xf[-1]
    return ln(x, f["ln_out.weight"], f["ln_out.bias"]) @ f["head.weight"].T, state


RWKV_SPECS = {  # name: (seed, L, C, N, F, V, Dw, Da, Dv, Dg)
    "a": (21, 3, 128, 64, 512, 256, 32, 24, 16, 40),
    "b": (22, 2, 128, 32, 448, 256, 32, 32, 32, 64),
}


def make_rwkv7():
    from rwkv.model import RWKV
    from safetensors.numpy import save_file

    rng = np.random.default_rng(31)
    T, split = 24, 10
    out = {}
    for name, (seed, L, C, N, F, V, Dw, Da, Dv, Dg) in RWKV_SPECS.items():
        sd = build_rwkv7_sd(seed, L, C, N, F, V, Dw, Da, Dv, Dg)
        save_file(sd, str(OUT / f"rwkv7_tiny_{name}.safetensors"))
        tokens = rng.integers(0, V, T).astype(np.int32)
        with tempfile.TemporaryDirectory() as tmp:
            base = os.path.join(tmp, f"rwkv7_tiny_{name}")
            torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, base + ".pth")
            model = RWKV(model=base, strategy="cpu fp32")  # the package appends '.pth' itself
        clone = lambda st: [s.clone() for s in st]
        tl = [int(t) for t in tokens]
        seq, st = model.forward(tl, None, full_output=True)
        seq, st = seq.numpy(), clone(st)
        rnn, st_r = [], None
        for t in tl:
            lg, st_r = model.forward([t], st_r)
            rnn.append(lg.numpy())
            st_r = clone(st_r)
        rnn = np.stack(rnn)
        _, st_mid = model.forward(tl[:split], None, full_output=True)
        st_mid = clone(st_mid)
        resumed, st_res = model.forward(tl[split:], clone(st_mid), full_output=True)
        resumed = resumed.numpy()
        from_zero = model.forward(tl[split:], None, full_output=True)[0].numpy()  # proves the state matters
        np64, st64 = rwkv7_np64(sd, tokens)
        _, st64_mid = rwkv7_np64(sd, tokens[:split])
        res64, _ = rwkv7_np64(sd, tokens[split:], st64_mid)
        stack = lambda s, j, L=L: np.stack([np.asarray(s[3 * i + j]) for i in range(L)])
        rep = dict(
            max_abs_logit=float(np.abs(np64).max()),
            seq_vs_np64=maxabs(seq, np64),
            rnn_vs_np64=maxabs(rnn, np64),
            seq_vs_rnn=maxabs(seq, rnn),
            resumed_vs_np64=maxabs(resumed, np64[split:]),
            resumed_np64_vs_full_np64=maxabs(res64, np64[split:]),
            resumed_vs_seq=maxabs(resumed, seq[split:]),
            state_effect=maxabs(from_zero, seq[split:]),
            att_kv_vs_np64=maxabs(stack(st, 1), stack(st64, 1)),
            max_abs_att_kv=float(np.abs(stack(st64, 1)).max()),
            att_x_vs_np64=maxabs(stack(st, 0), stack(st64, 0)),
            ffn_x_vs_np64=maxabs(stack(st, 2), stack(st64, 2)),
        )
        REPORT.setdefault("rwkv7", {})[name] = rep
        print(f"rwkv7 {name}: {rep}")
        if max(v for k, v in rep.items() if "_vs_" in k) > 1e-4:
            raise RuntimeError(f"rwkv7 {name}: oracles disagree {rep}")
        if rep["state_effect"] < 0.1:
            raise RuntimeError(f"rwkv7 {name}: resuming from the mid state makes no difference {rep}")
        out[f"{name}_tokens"] = tokens
        out[f"{name}_logits_seq"] = seq.astype(np.float32)
        out[f"{name}_logits_rnn"] = rnn.astype(np.float32)
        out[f"{name}_logits_np64"] = np64
        out[f"{name}_split"] = np.array(split, np.int32)
        out[f"{name}_logits_resumed"] = resumed.astype(np.float32)
        for tag, s in (("final", st), ("mid", st_mid)):
            out[f"{name}_{tag}_att_x"] = stack(s, 0).astype(np.float32)
            out[f"{name}_{tag}_att_kv"] = stack(s, 1).astype(np.float32)
            out[f"{name}_{tag}_ffn_x"] = stack(s, 2).astype(np.float32)
        out[f"{name}_final_att_kv_np64"] = stack(st64, 1)
    np.savez_compressed(OUT / "rwkv7_logits.npz", **out)


def main():
    import rwkv
    import transformers

    versions = dict(
        python=sys.version.split()[0],
        torch=torch.__version__,
        numpy=np.__version__,
        transformers=transformers.__version__,
        rwkv=_dist_version("rwkv"),
        fla_core=_dist_version("fla-core"),
        einops=_dist_version("einops"),
        safetensors=_dist_version("safetensors"),
    )
    print(versions)
    _ = rwkv
    make_wkv()
    make_qwen2()
    make_rwkv7()
    REPORT["versions"] = versions
    (OUT / "oracle_report.json").write_text(json.dumps(REPORT, indent=1, sort_keys=True) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"total size of tests/golden: {total / 1e6:.2f} MB")


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
