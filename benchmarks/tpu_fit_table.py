"""Which TPU slice does the train step fit on, and how fast would it run there? Qwen2.5-0.5B / 1.5B / 7B shapes as
``qwen2`` and ``wuneng``, sequence 4096 / 8192 / 32768, v5e / v5p / v6e: every cell a full-depth compile.

    python3 benchmarks/tpu_fit_table.py                                  # every cell (resumable, cached)
    python3 benchmarks/tpu_fit_table.py --presets wuneng-1.5b --seq-lens 4096 --generations v5p
    python3 benchmarks/tpu_fit_table.py --markdown                       # the tables from the cache only

Settings of every train step (``wuneng compile configs/demo.yaml topology=... model=<preset> seq_len=<T>
global_batch_size=<chips> dtype=bfloat16 remat=full mesh.data=1 mesh.fsdp=<chips>``): one sequence per chip,
FSDP over every chip (float32 parameters, gradients and both Adam moments sharded ``1/chips``), bfloat16
compute, full per-layer rematerialisation, the layers scanned, the vocabulary-tiled loss, the TPU kernels
(splash attention, Pallas ``wkv7``).

Each cell walks the generation's standard slices from the smallest: a slice whose parameters and Adam
moments alone (12 bytes per parameter / chips, held as arguments whatever else happens) exceed the usable HBM
is skipped by that arithmetic; every other slice is compiled at full depth (one child process per compile,
``benchmarks/long_context.py``'s ``compile_one``, with a wall-clock limit) until the TPU compiler says it fits.
"Fits" is the compiler's verdict against the HBM it lets a program use (its own out-of-memory message: v5e
15.75 GiB, v6e 31.25 GiB, v5p 95.74 GiB). For the fitting slice the table gives the per-chip total and the
largest buffer, and the speed table the predicted step time, tokens/s per chip and MFU
(``benchmarks/roofline.py``: the compiler's HLO costed per instruction at the chip's peak FLOP/s, HBM and ICI
bandwidth; estimates, not measurements). Results: ``benchmarks/results/tpu_fit_table.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.long_context import GIB, Point, Progress, chips_of, host_info, run_point, verdict  # noqa: E402
from benchmarks.roofline import costed_as_current  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "tpu_fit_table.json"
CASES = (  # (shape, family, preset)
    ("Qwen2.5-0.5B", "qwen2", "qwen2.5-0.5b"),
    ("Qwen2.5-0.5B", "wuneng", "wuneng-0.5b"),
    ("Qwen2.5-1.5B", "qwen2", "qwen2.5-1.5b"),
    ("Qwen2.5-1.5B", "wuneng", "wuneng-1.5b"),
    ("Qwen2.5-7B", "qwen2", "qwen2.5-7b"),
    ("Qwen2.5-7B", "wuneng", "wuneng-7b"),
)
SEQ_LENS = (4096, 8192, 32768)
GENERATIONS = ("v5e", "v5p", "v6e")
BYTES_LOWER_BOUND = 12  # per parameter: float32 parameter + two Adam moments, arguments of every step


def n_params(preset: str) -> int:
    from wuneng_jax import config as mc

    return int(mc.count_params(mc.preset(preset)))


def cell_points(preset: str, seq_len: int, gen: str) -> list[Point]:
    """The slices a cell walks, smallest first, one sequence per chip."""
    from train.aot.topology import CHIPS

    out = []
    for dims in CHIPS[gen].slices:
        topology = f"{gen}:{dims}"
        out.append(Point(preset, topology, chips_of(topology), seq_len, 1, "splash"))
    return out


class Cache:
    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        self.data.setdefault("compiles", {})
        self.data.setdefault("usable_hbm", {})
        self.data["settings"] = {
            "dtype": "bfloat16",
            "remat": "full",
            "mesh": "data=1, fsdp=all chips",
            "rows_per_chip": 1,
            "depth": "full (every compile)",
        }

    def save(self) -> None:
        self.data["host"] = host_info()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


def usable_hbm(cache: Cache, gen: str) -> int:
    """HBM the TPU compiler lets one program use on a chip of ``gen`` (from its out-of-memory message)."""
    if gen in cache.data["usable_hbm"]:
        return int(cache.data["usable_hbm"][gen])
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from train.aot.compile import platform_defaults
    from train.aot.memory import parse_out_of_memory
    from train.aot.topology import CHIPS, topology_devices

    platform_defaults()
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


def search(cache: Cache, args: argparse.Namespace, preset: str, seq_len: int, gen: str) -> dict[str, Any]:
    """Walk the cell's slices (module docstring); every verdict the walk made, in order."""
    hbm = usable_hbm(cache, gen)
    n = n_params(preset)
    tried: list[dict[str, Any]] = []
    for point in cell_points(preset, seq_len, gen):
        if BYTES_LOWER_BOUND * n / point.chips > hbm:
            tried.append({"topology": point.topology, "key": None, "status": "state alone exceeds the HBM"})
            continue
        entry = cache.data["compiles"].get(point.key)
        if entry is None or args.redo or (entry["status"] in ("timeout", "crashed") and not args.skip_failed):
            print(f"  compiling {point.key} ...", flush=True)
            entry = run_point(point, args.timeout, None)
            cache.data["compiles"][point.key] = entry
            cache.save()
        print(f"    {point.topology}: {verdict(entry)}", flush=True)
        tried.append({"topology": point.topology, "key": point.key, "status": entry["status"]})
        if entry["status"] != "does not fit":
            break  # fits, or a compile that timed out / crashed: no verdict above it
    return {"preset": preset, "seq_len": seq_len, "generation": gen, "usable_hbm": hbm, "tried": tried}


def fitting(cache: Cache, row: dict[str, Any]) -> dict[str, Any] | None:
    last = row["tried"][-1] if row["tried"] else None
    if last is None or last["status"] != "fits":
        return None
    return cache.data["compiles"][last["key"]]


def _gib(n: float | None) -> str:
    return "—" if n is None else f"{n / GIB:.2f} GiB"


def _largest(entry: dict[str, Any]) -> list[str]:
    """The largest buffer (a parameter or moment shard: an argument) and the largest temporary, where known."""
    big = (entry.get("largest") or [{}])[0]
    parts = [f"largest {big['nbytes'] / 2**20:,.0f} MiB ({big['kind']})"] if big.get("nbytes") else []
    temp = (entry.get("largest_temporaries") or [{}])[0]
    if temp.get("nbytes") and (temp.get("name"), temp.get("nbytes")) != (big.get("name"), big.get("nbytes")):
        parts.append(f"temporary {temp['nbytes'] / 2**20:,.0f} MiB")
    return parts


def markdown(cache: Cache) -> str:
    """The fit table and the predicted-speed table from the cache."""
    rows = {(r["preset"], r["seq_len"], r["generation"]): r for r in cache.data.get("table", [])}
    gens = [g for g in GENERATIONS if g in cache.data["usable_hbm"]]
    head = " | ".join(f"{g} ({cache.data['usable_hbm'][g] / GIB:.2f} GiB usable)" for g in gens)
    fit = [f"| model | family | seq | {head} |", "|" + "---|" * (3 + len(gens))]
    fast = [
        "| model | family | seq | " + " | ".join(f"{g}: step s · tokens/s/chip · MFU" for g in gens) + " |",
        "|" + "---|" * (3 + len(gens)),
    ]
    speed: dict[tuple[str, int, str], float] = {}
    for shape, family, preset in CASES:
        for seq in SEQ_LENS:
            fit_cells, fast_cells = [], []
            for g in gens:
                row = rows.get((preset, seq, g))
                e = fitting(cache, row) if row else None
                if row is None:
                    fit_cells.append("not run")
                    fast_cells.append("—")
                    continue
                if e is None:
                    last = row["tried"][-1] if row["tried"] else {"topology": "?", "status": "none tried"}
                    fit_cells.append(f"{last['status']} at {last['topology']}")
                    fast_cells.append("—")
                    continue
                below = [t for t in row["tried"][:-1]]
                note = ""
                if below:
                    b = below[-1]
                    used = cache.data["compiles"].get(b["key"] or "", {}).get("used_bytes")
                    note = f"; {b['topology']}: " + (
                        f"does not fit ({_gib(used)})" if b["status"] == "does not fit" else b["status"]
                    )
                fit_cells.append(
                    ", ".join([f"**{e['topology']}** {_gib(e['used_bytes'])}", *_largest(e)]) + note
                )
                p = e.get("predicted") or {}
                if p.get("step_s") and not costed_as_current(p, e["chips"]):
                    fast_cells.append(f"(roofline v{p.get('roofline', 1)}: rerun)")
                elif p.get("step_s"):
                    speed[(preset, seq, g)] = p["tokens_per_s_per_chip"]
                    ratio = ""
                    twin = next((q for sh, fam, q in CASES if sh == shape and fam == "qwen2"), None)
                    if family == "wuneng" and (twin, seq, g) in speed:
                        ratio = f" · **{speed[(twin, seq, g)] / p['tokens_per_s_per_chip']:.2f}× qwen2**"
                    fast_cells.append(
                        f"{p['step_s']:.2f} · {p['tokens_per_s_per_chip']:,.0f} · {100 * p['mfu']:.0f} %{ratio}"
                    )
                else:
                    fast_cells.append("—")
            if all(c == "not run" for c in fit_cells):
                continue
            fit.append(f"| {shape} | {family} | {seq} | " + " | ".join(fit_cells) + " |")
            fast.append(f"| {shape} | {family} | {seq} | " + " | ".join(fast_cells) + " |")
    return "\n".join(fit) + "\n\n" + "\n".join(fast)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--generations", nargs="*", default=["v5p", "v6e", "v5e"])
    p.add_argument("--presets", nargs="*", default=[c[2] for c in CASES])
    p.add_argument("--seq-lens", nargs="*", type=int, default=list(SEQ_LENS))
    p.add_argument("--timeout", type=float, default=1800.0, help="wall-clock seconds per compile")
    p.add_argument("--redo", action="store_true", help="recompile cached points")
    p.add_argument("--skip-failed", action="store_true", help="keep cached timeouts/crashes")
    p.add_argument("--markdown", action="store_true", help="only print the tables from the cache")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    cache = Cache(Path(args.out))
    if args.markdown:
        print(markdown(cache))
        return 0
    rows = {(r["preset"], r["seq_len"], r["generation"]): r for r in cache.data.get("table", [])}
    cells = [  # in the order of --generations, then sequence length, then model
        (preset, seq, gen)
        for gen in args.generations
        for seq in args.seq_lens
        for _, _, preset in CASES
        if preset in args.presets
    ]
    prog = Progress(len(cells), unit="cells")
    for preset, seq, gen in cells:
        print(f"{preset} T={seq} {gen}:", flush=True)
        t0 = time.perf_counter()  # wall time of this cell (a --redo replaces cached compile times)
        row = search(cache, args, preset, seq, gen)
        rows[(preset, seq, gen)] = row
        cache.data["table"] = list(rows.values())
        cache.save()
        spent = time.perf_counter() - t0
        print(
            f"{prog.step(spent if spent > 1.0 else None)}  {preset} T={seq} {gen}: {row['tried'][-1]}",
            flush=True,
        )
    print(markdown(cache))
    return 0


if __name__ == "__main__":
    sys.exit(main())
