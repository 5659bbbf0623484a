#!/usr/bin/env python3
"""Vocab-only GGUF files and reference token ids for the GGUF tokenizer tests and fuzz seeds.

    eval "$(bash ../shared/tools/llama-cpp.sh)"     # gives $LLAMA_PY and $LLAMA_SRC
    $LLAMA_PY scripts/gguf_vocab_fixture.py         # rewrites the files below; a rerun is byte-identical

Writes, under crates/mamba2/tests/data/gguf/:
- mamba2-tiny-vocab.gguf: llama.cpp's converter (`--vocab-only --assume-pretokenizer gpt-2`) on the
  bundled model's byte-level BPE tokenizer (models/mamba2-tiny). The converter's AutoTokenizer would
  pick transformers' GPTNeoXTokenizer for a mamba2 config, which adds a `<|padding|>` token the
  tokenizer.json does not have, so the copy gets a tokenizer_config.json naming the plain fast class.
- mamba2-tiny-ids.json: for each test string, HF `tokenizers` (python) ids of the original
  tokenizer.json without and with special tokens, and its decode of those ids (keeping and
  skipping special tokens).
- tiny-spm-vocab.gguf: a 400-piece SentencePiece BPE model (byte fallback) trained here on a fixed
  text, converted by the same converter (its `tokenizer.model` path, `tokenizer.ggml.model` llama),
  with add_bos_token true.
- tiny-spm-ids.json: reference ids from SentencePiece itself (and its decoding, beside HF's), run on each piece of text between
  special tokens (<s>, </s>, <unk>) with those tokens' ids in between: SentencePiece, llama.cpp and
  HF's legacy Llama tokenizer all tokenize that way (a `▁` before the text and after every special
  token). Also the ids of transformers' current LlamaTokenizer (Metaspace: no second `▁` when a
  piece already starts with a space, none after special tokens), for the cases where the two agree.

and under fuzz/seeds/gguf_file/: small v2 and v3 files with every metadata type, nested arrays and
three tensors (F32, F16, Q8_0), a 300-token sub-vocabulary of the bundled tokenizer, and the
SentencePiece vocabulary.
"""
import codecs
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "crates/mamba2/tests/data/gguf"
SEEDS = ROOT / "fuzz/seeds/gguf_file"
SRC = os.environ.get("LLAMA_SRC") or sys.exit('LLAMA_SRC is not set: eval "$(bash ../shared/tools/llama-cpp.sh)" first')
sys.path.insert(0, os.path.join(SRC, "gguf-py"))
import gguf  # noqa: E402
import numpy as np  # noqa: E402

CONVERT = ROOT.parent / "shared/tools/llama-cpp/convert_gguf.py"

STRINGS = [
    "",
    "Hello world",
    " Hello world",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife.",
    "Mr. Darcy's letter -- \"what?\" (yes); [no]! {maybe}... #1 @home $5.00 100% a&b a*b+c=d ~x `y` ^z |p| back\\slash",
    "0 1 12 123 1234 12345 3.14159 2024-01-31 1,000,000",
    "  two leading spaces",
    "trailing spaces   ",
    "a  b   c    d",
    " ",
    "   ",
    "\n",
    "\n\n",
    "line one\nline two\n\n\nline five",
    "\t",
    "tab\tseparated\tvalues",
    " \t \n \r\n mixed whitespace",
    "Café déjà vu, naïve façade, Ærøskøbing, Straße, señor, crème brûlée",
    "Ελληνικά, русский текст, עברית, العربية",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 🦙🚀😶\u200d🌫️✅ 👍🏽 family 👨\u200d👩\u200d👧",
    "don't won't it's we'll they're I'm you've he'd",
    "combining e\u0301 vs precomposed é",
    "\u00a0non-breaking\u2009thin\u3000ideographic spaces",
    "zero\u200bwidth",
    "supercalifragilisticexpialidocious" * 8,
]
GPT2_SPECIAL = [
    "<|endoftext|>",
    "before<|endoftext|>after",
    "text <|endoftext|> more text<|endoftext|>",
    "<|endoftext|><|endoftext|>",
]
SPM_SPECIAL = ["<s>", "</s>", "<unk>", "a<s>b", "Hello</s> world", "<s> leading space after bos"]


def convert(model_dir: Path, out: Path, extra=()):
    cmd = [sys.executable, str(CONVERT), str(model_dir), "--vocab-only", "--outfile", str(out), *extra]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def bundled(tmp: Path):
    from tokenizers import Tokenizer

    src = ROOT / "models/mamba2-tiny"
    d = tmp / "tiny"
    d.mkdir()
    for f in ("config.json", "tokenizer.json"):
        shutil.copy(src / f, d / f)
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    convert(d, OUT / "mamba2-tiny-vocab.gguf", ["--assume-pretokenizer", "gpt-2"])
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    cases = []
    for text in STRINGS + GPT2_SPECIAL:
        ids = tok.encode(text, add_special_tokens=False).ids
        cases.append({
            "text": text,
            "ids": ids,
            "ids_with_special": tok.encode(text, add_special_tokens=True).ids,
            "decode": tok.decode(ids, skip_special_tokens=False),
            "decode_skip_special": tok.decode(ids, skip_special_tokens=True),
        })
    write_json(OUT / "mamba2-tiny-ids.json", {
        "reference": "HF tokenizers (python) on models/mamba2-tiny/tokenizer.json",
        "cases": cases,
    })
    return tok


def spm_corpus() -> str:
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen of Python
        import this
    zen = codecs.decode(this.s, "rot13")
    extra = (
        "Hello world! Äpfel und Birnen. Café déjà vu, naïve façade. Straße.\n"
        "Ελληνικά, русский текст. 日本語のテキスト、中文文本. 12345 3.14159\n"
    )
    return (zen + "\n") * 3 + extra * 2


def tiny_spm(tmp: Path):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    corpus = tmp / "corpus.txt"
    corpus.write_text(spm_corpus(), encoding="utf-8")
    prefix = tmp / "spm"
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, num_threads=1, split_digits=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", minloglevel=2,
    )
    d = tmp / "spm_model"
    d.mkdir()
    shutil.copy(f"{prefix}.model", d / "tokenizer.model")
    cfg = json.loads((ROOT / "models/mamba2-tiny/config.json").read_text())
    cfg.update(vocab_size=400, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
    }))
    convert(d, OUT / "tiny-spm-vocab.gguf")

    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    specials = {sp.id_to_piece(i): i for i in range(3)}  # <unk> <s> </s>
    hf = AutoTokenizer.from_pretrained(str(d))
    cases = []
    for text in STRINGS + SPM_SPECIAL:
        ids = []
        for piece in split_specials(text, specials):
            ids += [specials[piece]] if piece in specials else sp.encode(piece)
        cases.append({
            "text": text,
            "ids": ids,
            "ids_with_special": [sp.bos_id()] + ids,
            # HF's decoder (the same Replace/ByteFallback/Fuse/Strip in its legacy and current
            # forms); SentencePiece's own decoding drops control pieces and shows <unk> as " ⁇ ".
            "decode": hf.backend_tokenizer.decode(ids, skip_special_tokens=False),
            "decode_skip_special": hf.backend_tokenizer.decode(ids, skip_special_tokens=True),
            "sp_decode": sp.decode(ids),
            "hf_ids": hf.encode(text, add_special_tokens=False),
        })
    write_json(OUT / "tiny-spm-ids.json", {
        "reference": "SentencePiece on the text between special tokens; hf_ids: transformers "
                     f"{__import__('transformers').__version__} LlamaTokenizer",
        "cases": cases,
    })


def split_specials(text, specials):
    out, i, start = [], 0, 0
    while i < len(text):
        hit = next((s for s in specials if text.startswith(s, i)), None)
        if hit:
            if start < i:
                out.append(text[start:i])
            out.append(hit)
            i += len(hit)
            start = i
        else:
            i += 1
    if start < len(text):
        out.append(text[start:])
    return out


def write_json(path: Path, obj):
    """One case per line: small, and diffs stay readable."""
    cases = ",\n  ".join(json.dumps(c, ensure_ascii=False) for c in obj["cases"])
    head = json.dumps(obj["reference"], ensure_ascii=False)
    path.write_text(f'{{"reference": {head},\n "cases": [\n  {cases}\n]}}\n', encoding="utf-8")


def small_model_file(path: Path, version: int):
    """Every metadata type, nested arrays, three tensors; version patched to 2 for the v2 seed
    (v2 and v3 share the layout)."""
    w = gguf.GGUFWriter(str(path), "mamba2")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4000000000)
    w.add_int32("t.i32", -2000000000)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float32("t.f32", 0.25)
    w.add_float64("t.f64", -1e300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓")
    w.add_array("t.strings", ["a", "", "ü"])
    w.add_array("t.nested", [[1, 2], [3]])
    w.add_uint32("mamba2.block_count", 1)
    w.add_tensor("a.f32", np.arange(8, dtype=np.float32).reshape(2, 4))
    w.add_tensor("b.f16", np.ones(16, dtype=np.float16))
    q8 = np.zeros((2, 34), dtype=np.uint8)  # 2 rows of one Q8_0 block (f16 scale + 32 int8)
    q8[:, 1] = 0x3C  # scale 1.0
    q8[:, 2:] = np.arange(32, dtype=np.uint8)
    w.add_tensor("c.q8_0", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = bytearray(path.read_bytes())
    data[4:8] = struct.pack("<I", version)
    path.write_bytes(bytes(data))


def sub_vocab(tok, path: Path, n: int):
    """The first `n` tokens of the bundled vocabulary with the merges among them."""
    model = json.loads(tok.to_str())["model"]
    inv = {i: t for t, i in model["vocab"].items()}
    tokens = [inv[i] for i in range(n)]
    keep = set(tokens)
    merges = []
    for m in model["merges"]:
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        if a in keep and b in keep and a + b in keep:
            merges.append(f"{a} {b}")
    w = gguf.GGUFWriter(str(path), "mamba2")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([3] + [1] * (n - 1))
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    SEEDS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        tok = bundled(tmp)
        tiny_spm(tmp)
    small_model_file(SEEDS / "small_v3.gguf", 3)
    small_model_file(SEEDS / "small_v2.gguf", 2)
    sub_vocab(tok, SEEDS / "gpt2_vocab_300.gguf", 300)
    shutil.copy(OUT / "tiny-spm-vocab.gguf", SEEDS / "spm_vocab_400.gguf")
    for p in sorted(list(OUT.iterdir()) + list(SEEDS.iterdir())):
        print(f"{p.relative_to(ROOT)}: {p.stat().st_size} bytes")


if __name__ == "__main__":
    main()
