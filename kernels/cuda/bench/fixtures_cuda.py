"""The committed HF fixtures (tests/fixtures/*, the hybrid families' tests/fixtures/hybrid/* and the
MoE hybrids' tests/fixtures/moe/*)
end to end on CUDA through the CLI: `mamba2 logits --device cuda` for both checkpoint layouts
and f32/bf16/f16, against HF's f32 logits (prefill path and prefill-then-step path), with the
tolerances of tests/hf_fixtures.rs and tests/hybrid_fixtures.rs (hybrids: f32 and bf16 only).

    python3 kernels/cuda/bench/fixtures_cuda.py path/to/mamba2 [dtype ...]
Exits non-zero if any case fails.
"""
import os, subprocess, sys, tempfile
import numpy as np
from safetensors.numpy import load_file, save_file

TOL = {"f32": 5e-5, "bf16": 0.15, "f16": 0.03}  # max |ours - HF f32|, as tests/hf_fixtures.rs
TOL_HYBRID = {"f32": 1e-4, "bf16": 0.25}  # as tests/hybrid_fixtures.rs

def main():
    exe = sys.argv[1]
    dtypes = sys.argv[2:] or ["f32", "bf16", "f16"]
    fails = 0
    cases = [("tests/fixtures", c, ("hf", "ssm"), TOL) for c in sorted(os.listdir("tests/fixtures"))]
    cases += [("tests/fixtures/hybrid", c, ("hf", "hub"), TOL_HYBRID)
              for c in sorted(os.listdir("tests/fixtures/hybrid"))]
    cases += [("tests/fixtures/moe", c, ("hf", "hub"), TOL_HYBRID)  # as tests/moe_fixtures.rs
              for c in sorted(os.listdir("tests/fixtures/moe"))]
    for root, case, layouts, tols in cases:
        ref_path = os.path.join(root, case, "reference.safetensors")
        if not os.path.exists(ref_path):
            continue
        ref = load_file(ref_path)
        prefill_len = int(ref["prefill_len"].reshape(-1)[0])
        with tempfile.TemporaryDirectory() as tmp:
            inp = os.path.join(tmp, "in.safetensors")
            save_file({"input_ids": ref["input_ids"].astype(np.int64)}, inp)
            for layout in layouts:
                for dtype in (d for d in dtypes if d in tols):
                    out = os.path.join(tmp, f"out_{layout}_{dtype}.safetensors")
                    r = subprocess.run([exe, "logits", "--model", os.path.join(root, case, layout),
                                        "--device", "cuda", "--dtype", dtype, "--offline",
                                        "--input", inp, "--out", out,
                                        "--prefill-len", str(prefill_len)],
                                       capture_output=True, text=True)
                    if r.returncode != 0:
                        print(f"FAIL {case} {layout} {dtype}: exit {r.returncode}: {r.stderr.strip()[-300:]}")
                        fails += 1
                        continue
                    got = load_file(out)
                    errs = []
                    for key in ("logits_prefill", "logits_decode"):
                        g, w = got[key].astype(np.float32), ref[key].astype(np.float32)
                        v = min(g.shape[-1], w.shape[-1])
                        errs.append(float(np.abs(g[..., :v] - w[..., :v]).max()) if g.shape[:-1] == w.shape[:-1] else float("inf"))
                    ok = all(e <= tols[dtype] for e in errs)
                    fails += not ok
                    print(f"{'ok  ' if ok else 'FAIL'} {case} {layout} {dtype}: max|d| prefill {errs[0]:.2e} decode {errs[1]:.2e} (tol {tols[dtype]:g})")
    print(f"fixtures on cuda: {'all pass' if fails == 0 else f'{fails} failing'}")
    sys.exit(1 if fails else 0)

if __name__ == "__main__":
    main()
