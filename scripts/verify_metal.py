"""Checks for scripts/verify-metal.sh, with Python's standard library only (a Mac with Xcode's
command-line tools has python3 but not numpy):

    python3 scripts/verify_metal.py fixtures MAMBA2 [dtype ...]   HF fixtures through the model
    python3 scripts/verify_metal.py golden MAMBA2                   bundled model's greedy tokens
    python3 scripts/verify_metal.py table BENCH.jsonl [LLAMA.jsonl] the benchmark table
    python3 scripts/verify_metal.py selftest                        this file's own checks (CI)

`fixtures` runs `mamba2 logits --device metal` on every committed HF fixture (tests/fixtures/*
and tests/fixtures/hybrid/*, both checkpoint layouts) in f32, bf16 and f16, prefill path and
prefill-then-step path, against HF's f32 logits at the tolerances of tests/hf_fixtures.rs and
tests/hybrid_fixtures.rs (hybrids: f32 and bf16, as those tests). `golden` feeds each golden
prompt plus its greedy continuation (tests/golden/mamba2_tiny_golden.json) through `mamba2 logits
--device metal` and checks that the step path's argmax reproduces every greedy token, which is
what greedy generation computes. Both exit non-zero on any failure.
"""
import json, os, struct, subprocess, sys, tempfile
from array import array

TOL = {"f32": 5e-5, "bf16": 0.15, "f16": 0.03}  # tests/hf_fixtures.rs
TOL_HYBRID = {"f32": 1e-4, "bf16": 0.25}  # tests/hybrid_fixtures.rs
DEVICE = os.environ.get("MAMBA2_VERIFY_DEVICE", "metal")

# llama.cpp's published Metal figures for comparable models: none found (see README, "Metal").
# Entries would be {(shape, dtype): (tok/s prefill, tok/s decode, "source URL")}.
LLAMA_CPP_PUBLISHED = {}


# ---------------------------------------------------------------------------- safetensors
def read_safetensors(path):
    """{name: (dtype, shape, flat list)} for F32/F16/BF16/I64/I32 tensors."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        a, b = t["data_offsets"]
        raw = data[a:b]
        dt = t["dtype"]
        if dt in ("F32", "I64", "I32"):
            vals = array({"F32": "f", "I64": "q", "I32": "i"}[dt])
            vals.frombytes(raw)
            if sys.byteorder != "little":
                vals.byteswap()
            vals = vals.tolist()
        elif dt == "BF16":
            h = array("H")
            h.frombytes(raw)
            vals = list(array("f", struct.pack(f"<{len(h)}I", *[v << 16 for v in h])))
        elif dt == "F16":
            vals = [struct.unpack("<e", raw[i:i + 2])[0] for i in range(0, len(raw), 2)]
        else:
            raise ValueError(f"{path}: {name}: unsupported dtype {dt}")
        out[name] = (dt, t["shape"], vals)
    return out


def write_ids(path, rows):
    """Writes `input_ids` (i64, [batch, seq]) for `mamba2 logits --input`."""
    flat = [v for r in rows for v in r]
    body = struct.pack(f"<{len(flat)}q", *flat)
    header = json.dumps({"input_ids": {"dtype": "I64", "shape": [len(rows), len(rows[0])],
                                       "data_offsets": [0, len(body)]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + body)


def max_abs_diff(got, want):
    """Largest |got - want| over the vocabulary both have (the model may pad its rows)."""
    (_, gs, g), (_, ws, w) = got, want
    if gs[:-1] != ws[:-1]:
        return float("inf")
    gv, wv, v = gs[-1], ws[-1], min(gs[-1], ws[-1])
    worst = 0.0
    for r in range(len(w) // wv):
        for c in range(v):
            d = abs(g[r * gv + c] - w[r * wv + c])
            if not d <= worst:  # NaN counts as a failure
                worst = d if d == d else float("inf")
    return worst


def argmax_rows(t):
    _, shape, vals = t
    v = shape[-1]
    return [max(range(v), key=lambda c: vals[r * v + c]) for r in range(len(vals) // v)]


def run_logits(exe, model, dtype, rows, prefill_len, tmp, extra=()):
    inp, out = os.path.join(tmp, "in.safetensors"), os.path.join(tmp, "out.safetensors")
    write_ids(inp, rows)
    r = subprocess.run([exe, "logits", "--model", model, "--device", DEVICE, "--dtype", dtype,
                        "--offline", "--input", inp, "--out", out,
                        "--prefill-len", str(prefill_len), *extra],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return None, f"exit {r.returncode}: {r.stderr.strip()[-300:]}"
    return read_safetensors(out), None


# ---------------------------------------------------------------------------- commands
def fixtures(exe, dtypes):
    fails = 0
    cases = [("tests/fixtures", c, ("hf", "ssm"), TOL) for c in sorted(os.listdir("tests/fixtures"))]
    cases += [("tests/fixtures/hybrid", c, ("hf", "hub"), TOL_HYBRID)
              for c in sorted(os.listdir("tests/fixtures/hybrid"))]
    for root, case, layouts, tols in cases:
        ref_path = os.path.join(root, case, "reference.safetensors")
        if not os.path.exists(ref_path):
            continue
        ref = read_safetensors(ref_path)
        _, shape, ids = ref["input_ids"]
        rows = [ids[i * shape[1]:(i + 1) * shape[1]] for i in range(shape[0])]
        prefill_len = int(ref["prefill_len"][2][0])
        for layout in layouts:
            for dtype in (d for d in dtypes if d in tols):
                with tempfile.TemporaryDirectory() as tmp:
                    got, err = run_logits(exe, os.path.join(root, case, layout), dtype, rows,
                                          prefill_len, tmp)
                if err:
                    print(f"FAIL {case} {layout} {dtype}: {err}")
                    fails += 1
                    continue
                errs = [max_abs_diff(got[k], ref[k]) for k in ("logits_prefill", "logits_decode")]
                ok = all(e <= tols[dtype] for e in errs)
                fails += not ok
                print(f"{'ok  ' if ok else 'FAIL'} {case} {layout} {dtype}: max|d| prefill "
                      f"{errs[0]:.2e} decode {errs[1]:.2e} (tol {tols[dtype]:g})")
    print(f"fixtures on {DEVICE}: {'all pass' if fails == 0 else f'{fails} failing'}")
    return fails


def golden(exe):
    meta = json.load(open("tests/golden/mamba2_tiny_golden.json"))
    fails = 0
    for dtype in ("f32",):  # the golden greedy tokens are HF's f32 run
        for p in meta["prompts"]:
            prompt, want = p["prompt_ids"], p["greedy_ids"]
            with tempfile.TemporaryDirectory() as tmp:
                got, err = run_logits(exe, "models/mamba2-tiny", dtype, [prompt + want[:-1]],
                                      len(prompt), tmp)
            if err:
                print(f"FAIL golden {p['prompt']!r}: {err}")
                fails += 1
                continue
            for key in ("logits_decode", "logits_prefill"):
                pred = argmax_rows(got[key])[len(prompt) - 1:]
                first_bad = next((i for i, (a, b) in enumerate(zip(pred, want)) if a != b), None)
                ok = first_bad is None and len(pred) == len(want)
                fails += not ok
                where = "" if ok else f" (first difference at token {first_bad})"
                print(f"{'ok  ' if ok else 'FAIL'} golden {p['prompt']!r} {key}: "
                      f"{len(want)} greedy tokens{where}")
    print(f"golden tokens on {DEVICE}: {'all pass' if fails == 0 else f'{fails} failing'}")
    return fails


def table(bench_path, llama_path=None):
    """One row per bench JSON line; llama.cpp columns from published figures or a local run."""
    local = {}
    if llama_path and os.path.exists(llama_path):
        for line in open(llama_path):
            if line.strip():
                r = json.loads(line)
                local.setdefault((r["shape"], r["dtype"]), {})[r["test"]] = r["tok_s"]
    rows = [json.loads(l) for l in open(bench_path) if l.strip().startswith("{")]
    head = ("shape", "dtype", "prefill tok/s", "decode tok/s", "GB/s (decode)",
            "llama.cpp prefill", "llama.cpp decode", "llama.cpp source")
    lines = [head]
    for r in rows:
        shape = r["model"].split(":")[-1]
        dtype = r["dtype"]
        gbs = r["decode_tok_s"] * r.get("weight_bytes_per_token", 0) / 1e9
        if (shape, dtype) in local:
            l = local[(shape, dtype)]
            ll = (f"{l.get('pp', float('nan')):.1f}", f"{l.get('tg', float('nan')):.1f}",
                  "llama-bench, this Mac")
        elif (shape, dtype) in LLAMA_CPP_PUBLISHED:
            pp, tg, src = LLAMA_CPP_PUBLISHED[(shape, dtype)]
            ll = (f"{pp:.1f}", f"{tg:.1f}", src)
        else:
            ll = ("n/a", "n/a", "none published")
        lines.append((shape, dtype, f"{r['prefill_tok_s']:.1f}", f"{r['decode_tok_s']:.1f}",
                      f"{gbs:.1f}", *ll))
    widths = [max(len(str(l[i])) for l in lines) for i in range(len(head))]
    out = []
    for n, l in enumerate(lines):
        out.append("| " + " | ".join(str(c).ljust(w) for c, w in zip(l, widths)) + " |")
        if n == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print("\n".join(out))
    if not local and not LLAMA_CPP_PUBLISHED:
        print("llama.cpp: no published Metal figures for Mamba-2 at these shapes were found; "
              "set LLAMA_BENCH and LLAMA_GGUF_<SHAPE>_<DTYPE> to measure llama.cpp on this Mac.")
    return 0


def selftest():
    """Round trips and the table, without a device (run by CI)."""
    with tempfile.TemporaryDirectory() as tmp:
        p = os.path.join(tmp, "ids.safetensors")
        write_ids(p, [[1, 2, 3], [4, 5, 6]])
        t = read_safetensors(p)["input_ids"]
        assert t == ("I64", [2, 3], [1, 2, 3, 4, 5, 6]), t
        ref = read_safetensors("tests/fixtures/g2_ds16_seq3_b2/reference.safetensors")
        lp = ref["logits_prefill"]
        assert lp[0] == "F32" and len(lp[2]) == 2 * 3 * 96, lp[1]
        assert max_abs_diff(lp, lp) == 0.0
        nudged = (lp[0], lp[1], [v + 1e-3 for v in lp[2]])
        assert abs(max_abs_diff(nudged, lp) - 1e-3) < 1e-6
        assert max_abs_diff(("F32", [1, 2], [float("nan"), 0.0]), ("F32", [1, 2], [0.0, 0.0])) == float("inf")
        assert argmax_rows(("F32", [2, 3], [0, 5, 1, 9, 2, 3])) == [1, 0]
        bench = os.path.join(tmp, "bench.jsonl")
        with open(bench, "w") as f:
            f.write(json.dumps({"model": "random:130m", "dtype": "f16", "prefill_tok_s": 1000.0,
                                "decode_tok_s": 100.0, "weight_bytes_per_token": 2.5e8}) + "\n")
        import io, contextlib
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            table(bench)
        text = buf.getvalue()
        assert "| 130m  | f16   | 1000.0" in text and "| 25.0 " in text and "n/a" in text, text
    print("verify_metal.py selftest: ok")
    return 0


def main():
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "fixtures":
        return 1 if fixtures(args[0], args[1:] or ["f32", "bf16", "f16"]) else 0
    if cmd == "golden":
        return 1 if golden(args[0]) else 0
    if cmd == "table":
        return table(*args)
    if cmd == "selftest":
        return selftest()
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
