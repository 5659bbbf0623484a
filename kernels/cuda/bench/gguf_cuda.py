"""The llama.cpp-made GGUF fixtures (tests/fixtures/gguf/*/*.gguf) end to end on CUDA through the
CLI: `mamba2 logits --model F.gguf --device cuda --dtype f32` (prefill path and prefill-then-step
path) against HF run with the exactly dequantized weights (`logits`), at the fixture's own
tolerances: `logits_f32_math` for float files; for block-quantized files `logits_any_cpu_math`
(2x llama.cpp's own CPU distance), since Candle's CUDA kernels round the activations to Q8_1
blocks, not the CPU's Q8_0/Q8_K, so the CPU's act-quant reference does not apply.

    python3 kernels/cuda/bench/gguf_cuda.py path/to/mamba2
Then the hybrid GGUFs of tests/fixtures/gguf/hybrid/ against their references (`hybrids`).
Exits non-zero if any case fails.
"""
import glob, json, os, subprocess, sys, tempfile
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file


def check(exe, gguf, ids, p, want, t, what):
    """`mamba2 logits` on CUDA (prefill and prefill-then-step) against `want`; returns failures."""
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = os.path.join(tmp, "in.safetensors"), os.path.join(tmp, "out.safetensors")
        save_file({"input_ids": ids.astype(np.int64)}, inp)
        r = subprocess.run([exe, "logits", "--model", gguf, "--device", "cuda", "--dtype", "f32",
                            "--input", inp, "--out", out, "--prefill-len", str(p)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            print(f"FAIL {gguf}: {r.stderr.strip()[-400:]}")
            return 1
        got = load_file(out)
        fails = 0
        for key in ("logits_prefill", "logits_decode"):
            d = float(np.abs(got[key] - want).max())
            ok = d <= t
            fails += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {gguf} {key}: max |cuda - {what}| {d:.3g} (tol {t})")
        return fails


def main():
    exe = sys.argv[1]
    fails = 0
    for ref_path in sorted(glob.glob("tests/fixtures/gguf/*/*.reference.safetensors")):
        gguf = ref_path.replace(".reference.safetensors", ".gguf")
        with safe_open(ref_path, "np") as f:
            tol = json.loads(f.metadata()["tolerances"])
        ref = load_file(ref_path)
        t = tol["logits_any_cpu_math"] if "logits_act_quant" in ref else tol["logits_f32_math"]
        p = int(ref["prefill_len"].reshape(-1)[0])
        fails += check(exe, gguf, ref["input_ids"], p, ref["logits"], t, "HF dequantized")
    fails += hybrids(exe)
    print("gguf fixtures on cuda: " + ("all pass" if fails == 0 else f"{fails} failures"))
    sys.exit(1 if fails else 0)


# The hybrid GGUFs (tests/fixtures/gguf/hybrid/) against the references and f32 tolerances of
# tests/gguf_hybrid.rs and tests/gguf_falcon_h1.rs (Falcon-H1: HF as llama.cpp runs it).
HYBRID = [
    ("granite_nope_tied_b2", "tests/fixtures/hybrid/granite_nope_tied_b2/reference.safetensors", 1.6e-4),
    ("nemotron_h_g2_b3", "tests/fixtures/hybrid/nemotron_h_g2_b3/reference.safetensors", 4.3e-3),
    ("bamba_b2", "tests/fixtures/hybrid/bamba_b2/reference.safetensors", 1e-4),
    ("falcon_h1_rmsnorm_g2_b2", "tests/fixtures/gguf/hybrid/falcon_h1_rmsnorm_g2_b2.variant.safetensors", 1e-4),
    ("falcon_h1_nonorm_tied_b1", "tests/fixtures/gguf/hybrid/falcon_h1_nonorm_tied_b1.variant.safetensors", 1e-4),
]


def hybrids(exe):
    fails = 0
    for name, ref_path, t in HYBRID:
        ref = load_file(ref_path)
        p = int(load_file(f"tests/fixtures/hybrid/{name}/reference.safetensors")["prefill_len"].reshape(-1)[0])
        fails += check(exe, f"tests/fixtures/gguf/hybrid/{name}.f32.gguf", ref["input_ids"], p,
                       ref["logits_prefill"], t, "reference")
    return fails


if __name__ == "__main__":
    main()
