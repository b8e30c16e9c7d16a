"""Memory of a calibrating pipeline on the real SmolLM2-135M: batch vs. layer-wise calibration,
weights in memory vs. offloaded to disk (issue #3, item 1).

Each mode runs in its own process (so peak RSS is that mode's), on the same model and data:

* ``batch``               — ``optimize(..., calibration=...)``: one batch at a time through the graph;
* ``layerwise``           — ``layerwise_calibration=True``: one layer at a time for every batch;
* ``layerwise+offload``   — and ``offload_dir=...``: the captured graph's weights live in files and
  are loaded when read (:mod:`fxopt.ir.offload`); snapshots and copies cost no weight memory.

Pipeline: ``smoothquant{alpha=0.5},insert-qdq`` (static W8A8), calibration = ``--calib`` windows of
``--window`` tokens of *Hamlet* from ../shared/data/corpus. Reported: peak RSS of the process,
RSS after loading the model (the caller's own fp32 copy, the same in every mode), the pipeline's
share above it, seconds, and the largest |Δ logits| vs. the batch mode on one window (the modes must
agree). The caller's model is always in memory: offloading bounds what *fxopt* adds.

    python3 benchmarks/bench_calibration_memory.py --markdown
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_line, fxopt_revision, log  # noqa: E402

MODES = ("batch", "layerwise", "layerwise+offload")


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(mode: str, calib_n: int, window: int, out: Path) -> None:
    import fxopt
    from bench_quant_smollm2 import CORPUS, load_smollm2, windows

    torch.set_num_threads(1)
    model, tok, _ = load_smollm2()
    ids = windows(tok, CORPUS / "hamlet_gut.txt", calib_n + 1, window, 2000)
    calib = [{"input_ids": ids[i:i + 1], "attention_mask": torch.ones_like(ids[i:i + 1])} for i in range(calib_n)]
    probe = {"input_ids": ids[-1:], "attention_mask": torch.ones_like(ids[-1:])}
    rss_loaded = _rss_mib()
    kw = {}
    tmp = None
    if mode.startswith("layerwise"):
        kw["layerwise_calibration"] = True
    if mode.endswith("offload"):
        tmp = tempfile.mkdtemp(prefix="fxopt-offload-")
        kw["offload_dir"] = tmp
    t = time.perf_counter()
    res = fxopt.optimize(model, "smoothquant{alpha=0.5},insert-qdq", probe, calibration=calib, measure_drift=False,
                         **kw)
    secs = time.perf_counter() - t
    logits = res(**probe).logits
    torch.save(logits, out.with_suffix(".pt"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rep = res.records[-1].stats.get("calibration", {})
    out.write_text(json.dumps({"mode": mode, "peak_mib": peak, "loaded_mib": rss_loaded, "seconds": secs,
                               "peak_weight_bytes": rep.get("peak_weight_bytes"),
                               "weight_loads": rep.get("weight_loads"),
                               "offload_mib": (sum(f.stat().st_size for f in Path(tmp).glob("*.pt")) / 2**20
                                               if tmp else 0.0)}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a.child, a.calib, a.window, Path(a.out))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for mode in MODES:
            log(f"{mode}: running in a fresh process")
            out = Path(d) / f"{mode.replace('+', '_')}.json"
            subprocess.run([sys.executable, __file__, "--child", mode, "--out", str(out), "--calib", str(a.calib),
                            "--window", str(a.window)], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            r = json.loads(out.read_text())
            r["logits"] = torch.load(out.with_suffix(".pt"))
            rows.append(r)
    base = rows[0]
    print(cpu_line())
    print(f"SmolLM2-135M, smoothquant{{alpha=0.5}},insert-qdq, {a.calib} calibration windows × {a.window} tokens; "
          f"fxopt {fxopt_revision()}\n")
    hdr = ["mode", "peak RSS MiB", "RSS after load MiB", "pipeline MiB (peak − load)", "× batch",
           "peak weights loaded MiB", "weight loads", "files MiB", "seconds", "max |Δ logits| vs batch"]
    lines = []
    for r in rows:
        extra = r["peak_mib"] - r["loaded_mib"]
        pw = r["peak_weight_bytes"]
        lines.append([r["mode"], f"{r['peak_mib']:.0f}", f"{r['loaded_mib']:.0f}", f"{extra:.0f}",
                      f"{extra / (base['peak_mib'] - base['loaded_mib']):.2f}",
                      f"{pw / 2**20:.1f}" if pw else "—", str(r["weight_loads"] or 0), f"{r['offload_mib']:.0f}",
                      f"{r['seconds']:.1f}", f"{float((r['logits'] - base['logits']).abs().max()):.2e}"])
    if a.markdown:
        print("| " + " | ".join(hdr) + " |")
        print("|" + "---|" * len(hdr))
        for ln in lines:
            print("| " + " | ".join(ln) + " |")
    else:
        w = [max(len(h), *(len(ln[i]) for ln in lines)) for i, h in enumerate(hdr)]
        print("  ".join(h.ljust(w[i]) for i, h in enumerate(hdr)))
        for ln in lines:
            print("  ".join(c.ljust(w[i]) for i, c in enumerate(ln)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
