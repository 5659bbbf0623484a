"""The llama.cpp-made GGUF fixtures (tests/fixtures/gguf/*/*.gguf) end to end on CUDA through the
CLI: `mamba2 logits --model F.gguf --device cuda --dtype f32` (prefill path and prefill-then-step
path) against HF run with the exactly dequantized weights (`logits`), at the fixture's own
tolerances: `logits_f32_math` for float files; for block-quantized files `logits_any_cpu_math`
(2x llama.cpp's own CPU distance), since Candle's CUDA kernels round the activations to Q8_1
blocks, not the CPU's Q8_0/Q8_K, so the CPU's act-quant reference does not apply.

    python3 kernels/cuda/bench/gguf_cuda.py path/to/mamba2
Exits non-zero if any case fails. Not yet run on a GPU: no device came after it was written
(session 7); the CUDA quantized path is Candle's `QMatMul`, unverified there.
"""
import glob, json, os, subprocess, sys, tempfile
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file


def main():
    exe = sys.argv[1]
    fails = 0
    for ref_path in sorted(glob.glob("tests/fixtures/gguf/*/*.reference.safetensors")):
        gguf = ref_path.replace(".reference.safetensors", ".gguf")
        with safe_open(ref_path, "np") as f:
            meta = f.metadata()
        tol = json.loads(meta["tolerances"])
        ref = load_file(ref_path)
        quantized = "logits_act_quant" in ref
        t = tol["logits_any_cpu_math"] if quantized else tol["logits_f32_math"]
        p = int(ref["prefill_len"].reshape(-1)[0])
        with tempfile.TemporaryDirectory() as tmp:
            inp, out = os.path.join(tmp, "in.safetensors"), os.path.join(tmp, "out.safetensors")
            save_file({"input_ids": ref["input_ids"].astype(np.int64)}, inp)
            r = subprocess.run([exe, "logits", "--model", gguf, "--device", "cuda", "--dtype", "f32",
                                "--input", inp, "--out", out, "--prefill-len", str(p)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                print(f"FAIL {gguf}: {r.stderr.strip()[-400:]}")
                fails += 1
                continue
            got = load_file(out)
            for key in ("logits_prefill", "logits_decode"):
                d = float(np.abs(got[key] - ref["logits"]).max())
                ok = d <= t
                fails += not ok
                print(f"{'ok  ' if ok else 'FAIL'} {gguf} {key}: max |cuda - HF dequantized| {d:.3g} (tol {t})")
    print("gguf fixtures on cuda: " + ("all pass" if fails == 0 else f"{fails} failures"))
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
