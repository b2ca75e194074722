"""Time and peak memory of `synthpert data from-anndata` on synthetic screens of growing cell counts.

    .venv/bin/python scripts/bench_screen.py         # 50,000 and 200,000 cells x 5,000 genes, 500 perturbations
    .venv/bin/python scripts/bench_screen.py --cells 20000 --genes 1000 --perturbations 50   # a quick look

Each screen is written chunk by chunk (sparse CSR; its generation never holds the whole matrix), then called
in a fresh child process that reports its own wall time and peak RSS (resource.getrusage), beside a child
that only imports the same modules (the interpreter's and libraries' share of the peak). The claim checked:
peak RSS does not grow with the number of cells, only with perturbations x genes.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
from synthpert.screen import ScreenOptions, from_anndata
if sys.argv[1] != "--import-only":
    s = from_anndata(sys.argv[1], sys.argv[2], ScreenOptions("perturbation", "non-targeting", "bench",
                                                             split_half=sys.argv[3] == "1"))
    extra = {"pairs": s["de"]["pairs"], "de": s["de"]["de"], "readout_genes": s["readout_genes"]["n"]}
else:
    import anndata, h5py, pandas, scipy.sparse, scipy.stats, sklearn.metrics  # noqa: F401, E401
    extra = {}
print(json.dumps({"seconds": time.perf_counter() - t0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **extra}))
"""


def _child(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, nargs="+", default=[50_000, 200_000])
    ap.add_argument("--genes", type=int, default=5000)
    ap.add_argument("--perturbations", type=int, default=500)
    ap.add_argument("--control-share", type=float, default=0.05)
    ap.add_argument("--split-half", action="store_true", help="also time --split-half (8 blocks of aggregates)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/synthpert-bench-screen"))
    ap.add_argument("--keep", action="store_true", help="keep the .h5ad files")
    args = ap.parse_args()

    import numpy as np

    from synthpert.screen_synth import ScreenSpec, write_synthetic_screen

    rows = [{"run": "import only", **_child("--import-only")}]
    for n in args.cells:
        controls = int(n * args.control_share)
        per = (n - controls) // args.perturbations
        # Sparser than the planted-truth tests' screen, closer to a 10x matrix: ~20% of entries non-zero.
        spec = ScreenSpec(perturbations=args.perturbations, genes=args.genes, cells_per_perturbation=per,
                          control_cells=controls, baseline_log_mean=float(np.log(0.1)), baseline_log_sd=1.5,
                          effect_min_mean=0.5)
        path = args.dir / f"screen-{n}.h5ad"
        t0 = time.perf_counter()
        write_synthetic_screen(path, spec, truth_json=False)
        gen = time.perf_counter() - t0
        size_mb = path.stat().st_size / 2**20
        for split_half in [False, True] if args.split_half else [False]:
            r = _child(str(path), str(args.dir / f"out-{n}"), "1" if split_half else "0")
            rows.append({"run": f"{per * args.perturbations + controls:,} cells" + (" --split-half" if split_half
                                                                                    else ""),
                         "h5ad_mb": round(size_mb), "generate_s": round(gen, 1), **r})
        if not args.keep:
            path.unlink()
    print(json.dumps({"machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
                      "genes": args.genes, "perturbations": args.perturbations, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
