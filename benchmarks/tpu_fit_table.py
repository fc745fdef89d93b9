"""Which TPU slice does the train step fit on? Qwen2.5-1.5B / 7B shapes as ``qwen2`` and ``wuneng``.

    python3 benchmarks/tpu_fit_table.py                  # calibrate + derive + confirm (resumable, cached)
    python3 benchmarks/tpu_fit_table.py --markdown       # print the table from the cache only
    python3 benchmarks/tpu_fit_table.py --full           # real full-depth search of every cell (slow)

Settings of every train step (``wuneng compile`` with ``dtype=bfloat16 remat=full mesh.data=1 mesh.fsdp=-1
global_batch_size=<chips>``): one sequence per chip, FSDP over every chip (float32 parameters, gradients and
both Adam moments sharded ``1/chips``), bfloat16 compute, full per-layer rematerialisation, the TPU kernels
(splash attention, Pallas ``wkv7``). "Fits" is the TPU compiler's verdict against the HBM it lets a program
use (read from its own out-of-memory message: v5e 15.75 GiB, v6e 31.25 GiB, v5p below 95 GiB).

Compiling a full 28-layer model takes ~8 CPU-minutes on the 2-core machine this table was made on (the
layers are unrolled), so the default mode compiles less and derives the rest, and says which is which:

1. calibrate: each (model, sequence length) is compiled with ``--calib-layers`` (2) layers on
   ``--calib-topology`` (v5p:2x2x1, 4 chips, where everything fits), giving the per-chip memory of
   everything that does not grow with depth (embedding, logits and loss, one layer's working set);
2. derive: each further layer adds exactly its float32 parameter, gradient and two moment shards
   (16 bytes per parameter / chips) and its saved input (remat=full keeps the layer's float32 residual
   input, ``4 · T · d`` bytes per sequence); the state share scales as ``16 · N / chips``. This gives the
   per-chip memory of the full model on every slice; the smallest listed slice at least ``--margin`` (5 %)
   under the usable HBM wins (a derived total within the margin is reported as borderline).
   (Checked against full-depth compiles: ``--validate``; the JSON records the error.)
3. confirm: ``--confirm`` cells are compiled at full depth on the derived slice (it must fit) and on the
   next smaller one (it must not); the table marks confirmed cells.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from train.aot.compile import platform_defaults  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "tpu_fit_table.json"
CASES = (  # (shape, family, preset)
    ("Qwen2.5-1.5B", "qwen2", "qwen2.5-1.5b"),
    ("Qwen2.5-1.5B", "wuneng", "wuneng-1.5b"),
    ("Qwen2.5-7B", "qwen2", "qwen2.5-7b"),
    ("Qwen2.5-7B", "wuneng", "wuneng-7b"),
)
SEQ_LENS = (4096, 8192)
GENERATIONS = ("v5e", "v5p", "v6e")
SETTINGS = {"dtype": "bfloat16", "remat": "full", "mesh": "data=1, fsdp=all chips", "rows_per_chip": 1}
STATE_BYTES = 16  # per parameter: float32 parameter + gradient + two Adam moments
RESIDUAL_BYTES = 4  # per saved element of a layer's float32 residual input (remat=full)
BYTES_LOWER_BOUND = 12  # parameter + moments: held as arguments whatever else happens


@dataclasses.dataclass(frozen=True)
class Facts:
    n_params: int
    layers: int
    layer_params: int  # parameters of one decoder layer
    hidden: int


@functools.cache
def model_facts(preset: str) -> Facts:
    """Parameter counts of a preset without building it (``jax.eval_shape``)."""
    import dataclasses as dc

    from wuneng_jax import config as mc

    cfg = mc.preset(preset)
    n1 = mc.count_params(dc.replace(cfg, num_layers=1))
    n2 = mc.count_params(dc.replace(cfg, num_layers=2))
    return Facts(mc.count_params(cfg), int(cfg.num_layers), n2 - n1, int(cfg.hidden_size))


def train_config(preset: str, seq_len: int, chips: int, layers: int | None):
    from train.config import load_config

    model: dict[str, Any] = {"preset": preset}
    if layers is not None:
        model["num_layers"] = layers
    return load_config(
        {
            "run_dir": "unused",
            "model": model,
            "data": {"store": "unused"},
            "steps": 1000,
            "global_batch_size": chips,
            "seq_len": seq_len,
            "dtype": "bfloat16",
            "remat": "full",
            "mesh": {"data": 1, "fsdp": -1},
        }
    )


class Cache:
    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        for key in ("compiles", "usable_hbm", "table", "validation"):
            self.data.setdefault(key, {} if key != "table" else [])
        self.data["settings"] = SETTINGS

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1, sort_keys=True))


def usable_hbm(cache: Cache, gen: str) -> int:
    """HBM the TPU compiler lets one program use on a chip of ``gen`` (from its out-of-memory message)."""
    if gen in cache.data["usable_hbm"]:
        return int(cache.data["usable_hbm"][gen])
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from train.aot.memory import parse_out_of_memory
    from train.aot.topology import CHIPS, topology_devices

    chip = CHIPS[gen]
    mesh = Mesh(np.array(topology_devices(f"{gen}:{chip.slices[1]}")[:1]), ("x",))
    rows = int(chip.hbm_bytes * 0.6) // 4096  # f32 [rows, 1024]: in + out = 1.2 x HBM
    x = jax.ShapeDtypeStruct((rows, 1024), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
    try:
        jax.jit(lambda a: a * 2).trace(x).lower().compile()
        raise RuntimeError(f"{gen}: a program larger than the HBM compiled")
    except Exception as e:
        _, have = parse_out_of_memory(e)
        if have is None:
            raise
    cache.data["usable_hbm"][gen] = have
    cache.save()
    return have


def compile_point(
    cache: Cache, preset: str, seq_len: int, topology: str, layers: int | None
) -> dict[str, Any]:
    """One compile of the train step (cached by key): ``layers`` None = the full model."""
    from train.aot.compile import build_train, compile_train
    from train.aot.topology import parse_topology

    key = f"{preset}|{seq_len}|{topology}|{layers or 'full'}"
    if key in cache.data["compiles"]:
        return cache.data["compiles"][key]
    topo = parse_topology(topology)
    t0 = time.perf_counter()
    target = build_train(train_config(preset, seq_len, topo.num_chips, layers), topo)
    report, _ = compile_train(target)
    entry = {
        "status": report.status,
        "memory": report.memory.to_dict() if report.memory else None,
        "used_bytes": report.used_bytes,
        "available_bytes": report.available_bytes,
        "compile_s": round(report.compile_s, 1),
        "total_s": round(time.perf_counter() - t0, 1),
        "mesh": dict(target.mesh.shape),
        "impls": target.impls,
        "largest": [dataclasses.asdict(b) for b in report.largest[:4]],
        "error": report.error if report.status == "compile error" else None,
    }
    cache.data["compiles"][key] = entry
    cache.save()
    print(
        f"  compiled {key}: {entry['status']}, {entry['used_bytes']} B/chip, {entry['compile_s']} s",
        flush=True,
    )
    return entry


def derived_bytes(cache: Cache, args, preset: str, seq_len: int, chips: int) -> int | None:
    """Per-chip memory of the full-depth step on ``chips`` chips (calibration compile + exact accounting)."""
    from train.aot.topology import parse_topology

    facts = model_facts(preset)
    calib = parse_topology(args.calib_topology)
    e = compile_point(cache, preset, seq_len, calib.name, args.calib_layers)
    if e["status"] != "fits":
        return None
    n0 = calib.num_chips
    per_layer = STATE_BYTES * facts.layer_params / n0 + RESIDUAL_BYTES * seq_len * facts.hidden
    full = e["used_bytes"] + (facts.layers - args.calib_layers) * per_layer
    return int(full - STATE_BYTES * facts.n_params / n0 + STATE_BYTES * facts.n_params / chips)


def search(
    cache: Cache, args, shape: str, family: str, preset: str, seq_len: int, gen: str
) -> dict[str, Any]:
    from train.aot.topology import CHIPS, parse_topology

    hbm = usable_hbm(cache, gen)
    facts = model_facts(preset)
    tried: list[dict[str, Any]] = []
    for dims in CHIPS[gen].slices:
        topo = parse_topology(f"{gen}:{dims}")
        if BYTES_LOWER_BOUND * facts.n_params / topo.num_chips > hbm:
            tried.append({"topology": topo.name, "fits": False, "used": None, "how": "state alone"})
            continue
        if args.full or f"{preset}|{seq_len}|{topo.name}|full" in cache.data["compiles"]:
            # a full-depth compile (asked for, or already made by --validate / --confirm) beats a derivation
            e = compile_point(cache, preset, seq_len, topo.name, None)
            tried.append(
                {
                    "topology": topo.name,
                    "fits": e["status"] == "fits",
                    "used": e["used_bytes"],
                    "how": "compiled",
                }
            )
        else:
            used, how = derived_bytes(cache, args, preset, seq_len, topo.num_chips), "derived"
            base = _attention_twin(shape, family)
            anchor = cache.data["compiles"].get(f"{base}|{seq_len}|{topo.name}|full") if base else None
            if used is not None and anchor and anchor["used_bytes"]:
                # the qwen2 twin's full-depth compile + the derived WuNeng-minus-qwen2 difference
                twin = derived_bytes(cache, args, base, seq_len, topo.num_chips)
                if twin is not None:
                    used, how = anchor["used_bytes"] + used - twin, "derived from the qwen2 compile"
            fits = used is not None and used <= (1 - args.margin) * hbm
            if not fits and used is not None and used <= hbm:
                how += ", borderline"
            tried.append({"topology": topo.name, "fits": fits, "used": used, "how": how})
        if tried[-1]["fits"]:
            break
    answer = next((t for t in tried if t["fits"]), None)
    return {
        "shape": shape,
        "family": family,
        "preset": preset,
        "seq_len": seq_len,
        "generation": gen,
        "usable_hbm": hbm,
        "answer": answer,
        "tried": tried,
    }


def _attention_twin(shape: str, family: str) -> str | None:
    """The qwen2 preset of the same shape as a wuneng one (None for qwen2 itself)."""
    if family != "wuneng":
        return None
    return next((p for sh, fam, p in CASES if sh == shape and fam == "qwen2"), None)


def confirm(cache: Cache, row: dict[str, Any]) -> None:
    """Compile the derived answer (and the slice below it) at full depth; record the compiler's verdicts."""
    answer = row["answer"]
    if answer is None:
        return
    names = [t["topology"] for t in row["tried"]]
    i = names.index(answer["topology"])
    checks = {}
    for t in row["tried"][max(i - 1, 0) : i + 1]:
        if t["how"] == "state alone":
            continue
        e = compile_point(cache, row["preset"], row["seq_len"], t["topology"], None)
        checks[t["topology"]] = {"status": e["status"], "used": e["used_bytes"]}
    row["confirmed"] = checks


def validate(cache: Cache, args, item: str) -> None:
    """Compare the derived per-chip memory with a full-depth compile (``PRESET:SEQ:TOPOLOGY``)."""
    from train.aot.topology import parse_topology

    preset, seq, topology = item.split(":", 2)
    topo = parse_topology(topology)
    e = compile_point(cache, preset, int(seq), topo.name, None)
    derived = derived_bytes(cache, args, preset, int(seq), topo.num_chips)
    cache.data["validation"][item] = {
        "compiled": e["used_bytes"],
        "derived": derived,
        "relative_error": None if not (derived and e["used_bytes"]) else derived / e["used_bytes"] - 1,
    }
    cache.save()


def markdown(cache: Cache) -> str:
    from train.aot.memory import fmt_bytes

    by = {(r["preset"], r["seq_len"], r["generation"]): r for r in cache.data.get("table", [])}
    gens = [g for g in GENERATIONS if any(k[2] == g for k in by)]
    hbm = {g: fmt_bytes(cache.data["usable_hbm"][g]) for g in gens}
    head = "| model | family | seq | " + " | ".join(f"{g} ({hbm[g]} usable)" for g in gens) + " |"
    lines = [head, "|" + "---|" * (3 + len(gens))]
    for shape, family, preset in CASES:
        for seq in SEQ_LENS:
            cells = []
            for g in gens:
                r = by.get((preset, seq, g))
                if r is None:
                    cells.append("—")
                elif r["answer"] is None:
                    cells.append(f"> {r['tried'][-1]['topology']}")
                else:
                    a = r["answer"]
                    chips = 1
                    for d in a["topology"].split(":")[1].split("x"):
                        chips *= int(d)
                    mark = ""
                    conf = r.get("confirmed", {})
                    if conf.get(a["topology"], {}).get("status") == "fits":
                        mark = " ✓"
                        below = [k for k in conf if k != a["topology"]]
                        if below and conf[below[0]]["status"] == "does not fit":
                            mark = " ✓✓"
                    note = "".join(
                        f" ({t['topology']}: {fmt_bytes(t['used'])}, borderline)"
                        for t in r["tried"]
                        if t["how"].endswith("borderline")
                    )
                    if a["how"] == "compiled":
                        mark = mark or " ✓"
                    elif a["how"].startswith("derived from the qwen2"):
                        mark = " †"
                    note += "".join(
                        f" ({t['topology']}: does not fit, {fmt_bytes(t['used'])} compiled)"
                        for t in r["tried"]
                        if t["how"] == "compiled" and not t["fits"] and t["used"]
                    )
                    cells.append(f"**{a['topology']}** (fsdp={chips}) {fmt_bytes(a['used'])}{mark}{note}")
            lines.append(f"| {shape} | {family} | {seq} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--generations", nargs="*", default=list(GENERATIONS))
    p.add_argument("--presets", nargs="*", default=[c[2] for c in CASES])
    p.add_argument("--seq-lens", nargs="*", type=int, default=list(SEQ_LENS))
    p.add_argument("--calib-layers", type=int, default=2)
    p.add_argument("--calib-topology", default="v5p:2x2x1")
    p.add_argument("--full", action="store_true", help="compile every point at full depth (slow)")
    p.add_argument(
        "--margin",
        type=float,
        default=0.05,
        help="derived totals this close under the HBM count as borderline",
    )
    p.add_argument("--confirm", nargs="*", default=[], metavar="PRESET:SEQ:GEN", help="cells to confirm")
    p.add_argument("--validate", nargs="*", default=[], metavar="PRESET:SEQ:TOPOLOGY")
    p.add_argument("--markdown", action="store_true", help="only print the table from the cache")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    cache = Cache(Path(args.out))
    if args.markdown:
        print(markdown(cache))
        return 0
    platform_defaults()
    for item in args.validate:  # first: the search below uses every full-depth compile
        validate(cache, args, item)
    rows = {(r["preset"], r["seq_len"], r["generation"]): r for r in cache.data["table"]}
    for shape, family, preset in CASES:
        if preset not in args.presets:
            continue
        for seq in args.seq_lens:
            for gen in args.generations:
                old = rows.get((preset, seq, gen), {})
                row = search(cache, args, shape, family, preset, seq, gen)
                if "confirmed" in old:
                    row["confirmed"] = old["confirmed"]
                if f"{preset}:{seq}:{gen}" in args.confirm:
                    confirm(cache, row)
                rows[(preset, seq, gen)] = row
                cache.data["table"] = list(rows.values())
                cache.save()
                print(f"{shape} {family} T={seq} {gen}: {row['answer']}", flush=True)
    print(markdown(cache))
    return 0


if __name__ == "__main__":
    sys.exit(main())
