#!/usr/bin/env python3
"""Build the GGUF reference fixtures under tests/fixtures/gguf/ with llama.cpp's own converter and quantizer.

Run by hand (not by CI), from the repository root, with llama.cpp's tools on the environment:

    eval "$(bash /work/shared/tools/llama-cpp.sh)"   # LLAMA_BIN, LLAMA_SRC, LLAMA_PY, LD_LIBRARY_PATH
    pip install -r scripts/requirements.txt           # transformers 5.24 / torch 2.15 for the HF references
    python3 scripts/gguf_fixtures.py                  # every case (~1 min on 2 cores)
    python3 scripts/gguf_fixtures.py m2_h32_g1_tied_tok320   # only the named case(s) (hybrid names too)
    python3 scripts/gguf_fixtures.py tokenizer        # only tokenizer_ids.json + mamba2_tiny_vocab.gguf

For every case it builds a tiny random HF Mamba2ForCausalLM in float32 (make_fixtures.py's config and
randomisation: every parameter overwritten), saves it with a tokenizer, and then only llama.cpp's
tools make the GGUF files:

    convert_hf_to_gguf.py --outtype f32        (through /work/shared/tools/llama-cpp/convert_gguf.py)
    llama-quantize F32.gguf OUT.gguf TYPE      (Q8_0, Q4_K_M, Q4_0, Q5_K_M, Q6_K for the quantized shape)
    dump_logits                                (llama.cpp's logits, one-shot and --step P)

The reference logits of a GGUF file are HF's float32 forward (CPU, torch path) of a model whose every
tensor is the exact dequantization of that file's tensor (gguf-py's `gguf.quants.dequantize`), mapped back to
HF's names and shapes (`gguf_to_hf`). For an f32 file that reproduces the original checkpoint (checked:
the f32 GGUF read back gives the original parameters bitwise), so the reference is the original model.
Quantized files also get `logits_act_quant`: the same model with llama.cpp's CPU activation quantization
(Q8_0 / Q8_K of the matmul inputs) emulated, which reproduces llama.cpp's own logits to ~2e-6.

The hybrid HF fixtures of tests/fixtures/hybrid/ are converted too (build_hybrid): their tensor and metadata
listings and llama.cpp's distance to their reference logits go into the manifest; the families llama.cpp reproduces
are committed under tests/fixtures/gguf/hybrid/. The mixture-of-experts fixtures of tests/fixtures/moe/ go the same way
into tests/fixtures/gguf/moe/ (manifest key `moe`; `python3 scripts/gguf_fixtures.py granite_moe_b2 ...` for some).

Small tools of ours on llama.cpp's C API (llama_tokenize, logits_f32kv) are compiled into target/gguf_fixtures/.

Everything the engine's tests need lands in tests/fixtures/gguf/ (see tests/fixtures/README.md, section
"GGUF fixtures"); the large intermediate files (HF folders, the f32 GGUF of the quantized shape) stay
in target/gguf_fixtures/ (git-ignored). Re-running with the same tools leaves git clean.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
OUT = REPO_ROOT / "tests" / "fixtures" / "gguf"
WORK = REPO_ROOT / "target" / "gguf_fixtures"
TOKENIZER = REPO_ROOT / "models" / "mamba2-tiny" / "tokenizer.json"
CONVERT = Path("/work/shared/tools/llama-cpp/convert_gguf.py")
GENERATOR = "scripts/gguf_fixtures.py"


def _tools() -> dict:
    """The llama.cpp tools, or exit with what to do."""
    how = 'run `eval "$(bash /work/shared/tools/llama-cpp.sh)"` first (it builds or finds llama.cpp under /opt/llama-cpp)'
    env = {k: os.environ.get(k) for k in ("LLAMA_BIN", "LLAMA_SRC", "LLAMA_PY")}
    missing = [k for k, v in env.items() if not v]
    if missing:
        sys.exit(f"gguf_fixtures.py needs llama.cpp's tools: {', '.join(missing)} not set; {how}")
    need = [
        Path(env["LLAMA_BIN"]) / "llama-quantize",
        Path(env["LLAMA_BIN"]) / "dump_logits",
        Path(env["LLAMA_SRC"]) / "convert_hf_to_gguf.py",
        Path(env["LLAMA_SRC"]) / "gguf-py" / "gguf" / "__init__.py",
        Path(env["LLAMA_PY"]),
        Path(os.environ.get("LLAMA_CONVERT", CONVERT)),
    ]
    absent = [str(p) for p in need if not p.exists()]
    if absent:
        sys.exit(f"gguf_fixtures.py needs llama.cpp's tools; missing: {', '.join(absent)}; {how}")
    env["CONVERT"] = str(need[-1])
    return env


TOOLS = _tools()
sys.path.insert(0, str(Path(TOOLS["LLAMA_SRC"]) / "gguf-py"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gguf  # noqa: E402  (llama.cpp's gguf-py, from LLAMA_SRC)
import gguf.quants  # noqa: E402
import numpy as np  # noqa: E402
import safetensors.torch  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import Mamba2ForCausalLM  # noqa: E402

import make_fixtures as mf  # noqa: E402  (Case, hf_config, randomize, run_prefill, run_decode, same_safetensors)

# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------
# Text whose tokens are the input ids (first SEQ tokens of it under the case's tokenizer).
TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be"
)
SEQ = 24
PREFILL = 20  # split run: 20 tokens in one batch, then 4 single-token steps
N_BYTE_TOKENS = 257  # bundled tokenizer: id 0 <|endoftext|>, ids 1..256 the byte alphabet, then merges


@dataclass
class GCase:
    name: str
    seed: int
    hidden: int
    n_layer: int
    headdim: int
    ngroups: int
    d_state: int
    chunk: int
    tied: bool
    tokens: int  # tokenizer size: the bundled tokenizer's first `tokens` ids (see truncated_tokenizer)
    rows: int  # vocab_size of the HF config = embedding rows (>= tokens; the converter pads the token list)
    quant_types: list = field(default_factory=list)  # llama-quantize types made from the f32 GGUF
    commit_f32: bool = True  # the f32 GGUF goes into tests/fixtures/gguf/ (else it stays in target/)
    expand: int = 2
    # Multiply in_proj, out_proj and lm_head (after make_fixtures' randomisation, whose stds do not depend on the
    # fan-in) by sqrt(32 / fan_in) [in_proj, lm_head: fan_in = hidden; out_proj: sqrt(64 / d_inner)], so that a wide
    # model has the gains of the hidden-32 fixtures (logit std 1.1 instead of 3.2).
    rescale: bool = False
    note: str = ""

    def mf_case(self) -> "mf.Case":
        return mf.Case(
            name=self.name,
            seed=self.seed,
            hidden=self.hidden,
            n_layer=self.n_layer,
            expand=self.expand,
            headdim=self.headdim,
            ngroups=self.ngroups,
            d_state=self.d_state,
            chunk=self.chunk,
            vocab=self.rows,
            pad_multiple=16,
            seq=SEQ,
            batch=1,
            prefill_len=PREFILL,
            tied=self.tied,
            residual_in_fp32=True,
        )


CASES = [
    GCase(
        name="m2_h32_g1_tied_tok320",
        seed=6001,
        hidden=32,
        n_layer=2,
        headdim=16,
        ngroups=1,
        d_state=16,
        chunk=16,
        tied=True,
        tokens=320,
        rows=320,
        note="tokenizer = first 320 ids of the bundled one (no padding rows); tied: no output.weight in the GGUF",
    ),
    GCase(
        name="m2_h64_g2_untied_tok300",
        seed=6002,
        hidden=64,
        n_layer=2,
        headdim=32,
        ngroups=2,
        d_state=32,
        chunk=8,
        tied=False,
        tokens=300,
        rows=320,
        note="tokenizer = first 300 ids of the bundled one; 320 rows: the converter pads the token list "
        "with [PAD300]..[PAD319] (token type UNUSED); untied: output.weight present",
    ),
    GCase(
        name="m2_h256_g2_quant",
        seed=6003,
        hidden=256,
        n_layer=1,
        headdim=64,
        ngroups=2,
        d_state=32,
        chunk=16,
        tied=False,
        tokens=300,
        rows=320,
        quant_types=["Q8_0", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K"],
        commit_f32=False,
        rescale=True,
        note="row lengths of token_embd/output/ssm_in (256) and ssm_out (512) are multiples of 256, so the "
        "K-quants apply; tokenizer as m2_h64_g2_untied_tok300; the f32 GGUF (2 MB) stays in target/gguf_fixtures/",
    ),
]

# ~20 strings for tokenizer_ids.json
TOKENIZER_STRINGS = [
    "",
    "Hello, world!",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife.",
    "Mr. Darcy's estate--Pemberley--was \"ten thousand a year\"; isn't it?",
    "0 1 12 123 1234 12345 3.14159 1,000,000 2024-06-01",
    "a  b   c    d",
    "line one\nline two\n\nline four\n",
    "\n\n\n",
    "\ttab\t\tdouble tab\n\tindented",
    "   leading and trailing spaces   ",
    "Élise à Paris: café, naïve, façade, Ñandú, Øresund, straße",
    "中文测试：你好，世界。",
    "日本語のテキストとカタカナ",
    "emoji 😀🎉👍🏽 and 🦙🦙",
    "<|endoftext|>",
    "before<|endoftext|>after",
    "Hello <|endoftext|> world",
    "!!!???...,,,;;;:::---___",
    "CamelCaseWord snake_case_word kebab-case-word",
    "x" * 40,
    "The end.\r\nWindows line\r\n",
]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
class ToolError(RuntimeError):
    pass


def sh(cmd, stdout_only: bool = False) -> str:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if r.returncode != 0:
        raise ToolError(f"command failed ({r.returncode}): {' '.join(map(str, cmd))}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r.stdout if stdout_only else r.stdout + r.stderr


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sig(x: float, digits: int = 3) -> float:
    """Round to `digits` significant digits (stable numbers in the manifest)."""
    if x == 0 or not math.isfinite(x):
        return x
    return float(f"{x:.{digits - 1}e}")


def max_abs(a, b) -> float:
    return float((torch.as_tensor(a).float() - torch.as_tensor(b).float()).abs().max())


def versions() -> dict:
    src = Path(TOOLS["LLAMA_SRC"])
    commit = "unknown"
    try:
        commit = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    gguf_py = "unknown"
    for line in (src / "gguf-py" / "pyproject.toml").read_text().splitlines():
        if line.startswith("version"):
            gguf_py = line.split("=", 1)[1].strip().strip('"')
            break
    pkg = src.parent.parent  # llama_cpp_python-<ver>/vendor/llama.cpp
    return {
        "llama_cpp_commit": commit or "unknown",
        "llama_cpp_source": pkg.name,
        "gguf_py": gguf_py,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "tokenizers": tokenizers.__version__,
    }


def truncated_tokenizer(n: int) -> dict:
    """The bundled byte-level BPE cut to its first n ids: <|endoftext|>, the 256 byte symbols, and the first
    n - 257 merges (merge k produces id 257 + k, checked). Still a complete tokenizer for any text."""
    tok = json.loads(TOKENIZER.read_text())
    vocab, merges = tok["model"]["vocab"], tok["model"]["merges"]
    if n >= len(vocab):
        return tok
    assert n > N_BYTE_TOKENS
    for k, m in enumerate(merges[: n - N_BYTE_TOKENS]):
        a, b = m if isinstance(m, list) else m.split(" ")
        assert vocab[a + b] == N_BYTE_TOKENS + k, (k, m)
    tok["model"]["vocab"] = {t: i for t, i in vocab.items() if i < n}
    tok["model"]["merges"] = merges[: n - N_BYTE_TOKENS]
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["id"] < n]
    return tok


TOKENIZER_CONFIG = {
    # Without it AutoTokenizer picks GPTNeoXTokenizer for model_type mamba2, which adds a <|padding|> token
    # (id 4096) and the converter's `max(vocab) < vocab_size` check fails.
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": "<|endoftext|>",
    "eos_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "add_bos_token": False,
    "add_eos_token": False,
}


# --------------------------------------------------------------------------------------------
# GGUF <-> HF (mamba2)
# --------------------------------------------------------------------------------------------
def gguf_tensors(path: Path) -> list:
    """[(name, ggml type name, ne (ggml order), float32 numpy array in numpy order)]"""
    r = gguf.GGUFReader(str(path))
    out = []
    for t in r.tensors:
        ne = [int(x) for x in t.shape]
        arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        arr = arr.reshape(list(reversed(ne)))
        out.append((t.name, t.tensor_type.name, ne, arr))
    return out


def gguf_metadata(path: Path) -> dict:
    """Every key except the token arrays, with its GGUF value type; arrays as type + length."""
    r = gguf.GGUFReader(str(path))
    md = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        types = [gguf.GGUFValueType(t).name for t in f.types]
        if types[0] == "ARRAY":
            md[k] = {"type": f"ARRAY[{types[1]}]", "len": len(f.data)}
        else:
            v = f.contents()
            if isinstance(v, float):
                v = float(np.float32(v))
            md[k] = {"type": types[0], "value": v}
    return md


def gguf_to_hf(tensors: list, case: GCase) -> dict:
    """Map a mamba2 GGUF's tensors back to Mamba2ForCausalLM's state dict (names and shapes)."""
    c = case.mf_case()
    seen = {}
    sd = {}
    for name, _type, _ne, arr in tensors:
        t = torch.from_numpy(np.array(arr, dtype=np.float32, order="C", copy=True))
        seen[name] = True
        if name == "token_embd.weight":
            sd["backbone.embeddings.weight"] = t
        elif name == "output.weight":
            sd["lm_head.weight"] = t
        elif name == "output_norm.weight":
            sd["backbone.norm_f.weight"] = t
        elif name.startswith("blk."):
            _, i, rest = name.split(".", 2)
            p = f"backbone.layers.{int(i)}."
            if rest == "attn_norm.weight":
                sd[p + "norm.weight"] = t
            elif rest == "ssm_in.weight":
                sd[p + "mixer.in_proj.weight"] = t
            elif rest == "ssm_conv1d.weight":  # (conv_dim, d_conv) -> (conv_dim, 1, d_conv)
                sd[p + "mixer.conv1d.weight"] = t.reshape(c.conv_dim, 1, -1)
            elif rest == "ssm_conv1d.bias":
                sd[p + "mixer.conv1d.bias"] = t
            elif rest == "ssm_dt.bias":
                sd[p + "mixer.dt_bias"] = t
            elif rest == "ssm_a":  # (nheads, 1) holding -exp(A_log)
                sd[p + "mixer.A_log"] = torch.log(-t.reshape(-1))
            elif rest == "ssm_d":  # (nheads, 1)
                sd[p + "mixer.D"] = t.reshape(-1)
            elif rest == "ssm_norm.weight":  # (ngroups, d_inner/ngroups) -> (d_inner)
                sd[p + "mixer.norm.weight"] = t.reshape(-1)
            elif rest == "ssm_out.weight":
                sd[p + "mixer.out_proj.weight"] = t
            else:
                raise RuntimeError(f"unmapped GGUF tensor {name}")
        else:
            raise RuntimeError(f"unmapped GGUF tensor {name}")
    return sd


def hf_model_from_gguf(path: Path, case: GCase, cfg) -> Mamba2ForCausalLM:
    sd = gguf_to_hf(gguf_tensors(path), case)
    model = Mamba2ForCausalLM(cfg).eval()
    expected = {k for k in model.state_dict() if not (case.tied and k == "lm_head.weight")}
    assert set(sd) == expected, (set(sd) ^ expected)
    with torch.no_grad():
        for k, v in sd.items():
            dst = model.state_dict()[k]
            assert dst.shape == v.shape, (k, dst.shape, v.shape)
            dst.copy_(v)
    assert (model.lm_head.weight is model.backbone.embeddings.weight) == case.tied
    return model


# How each mamba2 GGUF tensor maps to HF Mamba2ForCausalLM (what gguf_to_hf does; written into the manifest).
GGUF_TO_HF_MAMBA2 = {
    "token_embd.weight": "backbone.embeddings.weight  ne [hidden, rows]",
    "output.weight": "lm_head.weight  ne [hidden, rows]; absent when tied (use token_embd.weight)",
    "output_norm.weight": "backbone.norm_f.weight  ne [hidden]",
    "blk.{i}.attn_norm.weight": "backbone.layers.{i}.norm.weight  ne [hidden]",
    "blk.{i}.ssm_in.weight": "mixer.in_proj.weight  ne [hidden, 2*d_inner + 2*ngroups*d_state + nheads], rows z|x|B|C|dt",
    "blk.{i}.ssm_conv1d.weight": "mixer.conv1d.weight (conv_dim, 1, d_conv) squeezed: ne [d_conv, conv_dim]",
    "blk.{i}.ssm_conv1d.bias": "mixer.conv1d.bias  ne [conv_dim]",
    "blk.{i}.ssm_dt.bias": "mixer.dt_bias  ne [nheads]",
    "blk.{i}.ssm_a": "-exp(mixer.A_log)  ne [1, nheads]  (A_log = log(-ssm_a))",
    "blk.{i}.ssm_d": "mixer.D  ne [1, nheads]",
    "blk.{i}.ssm_norm.weight": "mixer.norm.weight reshaped (ngroups, d_inner/ngroups): ne [d_inner/ngroups, ngroups]",
    "blk.{i}.ssm_out.weight": "mixer.out_proj.weight  ne [d_inner, hidden]",
}


# --------------------------------------------------------------------------------------------
# llama.cpp
# --------------------------------------------------------------------------------------------
# Runs convert_gguf.py with the converter's hparams read verbatim from config.json instead of through
# transformers' AutoConfig. Needed for Nemotron-H: transformers 5.x's NemotronHConfig.to_dict() adds MoE defaults
# (num_experts_per_tok, n_routed_experts, moe_intermediate_size ...) and turns hybrid_override_pattern into
# layers_block_type ["mamba", "mlp", ...]; the converter then writes a dense checkpoint as arch nemotron_h_moe with
# 8 experts and feed_forward_length 0 everywhere, and llama.cpp takes the MLP layers for SSM layers.
RAW_HPARAMS_PY = r"""
import json, os, runpy, sys
from pathlib import Path
src = os.environ["LLAMA_SRC"]
sys.path.insert(0, src)
sys.path.insert(1, os.path.join(src, "gguf-py"))
import conversion.base as base
base.ModelBase.load_hparams = staticmethod(lambda d, is_mistral_format=False: json.loads((Path(d) / "config.json").read_text()))
convert = sys.argv[1]
sys.argv = [convert] + sys.argv[2:]
runpy.run_path(convert, run_name="__main__")
"""


def convert(hf_dir: Path, out: Path, name: str, vocab_only: bool = False, raw_hparams: bool = False) -> str:
    cmd = ["nice", "-n", "10", TOOLS["LLAMA_PY"]]
    if raw_hparams:
        (WORK / "convert_raw_hparams.py").write_text(RAW_HPARAMS_PY)
        cmd.append(WORK / "convert_raw_hparams.py")
    cmd += [TOOLS["CONVERT"], hf_dir, "--outfile", out, "--model-name", name, "--assume-pretokenizer", "gpt-2"]
    cmd += ["--vocab-only"] if vocab_only else ["--outtype", "f32"]
    return sh(cmd)


def quantize(src: Path, out: Path, qtype: str) -> str:
    return sh(["nice", "-n", "10", Path(TOOLS["LLAMA_BIN"]) / "llama-quantize", src, out, qtype, "2"])


def llama_logits(path: Path, ids: list, step: int | None = None) -> np.ndarray:
    tmp = WORK / "logits.f32"
    cmd = ["nice", "-n", "10", Path(TOOLS["LLAMA_BIN"]) / "dump_logits", path, tmp]
    if step is not None:
        cmd += ["--step", step]
    n, nv = map(int, sh(cmd + ids, stdout_only=True).split()[-2:])
    arr = np.fromfile(tmp, dtype=np.float32).reshape(n, nv)
    tmp.unlink()
    return arr


# dump_logits (shared tools) runs llama.cpp with its default context: the attention KV cache in F16. For the hybrid
# families that rounds K and V to f16; this tool of ours does the same runs with an F32 KV cache, to tell that
# round-off apart from real differences. Output format as dump_logits (n_tokens x n_vocab f32).
LOGITS_F32KV_CPP = r"""
// logits_f32kv MODEL.gguf OUT.f32 P id0 id1 ...   (P < 0: one batch; else P tokens, then one per decode)
#include "llama.h"
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
int main(int argc, char ** argv) {
    if (argc < 5) return 2;
    const int P = atoi(argv[3]);
    std::vector<llama_token> ids;
    for (int a = 4; a < argc; a++) ids.push_back(atoi(argv[a]));
    const int n = (int) ids.size();
    llama_backend_init();
    llama_model * model = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (!model) return 1;
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n + 8; cp.n_batch = n; cp.n_ubatch = n; cp.n_threads = 2; cp.n_threads_batch = 2;
    cp.type_k = GGML_TYPE_F32; cp.type_v = GGML_TYPE_F32;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) return 1;
    const int nv = llama_vocab_n_tokens(llama_model_get_vocab(model));
    std::vector<float> out((size_t) n * nv);
    auto feed = [&](int start, int len) {
        llama_batch b = llama_batch_init(len, 0, 1);
        for (int i = 0; i < len; i++) {
            b.token[i] = ids[start + i]; b.pos[i] = start + i; b.n_seq_id[i] = 1; b.seq_id[i][0] = 0; b.logits[i] = 1;
        }
        b.n_tokens = len;
        if (llama_decode(ctx, b)) { fprintf(stderr, "decode failed\n"); exit(1); }
        for (int i = 0; i < len; i++) memcpy(&out[(size_t) (start + i) * nv], llama_get_logits_ith(ctx, i), nv * sizeof(float));
        llama_batch_free(b);
    };
    if (P < 0) feed(0, n); else { feed(0, P); for (int t = P; t < n; t++) feed(t, 1); }
    FILE * f = fopen(argv[2], "wb");
    fwrite(out.data(), sizeof(float), out.size(), f);
    fclose(f);
    printf("%d %d\n", n, nv);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
"""


def _tool(name: str, source: str) -> Path:
    src, exe = WORK / f"{name}.cpp", WORK / name
    if not exe.exists() or not src.exists() or src.read_text() != source:
        src.write_text(source)
        inc = Path(TOOLS["LLAMA_SRC"])
        sh(["g++", "-O2", "-std=c++17", src, f"-I{inc / 'include'}", f"-I{inc / 'ggml' / 'include'}",
            f"-L{TOOLS['LLAMA_BIN']}", "-lllama", "-lggml", "-lggml-base", f"-Wl,-rpath,{TOOLS['LLAMA_BIN']}", "-o", exe])
    return exe


def llama_logits_f32kv(path: Path, ids: list, step: int | None = None) -> np.ndarray:
    tmp = WORK / "logits.f32"
    exe = _tool("logits_f32kv", LOGITS_F32KV_CPP)
    n, nv = map(int, sh(["nice", "-n", "10", exe, path, tmp, -1 if step is None else step] + ids, stdout_only=True).split()[-2:])
    arr = np.fromfile(tmp, dtype=np.float32).reshape(n, nv)
    tmp.unlink()
    return arr


# A small tool of ours on llama.cpp's public API: tokenize strings with a GGUF's vocabulary (vocab_only load).
TOKENIZE_CPP = r"""
// llama_tokenize VOCAB.gguf IN.bin OUT.txt
// IN.bin: strings, each as a little-endian uint32 byte length then the UTF-8 bytes.
// OUT.txt: per string two lines: the ids (llama_tokenize, add_special=false, parse_special=true), space separated;
// then llama_detokenize(ids, remove_special=false, unparse_special=true) as hex.
#include "llama.h"
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>
int main(int argc, char ** argv) {
    if (argc != 4) { fprintf(stderr, "usage: llama_tokenize VOCAB.gguf IN.bin OUT.txt\n"); return 2; }
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.vocab_only = true;
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) return 1;
    const llama_vocab * vocab = llama_model_get_vocab(model);
    FILE * in = fopen(argv[2], "rb");
    FILE * out = fopen(argv[3], "w");
    if (!in || !out) return 1;
    uint32_t n = 0;
    while (fread(&n, 4, 1, in) == 1) {
        std::string s(n, '\0');
        if (n && fread(&s[0], 1, n, in) != n) return 1;
        std::vector<llama_token> toks(n + 16);
        int k = llama_tokenize(vocab, s.data(), (int) n, toks.data(), (int) toks.size(), false, true);
        if (k < 0) { toks.resize(-k); k = llama_tokenize(vocab, s.data(), (int) n, toks.data(), (int) toks.size(), false, true); }
        for (int i = 0; i < k; i++) fprintf(out, i ? " %d" : "%d", toks[i]);
        fprintf(out, "\n");
        std::vector<char> buf(4 * n + 64);
        int m = llama_detokenize(vocab, toks.data(), k, buf.data(), (int) buf.size(), false, true);
        if (m < 0) { buf.resize(-m); m = llama_detokenize(vocab, toks.data(), k, buf.data(), (int) buf.size(), false, true); }
        for (int j = 0; j < m; j++) fprintf(out, "%02x", (unsigned char) buf[j]);
        fprintf(out, "\n");
    }
    fclose(out);
    llama_model_free(model);
    return 0;
}
"""


def llama_tokenize(vocab_gguf: Path, strings: list) -> list:
    exe = _tool("llama_tokenize", TOKENIZE_CPP)
    blob = b"".join(len(b).to_bytes(4, "little") + b for b in (s.encode() for s in strings))
    (WORK / "tok_in.bin").write_bytes(blob)
    sh([exe, vocab_gguf, WORK / "tok_in.bin", WORK / "tok_out.txt"])
    lines = (WORK / "tok_out.txt").read_text().split("\n")
    out = []
    for k in range(len(strings)):
        ids = [int(x) for x in lines[2 * k].split()]
        out.append((ids, bytes.fromhex(lines[2 * k + 1]).decode("utf-8", errors="replace")))
    return out


# --------------------------------------------------------------------------------------------
# llama.cpp's CPU matmul quantizes the activations when the weight is quantized (ggml's vec_dot_type):
# Q8_0 blocks of 32 for Q8_0/Q4_0/Q5_0 weights, Q8_K blocks of 256 for the K-quants. Emulated here at the inputs
# of ssm_in, ssm_out and output (the only quantized matmuls of mamba2; token_embd is a row lookup, exact).
# --------------------------------------------------------------------------------------------
def _f16(x):
    return x.to(torch.float16).to(torch.float32)


def act_q8_0(x, variant="llama"):
    """ggml-cpu quantize_row_q8_0 (AVX2): id = 127/amax, round half to even, scale stored as fp16.
    variant "ref": ggml's scalar reference (id = 1/(amax/127), round half away from zero)."""
    shape = x.shape
    b = x.float().reshape(-1, 32)
    amax = b.abs().amax(-1, keepdim=True)
    d = amax / 127.0
    if variant == "llama":
        iid = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
        q = torch.round(b * iid)
    else:
        iid = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
        v = b * iid
        q = torch.sign(v) * torch.floor(v.abs() + 0.5)
    return (q * _f16(d)).reshape(shape).to(x.dtype)


def act_q8_k(x, variant="llama"):
    """ggml quantize_row_q8_K_ref (what the x86 build calls): max = the signed value of largest |x| (first one),
    iscale = -127/max, q = min(127, nearest_int(iscale*x)) (round half to even), d = 1/iscale (fp32).
    variant "ref": q = round(x / d) (a division instead of the multiplication)."""
    shape = x.shape
    b = x.float().reshape(-1, 256)
    idx = b.abs().argmax(-1, keepdim=True)
    mx = torch.gather(b, -1, idx)
    safe = torch.where(mx != 0, mx, torch.ones_like(mx))
    iscale = -127.0 / safe
    d = 1.0 / iscale
    q = torch.round(iscale * b) if variant == "llama" else torch.round(b / d)
    q = torch.clamp(q, max=127.0)
    out = torch.where(mx != 0, q * d, torch.zeros_like(b))
    return out.reshape(shape).to(x.dtype)


VEC_DOT = {"Q8_0": act_q8_0, "Q4_0": act_q8_0, "Q5_0": act_q8_0, "Q4_K": act_q8_k, "Q5_K": act_q8_k, "Q6_K": act_q8_k}


@torch.no_grad()
def run_act_quant(model, ids_t, types: dict, variant="llama"):
    hooks = []

    def hook(fn):
        return lambda _mod, inp: (fn(inp[0], variant),)

    def add(module, gguf_name):
        t = types[gguf_name]
        if t == "F32":
            return
        hooks.append(module.register_forward_pre_hook(hook(VEC_DOT[t])))

    for i, layer in enumerate(model.backbone.layers):
        add(layer.mixer.in_proj, f"blk.{i}.ssm_in.weight")
        add(layer.mixer.out_proj, f"blk.{i}.ssm_out.weight")
    add(model.lm_head, "output.weight" if "output.weight" in types else "token_embd.weight")
    try:
        return mf.run_prefill(model, ids_t)
    finally:
        for h in hooks:
            h.remove()


# --------------------------------------------------------------------------------------------
# Plausible loader mistakes, to show that the tolerances separate them from round-off
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def mutation_effects(model, ids_t, ref, case: GCase) -> dict:
    import copy

    c = case.mf_case()
    out = {}

    def effect(name, edit):
        m = copy.deepcopy(model)
        for layer in m.backbone.layers:
            edit(layer.mixer)
        out[name] = sig(max_abs(mf.run_prefill(m, ids_t), ref))

    def swap_bc(mx):
        w = mx.in_proj.weight
        gs = case.ngroups * case.d_state
        b0 = 2 * c.d_inner  # z | x | B | C | dt
        b, cc = w[b0 : b0 + gs].clone(), w[b0 + gs : b0 + 2 * gs].clone()
        w[b0 : b0 + gs], w[b0 + gs : b0 + 2 * gs] = cc, b

    def conv_transposed(mx):
        w = mx.conv1d.weight
        w.copy_(w.clone().reshape(-1).reshape(c.d_conv, c.conv_dim).t().reshape(c.conv_dim, 1, c.d_conv))

    effect("A_log_taken_as_ssm_a", lambda mx: mx.A_log.copy_(-torch.exp(mx.A_log)))
    effect("conv1d_weight_read_transposed", conv_transposed)
    effect("conv1d_bias_dropped", lambda mx: mx.conv1d.bias.zero_())
    effect("dt_bias_dropped", lambda mx: mx.dt_bias.zero_())
    effect("D_dropped", lambda mx: mx.D.zero_())
    effect("B_C_swapped", swap_bc)
    if case.ngroups > 1:
        g = c.d_inner // case.ngroups
        effect("ssm_norm_weight_read_transposed",
               lambda mx: mx.norm.weight.copy_(mx.norm.weight.clone().reshape(case.ngroups, g).t().reshape(-1)))
        effect("gated_norm_ungrouped", lambda mx: setattr(mx.norm, "group_size", c.d_inner))
    return out


# --------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------
def hf_config(case: GCase):
    cfg = mf.hf_config(case.mf_case())
    # <|endoftext|> (id 0) is the tokenizer's only special token: bos = eos = pad.
    cfg.bos_token_id = cfg.eos_token_id = cfg.pad_token_id = 0
    return cfg


def write_hf(model, tok: dict, hf_dir: Path):
    if hf_dir.exists():
        shutil.rmtree(hf_dir)
    model.save_pretrained(hf_dir)
    (hf_dir / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False, indent=2) + "\n")
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")


def save_reference(path: Path, tensors: dict, metadata: dict):
    previous = path.read_bytes() if path.exists() else None
    safetensors.torch.save_file(tensors, path, metadata=metadata)
    if previous is not None and mf.same_safetensors(previous, path.read_bytes()):
        path.write_bytes(previous)  # header order is hash-dependent: keep the old bytes when equal


def round_up(x: float, floor: float = 1e-4) -> float:
    """max(x, floor) rounded up to two significant digits."""
    x = max(x, floor)
    step = 10.0 ** (math.floor(math.log10(x)) - 1)
    return float(f"{math.ceil(x / step * (1 - 1e-9)) * step:.2g}")


F32_TOLERANCE = 1e-4  # f32 math on f32 (or exactly dequantized) weights; measured <= 5.6e-6 (llama.cpp f32 vs HF)
# Emulating llama.cpp's activation quantization reproduces its logits to ~2e-6, except where an activation lies on
# a rounding boundary: the inputs differ from llama.cpp's by f32 round-off, so it can round either way; one such flip
# moved one logit by 6.0e-3 (Q4_0 file, position 6). The act-quant tolerance is therefore never below 2e-2.
ACT_QUANT_FLOOR = 2e-2


def build_case(case: GCase, vers: dict) -> dict:
    c = case.mf_case()
    torch.manual_seed(case.seed)
    gen = torch.Generator().manual_seed(case.seed)
    cfg = hf_config(case)
    model = Mamba2ForCausalLM(cfg).eval()
    mf.randomize(model, c, gen)
    if case.rescale:
        with torch.no_grad():
            for layer in model.backbone.layers:
                layer.mixer.in_proj.weight.mul_(math.sqrt(32 / case.hidden))
                layer.mixer.out_proj.weight.mul_(math.sqrt(64 / c.d_inner))
            if not case.tied:
                model.lm_head.weight.mul_(math.sqrt(32 / case.hidden))
    mf.check_gated_norm_is_grouped(model, c, gen)

    tok = truncated_tokenizer(case.tokens)
    ht = tokenizers.Tokenizer.from_str(json.dumps(tok))
    assert ht.get_vocab_size() == case.tokens
    ids = ht.encode(TEXT, add_special_tokens=False).ids
    assert len(ids) >= SEQ, len(ids)
    ids = ids[:SEQ]
    ids_t = torch.tensor([ids], dtype=torch.int64)

    work = WORK / case.name
    work.mkdir(parents=True, exist_ok=True)
    hf_dir = work / "hf"
    write_hf(model, tok, hf_dir)

    # HF reference of the original checkpoint; its decode path agrees with it.
    logits_hf = mf.run_prefill(model, ids_t)
    logits_hf_decode, _ = mf.run_decode(model, ids_t, PREFILL)
    hf_self = max_abs(logits_hf_decode, logits_hf)
    assert hf_self < 1e-4, hf_self

    out_dir = OUT / case.name
    out_dir.mkdir(parents=True, exist_ok=True)
    f32_path = (out_dir if case.commit_f32 else work) / "f32.gguf"
    convert(hf_dir, f32_path, case.name)
    if not case.commit_f32 and (out_dir / "f32.gguf").exists():
        (out_dir / "f32.gguf").unlink()

    # Round trip: the f32 GGUF read back into HF is the original model.
    rt = hf_model_from_gguf(f32_path, case, cfg)
    roundtrip = max_abs(mf.run_prefill(rt, ids_t), logits_hf)
    assert roundtrip <= 1e-6, f"{case.name}: f32 GGUF -> HF round trip {roundtrip:.3g}"
    sd0 = model.state_dict()
    param_rt = {k: max_abs(v, sd0[k]) for k, v in rt.state_dict().items()}
    assert all(v == 0.0 for k, v in param_rt.items() if not k.endswith("A_log")), param_rt
    a_log_rt = max(v for k, v in param_rt.items() if k.endswith("A_log"))

    md = gguf_metadata(f32_path)
    tokens_field = gguf.GGUFReader(str(f32_path)).fields["tokenizer.ggml.tokens"]
    n_pad = sum(1 for i in tokens_field.data if bytes(tokens_field.parts[i]).startswith(b"[PAD"))
    assert n_pad == case.rows - case.tokens, (n_pad, case.rows, case.tokens)
    assert md["tokenizer.ggml.tokens"]["len"] == case.rows

    info = {
        "note": case.note,
        "hf_class": "Mamba2ForCausalLM",
        "config": {
            "hidden_size": case.hidden,
            "num_hidden_layers": case.n_layer,
            "expand": case.expand,
            "d_inner": c.d_inner,
            "head_dim": case.headdim,
            "num_heads": c.nheads,
            "n_groups": case.ngroups,
            "state_size": case.d_state,
            "conv_kernel": c.d_conv,
            "conv_dim": c.conv_dim,
            "d_in_proj": 2 * c.d_inner + 2 * case.ngroups * case.d_state + c.nheads,
            "chunk_size": case.chunk,
            "vocab_size": case.rows,
            "tokenizer_tokens": case.tokens,
            "padded_token_rows": case.rows - case.tokens,
            "tie_word_embeddings": case.tied,
            "residual_in_fp32": True,
            "layer_norm_epsilon": 1e-5,
            "use_bias": False,
            "use_conv_bias": True,
            "time_step_limit": [0.0, "inf"],
            "weights": "make_fixtures.randomize"
            + (" then in_proj and lm_head x sqrt(32/hidden), out_proj x sqrt(64/d_inner)" if case.rescale else ""),
        },
        "text": TEXT,
        "input_ids": ids,
        "prefill_len": PREFILL,
        "checks": {
            "hf_decode_vs_prefill": sig(hf_self),
            "f32_gguf_to_hf_roundtrip_logits": sig(roundtrip),
            "f32_gguf_to_hf_roundtrip_A_log": sig(a_log_rt),
            "logit_abs_max": sig(float(logits_hf.abs().max())),
            "logit_std": sig(float(logits_hf.std())),
        },
        "files": [],
    }

    def one_file(path: Path, ftype: str, ref, ref_aq, committed: bool) -> dict:
        tensors = gguf_tensors(path)
        types = {n: t for n, t, _, _ in tensors}
        l1 = torch.from_numpy(llama_logits(path, ids)).unsqueeze(0)
        l2 = torch.from_numpy(llama_logits(path, ids, step=PREFILL)).unsqueeze(0)
        assert l1.shape == ref.shape, (l1.shape, ref.shape)
        d1, d2 = max_abs(l1, ref), max_abs(l2, ref)
        tail = slice(PREFILL - 1, SEQ)  # last prefill position + the decode steps
        dist = {
            "llama_oneshot_vs_logits": sig(d1),
            "llama_step_vs_logits": sig(d2),
            "llama_step_vs_logits_last_prefill_and_decode": sig(max_abs(l2[:, tail], ref[:, tail])),
            "llama_step_vs_llama_oneshot": sig(max_abs(l1, l2)),
        }
        tols = {"logits_f32_math": F32_TOLERANCE}
        if ref_aq is not None:
            variant = run_act_quant(hf_model_from_gguf(path, case, cfg), ids_t, types, variant="ref")
            a1, a2, av = max_abs(l1, ref_aq), max_abs(l2, ref_aq), max_abs(variant, ref_aq)
            dist.update({
                "llama_oneshot_vs_logits_act_quant": sig(a1),
                "llama_step_vs_logits_act_quant": sig(a2),
                "act_quant_scalar_ref_variant_vs_logits_act_quant": sig(av),
                "logits_act_quant_vs_logits": sig(max_abs(ref_aq, ref)),
                "logits_vs_original_f32_checkpoint": sig(max_abs(ref, logits_hf)),
            })
            tols["logits_any_cpu_math"] = round_up(2 * max(d1, d2))
            tols["logits_act_quant_llama_math"] = round_up(2 * max(a1, a2, av), floor=ACT_QUANT_FLOOR)
        else:
            assert max(d1, d2) < F32_TOLERANCE, dist
        entry = {
            "gguf": f"{case.name}/{path.name}" if committed else f"(not committed) target/gguf_fixtures/{case.name}/{path.name}",
            "ftype": ftype,
            "general.file_type": gguf_metadata(path)["general.file_type"]["value"],
            "bytes": path.stat().st_size,
            "sha256": sha256(path),
            "tensors": [{"name": n, "type": t, "ne": ne} for n, t, ne, _ in tensors],
            "distances": dist,
            "tolerances": tols,
        }
        if ftype != "F32":
            entry["loader_mistake_effects_on_logits"] = mutation_effects(hf_model_from_gguf(path, case, cfg), ids_t, ref, case)
        if committed:
            refp = out_dir / f"{path.stem}.reference.safetensors"
            tensors_out = {
                "input_ids": ids_t.contiguous(),
                "prefill_len": torch.tensor([PREFILL], dtype=torch.int64),
                "logits": ref.contiguous(),
            }
            if ref_aq is not None:
                tensors_out["logits_act_quant"] = ref_aq.contiguous()
            save_reference(refp, tensors_out, {
                "case": case.name,
                "gguf": path.name,
                "gguf_sha256": entry["sha256"],
                "ftype": ftype,
                "generator": GENERATOR,
                "logits": "HF Mamba2ForCausalLM float32 (CPU torch path), one forward over input_ids, weights = "
                + ("the dequantized GGUF tensors" if ref_aq is not None else "the original checkpoint (= the f32 GGUF)"),
                **({"logits_act_quant": "same, with llama.cpp's CPU activation quantization at the inputs of ssm_in, "
                    "ssm_out, output (Q8_0 for Q8_0/Q4_0 weights, Q8_K for K-quants)"} if ref_aq is not None else {}),
                "input_ids": json.dumps(ids),
                "prefill_len": str(PREFILL),
                "tensor_types": json.dumps(types),
                "distances": json.dumps(dist),
                "tolerances": json.dumps(tols),
                **{k: str(v) for k, v in vers.items()},
            })
            entry["reference"] = f"{case.name}/{refp.name}"
        return entry

    info["files"].append(one_file(f32_path, "F32", logits_hf, None, case.commit_f32))
    info["metadata"] = md
    info["loader_mistake_effects_on_logits_f32"] = mutation_effects(rt, ids_t, logits_hf, case)

    for qtype in case.quant_types:
        qpath = out_dir / f"{qtype.lower()}.gguf"
        quantize(f32_path, qpath, qtype)
        qmodel = hf_model_from_gguf(qpath, case, cfg)
        ref = mf.run_prefill(qmodel, ids_t)
        dec, _ = mf.run_decode(qmodel, ids_t, PREFILL)
        assert max_abs(dec, ref) < 1e-4
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(qpath)).tensors}
        ref_aq = run_act_quant(qmodel, ids_t, types)
        info["files"].append(one_file(qpath, qtype, ref, ref_aq, True))
    return info


# --------------------------------------------------------------------------------------------
# Tokenizer: tokenizer_ids.json and the bundled tokenizer as a vocab-only GGUF
# --------------------------------------------------------------------------------------------
def build_tokenizer(vers: dict) -> dict:
    hf_dir = WORK / "tokenizer" / "hf"
    if hf_dir.exists():
        shutil.rmtree(hf_dir)
    hf_dir.mkdir(parents=True)
    shutil.copy(REPO_ROOT / "models" / "mamba2-tiny" / "config.json", hf_dir / "config.json")
    shutil.copy(TOKENIZER, hf_dir / "tokenizer.json")
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    vocab_gguf = OUT / "mamba2_tiny_vocab.gguf"
    convert(hf_dir, vocab_gguf, "mamba2-tiny", vocab_only=True)
    assert not gguf.GGUFReader(str(vocab_gguf)).tensors

    t = tokenizers.Tokenizer.from_file(str(TOKENIZER))
    llama = llama_tokenize(vocab_gguf, TOKENIZER_STRINGS)
    items, disagree = [], []
    for s, (lids, ldec) in zip(TOKENIZER_STRINGS, llama):
        enc = t.encode(s, add_special_tokens=False)
        item = {
            "text": s,
            "ids": enc.ids,
            "tokens": enc.tokens,
            "decoded": t.decode(enc.ids, skip_special_tokens=False),
            "decoded_skip_special": t.decode(enc.ids, skip_special_tokens=True),
            "llama_cpp_ids_equal": lids == enc.ids,
            "llama_cpp_detokenized_equal": ldec == t.decode(enc.ids, skip_special_tokens=False),
        }
        if lids != enc.ids:
            item["llama_cpp_ids"] = lids
            disagree.append(s)
        if ldec != item["decoded"]:
            item["llama_cpp_detokenized"] = ldec
        items.append(item)
    doc = {
        "tokenizer": "models/mamba2-tiny/tokenizer.json",
        "tokenizer_sha256": sha256(TOKENIZER),
        "vocab_gguf": "mamba2_tiny_vocab.gguf",
        "how": "ids/tokens: tokenizers.Tokenizer.from_file(tokenizer.json).encode(text, add_special_tokens=False); "
        "decoded: decode(ids, skip_special_tokens=False); decoded_skip_special: skip_special_tokens=True. "
        "llama_cpp_*: llama.cpp's llama_tokenize(add_special=false, parse_special=true) on mamba2_tiny_vocab.gguf, "
        "and llama_detokenize(remove_special=false, unparse_special=true) of its own ids "
        "(llama_cpp_ids / llama_cpp_detokenized are written only where they differ from HF)",
        "tokenizers": vers["tokenizers"],
        "llama_cpp_commit": vers["llama_cpp_commit"],
        "generator": GENERATOR,
        "cases": items,
    }
    (OUT / "tokenizer_ids.json").write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n")
    return {
        "vocab_gguf": "mamba2_tiny_vocab.gguf",
        "bytes": vocab_gguf.stat().st_size,
        "sha256": sha256(vocab_gguf),
        "metadata": gguf_metadata(vocab_gguf),
        "strings": len(items),
        "llama_cpp_ids_disagree_with_hf": disagree,
    }


# --------------------------------------------------------------------------------------------
# Hybrid families: the existing HF fixtures of tests/fixtures/hybrid/ converted to f32 GGUF, checked against
# their reference logits (HF f32 prefill) with llama.cpp.
# --------------------------------------------------------------------------------------------
HYBRID = REPO_ROOT / "tests" / "fixtures" / "hybrid"
HYBRID_CASES = [
    "granite_nope_tied_b2",
    "granite_rope_untied_limit_b1",
    "nemotron_h_g2_b3",
    "nemotron_h_hd80_b1",
    "falcon_h1_rmsnorm_g2_b2",
    "falcon_h1_nonorm_tied_b1",
    "bamba_b2",
]
# Committed under tests/fixtures/gguf/hybrid/: the families whose GGUF reproduces the HF reference (the others'
# listings and measurements are in the manifest only).
HYBRID_COMMIT = {"granite_nope_tied_b2", "nemotron_h_g2_b3", "falcon_h1_rmsnorm_g2_b2", "falcon_h1_nonorm_tied_b1"}
HYBRID_NOTES = {
    "granite_nope_tied_b2": "converted from hub/ (layer_types in the Hub spelling mamba/attention); llama.cpp = HF",
    "granite_rope_untied_limit_b1": "llama.cpp cannot run it: its granite-hybrid graph asserts d_inner == 2*hidden "
    "(GGML_ASSERT(2 * n_embd == d_inner); mamba_expand is 1 here). The converter also writes "
    "rope.scaling.finetuned = false (= no RoPE) for every GraniteMoeHybrid that has SSM layers, so "
    "position_embedding_type rope is dropped, and time_step_limit has no GGUF key.",
    "nemotron_h_g2_b3": "converted with the converter's hparams read from config.json (RAW_HPARAMS_PY): through "
    "transformers 5.x's AutoConfig it writes arch nemotron_h_moe with 8 experts and feed_forward_length 0, and llama.cpp "
    "fails (tensor 'blk.1.ssm_in.weight' not found). The GGUF has no time_step_min: HF clamps dt >= 0.001 in its chunked "
    "path and llama.cpp never clamps; without the clamp HF is 1.2e-3 from llama.cpp (rest not explained; an F32 KV "
    "cache gives the same numbers).",
    "nemotron_h_hd80_b1": "the converter refuses it: it checks d_inner % d_head with d_head looked up as "
    "d_head/mamba_d_head (Nemotron spells it mamba_head_dim), so 64 by default, and d_inner is 160 (head dim 80).",
    "falcon_h1_rmsnorm_g2_b2": "llama.cpp has no mamba_norm_before_gate (true here): it always normalises y*silu(z); "
    "HF with norm_before_gate false is 1.2e-3 from llama.cpp.",
    "falcon_h1_nonorm_tied_b1": "tied: the converter multiplies token_embd by embedding_multiplier and writes no "
    "output.weight, so llama.cpp's output matrix is embedding_multiplier*E and lm_head_multiplier is lost; HF with "
    "lm_head_multiplier = embedding_multiplier is 5.5e-3 from llama.cpp. (mamba_rms_norm false: no ssm_norm tensor, "
    "and llama.cpp skips the norm as HF does.)",
    "bamba_b2": "position 0 agrees (3.5e-4), later positions differ by up to 1.65: RoPE (attn_rotary_emb 8 of head "
    "dim 16, rope.scaling.finetuned true = RoPE on) is applied differently; not investigated further.",
}


# Mixture-of-experts hybrids (issue 16): the HF fixtures of tests/fixtures/moe/ converted the same way, committed under
# tests/fixtures/gguf/moe/ (all three: the grouped Nemotron case is the converter's output that llama.cpp cannot load).
MOE = REPO_ROOT / "tests" / "fixtures" / "moe"
MOE_CASES = ["granite_moe_b2", "nemotron_moe_grouped_b2", "nemotron_moe_flat_b1"]
HYBRID_NOTES.update({
    "granite_moe_b2": "arch granitehybrid with expert_count 8, expert_used_count 3, feed_forward_length 16 (the experts' "
    "width), expert_shared_feed_forward_length 24; input_linear split into ffn_gate_exps | ffn_up_exps (E, I, H) each, "
    "output_linear -> ffn_down_exps, router -> ffn_gate_inp, shared_mlp -> ffn_{gate,up,down}_shexp. The converter "
    "writes rope.scaling.finetuned = false (no RoPE) for a GraniteMoeHybrid with SSM layers, so llama.cpp runs this "
    "position_embedding_type rope model without RoPE: its reference is variant_reference (HF with "
    "position_embedding_type nope).",
    "nemotron_moe_grouped_b2": "arch nemotron_h_moe (expert_count 8, expert_used_count 3, expert_group_count 4, "
    "expert_group_used_count 2, expert_weights_norm true, expert_weights_scale 2.5, expert_feed_forward_length 16, "
    "expert_shared_feed_forward_length 20). Its dense MLP layer 4 (`-` in ME*E-M) cannot be expressed: the converter "
    "writes feed_forward_length 0 for it (only E layers get a length) and head_count_kv 0, so llama.cpp takes it for a "
    "Mamba-2 layer and fails to load (blk.4.ssm_in.weight not found); its ffn_up/ffn_down tensors are in the file.",
    "nemotron_moe_flat_b1": "arch nemotron_h_moe, one group (expert_group_count 1, expert_group_used_count 1), "
    "expert_weights_norm false, expert_weights_scale 1. Experts stacked as ffn_up_exps (E, I, H) / ffn_down_exps "
    "(E, H, I), gate -> ffn_gate_inp, e_score_correction_bias -> exp_probs_b.bias, shared experts -> ffn_*_shexp. As "
    "for nemotron_h, the GGUF has no time_step_min: HF clamps dt >= 0.001 in its chunked path, llama.cpp never does.",
})


@torch.no_grad()
def save_granite_moe_variant(name: str, gguf_path: Path, ref: dict) -> dict:
    """tests/fixtures/gguf/moe/<name>.variant.safetensors: HF's GraniteMoeHybrid as llama.cpp runs the converted file
    (position_embedding_type nope: the converter turns RoPE off), f32 prefill, decode through HF's cache, bf16 prefill
    and the experts the f32 prefill chose (sorted per token); llama.cpp's own distances to it beside."""
    import hybrid_fixtures as hfx
    from moe_fixtures import RoutingLog
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = MOE / name / "hf"
    hcfg = AutoConfig.from_pretrained(hf)
    hcfg.position_embedding_type = "nope"
    model = AutoModelForCausalLM.from_pretrained(hf, config=hcfg).eval()
    ids, p = ref["input_ids"], int(ref["prefill_len"][0])
    log = RoutingLog(model)
    prefill = hfx.run_prefill(model, ids)
    log.close()
    routing = {i: c[0].reshape(ids.shape[0], ids.shape[1], -1).sort(dim=-1)[0].float() for i, c in log.calls.items()}
    decode, _ = hfx.run_decode(model, ids, p)
    bf16 = AutoModelForCausalLM.from_pretrained(hf, config=hcfg, dtype=torch.bfloat16).eval()
    prefill_bf16 = hfx.run_prefill(bf16, ids)
    out = OUT / "moe" / f"{name}.variant.safetensors"
    variant = "HF with position_embedding_type nope (the converter writes rope.scaling.finetuned false)"
    save_reference(out, {"input_ids": ids.contiguous(), "prefill_len": ref["prefill_len"].contiguous(),
                         "logits_prefill": prefill.contiguous(), "logits_decode": decode.contiguous(),
                         "logits_prefill_bf16": prefill_bf16.contiguous()}
                   | {f"routing.{i}": r.contiguous() for i, r in routing.items()},
                   {"generator": GENERATOR, "variant": variant})
    d1 = d2 = 0.0
    for b in range(ids.shape[0]):
        d1 = max(d1, max_abs(torch.from_numpy(llama_logits(gguf_path, ids[b].tolist())), prefill[b]))
        d2 = max(d2, max_abs(torch.from_numpy(llama_logits(gguf_path, ids[b].tolist(), step=p)), decode[b]))
    return {"file": f"moe/{out.name}", "variant": variant, "hf_decode_vs_prefill": sig(max_abs(decode, prefill)),
            "hf_bf16_prefill_vs_f32": sig(max_abs(prefill_bf16, prefill)),
            "llama_oneshot_vs_variant_prefill": sig(d1), "llama_step_vs_variant_decode": sig(d2)}


# Expert tensors quantized by llama-quantize, everything else kept f32 (--tensor-type overrides): the experts whose
# rows are whole blocks (gate/up: H = 32 columns; down has I = 16 and stays f32).
MOE_QUANT = ["Q8_0", "Q4_0"]
MOE_F32_KEEP = ["ssm_in", "ssm_out", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_shexp", "ffn_up_shexp",
                "ffn_down_shexp", "ffn_down_exps", "ffn_gate_inp"]


@torch.no_grad()
def build_moe_quant(name: str, f32_path: Path, ref: dict) -> list:
    """tests/fixtures/gguf/moe/<name>.<type>.gguf (llama-quantize, experts only) and its reference: HF's model (the
    file's semantics: NoPE Granite) with every quantized expert tensor replaced by gguf-py's exact dequantization,
    f32 prefill and decode through HF's cache; llama.cpp's distances to it (it also quantizes the activations)."""
    import hybrid_fixtures as hfx
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = MOE / name / "hf"
    hcfg = AutoConfig.from_pretrained(hf)
    if hcfg.model_type == "granitemoehybrid":
        hcfg.position_embedding_type = "nope"
    ids, p = ref["input_ids"], int(ref["prefill_len"][0])
    out = []
    for qtype in MOE_QUANT:
        path = OUT / "moe" / f"{name}.{qtype.lower()}.gguf"
        keep = [a for t in MOE_F32_KEEP for a in ("--tensor-type", f"{t}=f32")]
        sh(["nice", "-n", "10", Path(TOOLS["LLAMA_BIN"]) / "llama-quantize", "--token-embedding-type", "f32",
            "--output-tensor-type", "f32", *keep, f32_path, path, qtype, "2"])
        model = AutoModelForCausalLM.from_pretrained(hf, config=hcfg).eval()
        unquantized = hfx.run_prefill(model, ids)
        params = dict(model.named_parameters())
        quantized = []
        for t in gguf.GGUFReader(str(path)).tensors:
            if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                continue
            w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
            layer = int(t.name.split(".")[1])
            quantized.append(f"{t.name} {t.tensor_type.name}")
            if hcfg.model_type == "granitemoehybrid":
                gate_up = params[f"model.layers.{layer}.block_sparse_moe.experts.gate_up_proj"]
                i = gate_up.shape[1] // 2
                half = {"ffn_gate_exps.weight": 0, "ffn_up_exps.weight": 1}[t.name.split(".", 2)[2]]
                gate_up[:, half * i:(half + 1) * i, :] = w
            else:
                assert t.name.endswith("ffn_up_exps.weight"), t.name
                params[f"model.layers.{layer}.mixer.experts.up_proj"].copy_(w)
        prefill = hfx.run_prefill(model, ids)
        decode, _ = hfx.run_decode(model, ids, p)
        reference = OUT / "moe" / f"{name}.{qtype.lower()}.hf.safetensors"
        save_reference(reference, {"input_ids": ids.contiguous(), "prefill_len": ref["prefill_len"].contiguous(),
                                   "logits_prefill": prefill.contiguous(), "logits_decode": decode.contiguous()},
                       {"generator": GENERATOR, "reference": "HF with the file's expert tensors exactly dequantized "
                        "(gguf.quants.dequantize)" + (", position_embedding_type nope" if "granite" in name else "")})
        d1 = d2 = 0.0
        for b in range(ids.shape[0]):
            d1 = max(d1, max_abs(torch.from_numpy(llama_logits(path, ids[b].tolist())), prefill[b]))
            d2 = max(d2, max_abs(torch.from_numpy(llama_logits(path, ids[b].tolist(), step=p)), decode[b]))
        out.append({"gguf": f"moe/{path.name}", "bytes": path.stat().st_size, "sha256": sha256(path),
                    "reference": f"moe/{reference.name}", "quantized_tensors": quantized,
                    "reference_vs_unquantized_prefill": sig(max_abs(prefill, unquantized)),
                    "llama_oneshot_vs_reference_prefill": sig(d1), "llama_step_vs_reference_decode": sig(d2)})
    return out


def falcon_h1_as_llama_runs_it(name: str, cfg: dict):
    """The HF Falcon-H1 model that a converted GGUF holds (llama.cpp's semantics), and what was changed: llama.cpp
    always gates, then normalises (no mamba_norm_before_gate), and for a tied model the converter multiplies token_embd
    by embedding_multiplier and writes no output.weight, so lm_head_multiplier is lost."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = HYBRID / name / "hf"
    hcfg = AutoConfig.from_pretrained(hf)
    notes = []
    if cfg.get("mamba_rms_norm") and cfg.get("mamba_norm_before_gate"):
        hcfg.mamba_norm_before_gate = False
        notes.append("mamba_norm_before_gate = False (llama.cpp always gates, then normalises)")
    variant = AutoModelForCausalLM.from_pretrained(hf, config=hcfg).eval()
    if cfg.get("tie_word_embeddings"):
        variant.model.lm_head_multiplier = cfg["embedding_multiplier"]
        notes.append("lm_head_multiplier = embedding_multiplier (tied: llama.cpp's output is token_embd, which the "
                     "converter multiplied by embedding_multiplier; lm_head_multiplier is lost)")
    return variant, notes


@torch.no_grad()
def save_falcon_variant(name: str, cfg: dict, gguf_path: Path, ref: dict) -> dict:
    """tests/fixtures/gguf/hybrid/<name>.variant.safetensors: the prefill logits of every batch row of HF's model in
    llama.cpp's semantics (falcon_h1_as_llama_runs_it), the reference of a converted Falcon-H1 GGUF; llama.cpp's own
    logits on the file are recorded beside it (max |difference| per row)."""
    variant, notes = falcon_h1_as_llama_runs_it(name, cfg)
    ids_all = ref["input_ids"]
    logits = variant(input_ids=ids_all).logits.float().contiguous()
    out = OUT / "hybrid" / f"{name}.variant.safetensors"
    save_reference(out, {"input_ids": ids_all.contiguous(), "logits_prefill": logits},
                   {"generator": GENERATOR, "variant": "HF with " + "; ".join(notes)})
    rows = [sig(max_abs(torch.from_numpy(llama_logits(gguf_path, ids_all[b].tolist())), logits[b]))
            for b in range(ids_all.shape[0])]
    return {"file": f"hybrid/{out.name}", "variant": "HF with " + "; ".join(notes),
            "llama_oneshot_vs_variant_by_row": rows}


@torch.no_grad()
def hybrid_explain(name: str, cfg: dict, gguf_path: Path, ref: dict) -> dict:
    """Where llama.cpp and the HF reference differ: the HF model with the one semantic llama.cpp lacks switched
    to llama.cpp's behaviour, compared with llama.cpp (row 0)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    ids = ref["input_ids"][0].tolist()
    ll = torch.from_numpy(llama_logits(gguf_path, ids))
    per_pos = (ll - ref["logits_prefill"][0]).abs().amax(-1)
    out = {"row0_llama_vs_logits_prefill_by_position": [sig(float(x), 2) for x in per_pos]}
    hf = HYBRID / name / "hf"
    hcfg = AutoConfig.from_pretrained(hf)
    variant = None
    if cfg["model_type"] == "nemotron_h":
        out["variant"] = "HF without its dt clamp (mixer.time_step_limit = (0, inf) instead of (time_step_min, inf))"
        variant = AutoModelForCausalLM.from_pretrained(hf).eval()
        for mod in variant.modules():
            if hasattr(mod, "time_step_limit"):
                mod.time_step_limit = (0.0, float("inf"))
    elif cfg["model_type"] == "falcon_h1":
        variant, notes = falcon_h1_as_llama_runs_it(name, cfg)
        out["variant"] = "HF with " + "; ".join(notes)
    if variant is not None:
        v = variant.eval()(input_ids=torch.tensor([ids])).logits[0].float()
        out["variant_vs_llama"] = sig(max_abs(v, ll))
        out["variant_vs_logits_prefill"] = sig(max_abs(v, ref["logits_prefill"][0]))
    return out


def tiny_tokenizer(n: int, specials: dict) -> dict:
    """A byte-level BPE of exactly n tokens for the hybrid fixtures (vocab 128): the special tokens at their config
    ids, then the byte-level symbols of tab, newline and the 95 printable ASCII bytes, then the bundled tokenizer's
    first merges whose parts are already in the vocabulary. (Non-ASCII bytes have no token: fine for ids given as
    numbers; the converter and llama.cpp only need a consistent vocabulary of the right size.)"""
    base = json.loads(TOKENIZER.read_text())
    byte_sym = {b: base_sym for base_sym, b in _bytes_to_unicode_inv().items()}
    vocab = {}
    for tid in sorted(specials.values()):
        vocab[[k for k, v in specials.items() if v == tid][0]] = tid
    nxt = max(specials.values()) + 1
    for b in [9, 10] + list(range(32, 127)):
        vocab[byte_sym[b]] = nxt
        nxt += 1
    merges = []
    for m in base["model"]["merges"]:
        if nxt >= n:
            break
        a, b = m if isinstance(m, list) else m.split(" ")
        if a in vocab and b in vocab and a + b not in vocab:
            vocab[a + b] = nxt
            merges.append([a, b])
            nxt += 1
    assert nxt == n and sorted(vocab.values()) == list(range(n))
    tok = dict(base)
    tok["added_tokens"] = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True}
        for t, i in sorted(specials.items(), key=lambda kv: kv[1])
    ]
    tok["model"] = dict(base["model"], vocab=vocab, merges=merges)
    return tok


def _bytes_to_unicode_inv() -> dict:
    """GPT-2's byte -> printable-unicode map, inverted (symbol -> byte)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    k = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + k)
            k += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def build_hybrid(name: str, vers: dict) -> dict:
    moe = name in MOE_CASES
    fixtures = MOE if moe else HYBRID
    src = fixtures / name / "hub"
    cfg = json.loads((src / "config.json").read_text())
    work = WORK / "hybrid" / name
    if work.exists():
        shutil.rmtree(work)
    hf_dir = work / "hub"
    shutil.copytree(src, hf_dir)
    specials = {"<|pad|>": cfg["pad_token_id"], "<|bos|>": cfg["bos_token_id"], "<|eos|>": cfg["eos_token_id"]}
    assert sorted(specials.values()) == [0, 1, 2], specials
    (hf_dir / "tokenizer.json").write_text(json.dumps(tiny_tokenizer(cfg["vocab_size"], specials), ensure_ascii=False, indent=1) + "\n")
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|eos|>",
        "pad_token": "<|pad|>", "add_bos_token": False, "add_eos_token": False}, indent=2) + "\n")
    committed = moe or name in HYBRID_COMMIT
    out_dir = OUT / ("moe" if moe else "hybrid")
    out = (out_dir if committed else work) / f"{name}.f32.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    stale = out_dir / f"{name}.f32.gguf"
    if not committed and stale.exists():
        stale.unlink()
    try:
        log = convert(hf_dir, out, name, raw_hparams=cfg["model_type"] == "nemotron_h")
    except ToolError as e:  # the converter refuses the config
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        return {"hf_class": cfg["architectures"][0], "converter_error": lines[-1][:400], "note": HYBRID_NOTES.get(name, "")}
    tensors = gguf_tensors(out)
    md = gguf_metadata(out)
    r = gguf.GGUFReader(str(out))
    arrays = {}
    for k, f in r.fields.items():  # per-layer arrays (e.g. head_count_kv) are what tells layer kinds apart
        if k.startswith(("GGUF.", "tokenizer.")):
            continue
        if gguf.GGUFValueType(f.types[0]).name == "ARRAY":
            arrays[k] = [v.item() if hasattr(v, "item") else v for v in f.contents()]
    ref = safetensors.torch.load_file(fixtures / name / "reference.safetensors")
    ids_all, p = ref["input_ids"], int(ref["prefill_len"][0])
    d1 = d2 = dd = f1 = f2 = 0.0
    llama_error = None
    try:
        for b in range(ids_all.shape[0]):
            ids = ids_all[b].tolist()
            l1 = torch.from_numpy(llama_logits(out, ids))
            l2 = torch.from_numpy(llama_logits(out, ids, step=p))
            d1 = max(d1, max_abs(l1, ref["logits_prefill"][b]))
            d2 = max(d2, max_abs(l2, ref["logits_prefill"][b]))
            dd = max(dd, max_abs(l2, ref["logits_decode"][b]))
            f1 = max(f1, max_abs(torch.from_numpy(llama_logits_f32kv(out, ids)), ref["logits_prefill"][b]))
            f2 = max(f2, max_abs(torch.from_numpy(llama_logits_f32kv(out, ids, step=p)), ref["logits_prefill"][b]))
    except ToolError as e:  # llama.cpp refuses the model (e.g. an assertion in its graph)
        llama_error = [ln for ln in str(e).splitlines() if "GGML_ASSERT" in ln or "error" in ln.lower()][-3:] or [str(e)[:300]]
    warnings = sorted({ln.split(":", 2)[-1].strip() for ln in log.splitlines() if ln.startswith("WARNING")})
    explain = hybrid_explain(name, cfg, out, ref) if llama_error is None and d1 > 1e-4 and not moe else None
    variant_ref = save_falcon_variant(name, cfg, out, ref) if cfg["model_type"] == "falcon_h1" else None
    if moe and cfg["model_type"] == "granitemoehybrid" and llama_error is None:
        variant_ref = save_granite_moe_variant(name, out, ref)
    quantized = build_moe_quant(name, out, ref) if moe and llama_error is None else None
    return {
        "hf_class": cfg["architectures"][0],
        "note": HYBRID_NOTES.get(name, ""),
        **({"proposed_tolerance_vs_logits_prefill": round_up(2 * max(d1, d2))} if committed else {}),
        "source": f"tests/fixtures/{fixtures.name}/{name}/hub/ (Hub spelling of the config) + a 128-token byte-level "
        "BPE (tiny_tokenizer) + tokenizer_config.json",
        "gguf": f"{out_dir.name}/{out.name}" if committed else f"(not committed) target/gguf_fixtures/hybrid/{name}/{out.name}",
        "bytes": out.stat().st_size,
        "sha256": sha256(out),
        "reference": f"tests/fixtures/{fixtures.name}/{name}/reference.safetensors (logits_prefill, every batch row)",
        "prefill_len": p,
        "distances": None if llama_error else {
            "llama_oneshot_vs_logits_prefill": sig(d1),
            "llama_step_vs_logits_prefill": sig(d2),
            "llama_step_vs_logits_decode": sig(dd),
            "llama_f32_kv_cache_oneshot_vs_logits_prefill": sig(f1),
            "llama_f32_kv_cache_step_vs_logits_prefill": sig(f2),
        },
        **({"llama_cpp_error": llama_error} if llama_error else {}),
        **({"difference_analysis": explain} if explain else {}),
        **({"variant_reference": variant_ref} if variant_ref else {}),
        **({"quantized_experts": quantized} if quantized else {}),
        "converter_warnings": warnings,
        "metadata": md,
        "metadata_arrays": arrays,
        "tensors": [{"name": n, "type": t, "ne": ne} for n, t, ne, _ in tensors],
    }


# --------------------------------------------------------------------------------------------
def main(argv):
    names = [c.name for c in CASES]
    wanted = set(argv[1:])
    unknown = wanted - set(names) - set(HYBRID_CASES) - set(MOE_CASES) - {"tokenizer"}
    if unknown:
        sys.exit(f"unknown case(s): {sorted(unknown)}; known: {names + HYBRID_CASES + MOE_CASES + ['tokenizer']}")
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    vers = versions()
    print(json.dumps(vers))
    manifest_path = OUT / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest = {
        "generator": GENERATOR,
        "versions": vers,
        "gguf_to_hf_mamba2": GGUF_TO_HF_MAMBA2,
        "tokenizer": manifest.get("tokenizer"),
        "cases": manifest.get("cases", {}),
        "hybrid": manifest.get("hybrid", {}),
        "moe": manifest.get("moe", {}),
    }
    if not wanted or "tokenizer" in wanted:
        manifest["tokenizer"] = build_tokenizer(vers)
        print(f"== tokenizer: llama.cpp disagrees with HF on {manifest['tokenizer']['llama_cpp_ids_disagree_with_hf']}")
    for case in CASES:
        if wanted and case.name not in wanted:
            continue
        info = build_case(case, vers)
        manifest["cases"][case.name] = info
        print(f"== {case.name}  {info['checks']}")
        for f in info["files"]:
            print(f"   {f['ftype']:7s} {f['bytes']:9d} B  {f['distances']}  tol {f['tolerances']}")
            if "loader_mistake_effects_on_logits" in f:
                print(f"           mistakes: {f['loader_mistake_effects_on_logits']}")
    for name in HYBRID_CASES:
        if wanted and name not in wanted:
            continue
        h = build_hybrid(name, vers)
        manifest["hybrid"][name] = h
        print(f"== hybrid {name}  {h.get('bytes')} B  {h.get('distances')}  {h.get('llama_cpp_error', '')}"
              f"{h.get('converter_error', '')}")
    for name in MOE_CASES:
        if wanted and name not in wanted:
            continue
        h = build_hybrid(name, vers)
        manifest["moe"][name] = h
        print(f"== moe {name}  {h.get('bytes')} B  {h.get('distances')}  {h.get('llama_cpp_error', '')}"
              f"{h.get('converter_error', '')}  {h.get('variant_reference', '')}")
    manifest["cases"] = {k: manifest["cases"][k] for k in names if k in manifest["cases"]}
    manifest["hybrid"] = {k: manifest["hybrid"][k] for k in HYBRID_CASES if k in manifest["hybrid"]}
    manifest["moe"] = {k: manifest["moe"][k] for k in MOE_CASES if k in manifest["moe"]}
    manifest_path.write_text(json.dumps(manifest, ensure_ascii=False, indent=1) + "\n")
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"tests/fixtures/gguf total: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main(sys.argv)
