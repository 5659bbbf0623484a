#!/usr/bin/env python3
"""Train the small Mamba-2 that ships in models/mamba2-tiny (run by hand, not by CI).

Corpus: Jane Austen's six novels as shipped by the Debian package `r-cran-janeaustenr`
(public-domain texts; package MIT). The package stores them in an R lazy-load database
(data/Rdata.rdb + .rdx); `read_r_lazyload_db` below decodes that with a minimal reader for
R's XDR serialization format, so neither R nor network access beyond apt is needed.

Pipeline:
  1. corpus: fetch the .deb with `apt-get download`, unpack it, decode the six novels, unwrap the
     hard-wrapped lines into paragraphs; the last VAL_FRACTION of each novel is validation text.
  2. tokenizer: byte-level BPE trained with `tokenizers` (ByteLevel decoder, so decoding is
     lossless), special token <|endoftext|> used as EOS, BOS and pad.
  3. model: HF transformers `Mamba2ForCausalLM` (n_groups 2, state 64, headdim 64), trained on
     CPU with one thread, AdamW, linear warmup then cosine decay, random windows of SEQ_LEN tokens.
     Checkpoints (bf16 HF folder) are written periodically so a cut-off run still leaves a model.
  4. export: the final model in bf16 with config.json, tokenizer.json, generation_config.json.

Usage (the shipped model was made with exactly this):
  pip install -r scripts/requirements-train.txt
  python scripts/train_tiny_model.py --work /work/train-tmp --out models/mamba2-tiny --minutes 55
"""

import argparse
import gzip
import json
import math
import os
import random
import re
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the Hub (kernels, configs)

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import Mamba2Config, Mamba2ForCausalLM  # noqa: E402
from transformers.models.mamba2 import modeling_mamba2  # noqa: E402

DEB_PACKAGE = "r-cran-janeaustenr"
RDATA_DIR = "usr/lib/R/site-library/janeaustenr/data"
NOVELS = ["sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion"]
EOT = "<|endoftext|>"
VAL_FRACTION = 0.05


# --------------------------------------------------------------------------------------------
# 1. Corpus
# --------------------------------------------------------------------------------------------
class RUnserializer:
    """Minimal reader for R's XDR serialization ('X\\n', versions 2 and 3).

    Handles exactly the node types a lazy-load index and character-vector data use: NULL,
    symbols, pairlists (attributes), CHARSXP, STRSXP, VECSXP, INTSXP, LGLSXP, REALSXP and
    back-references. Anything else raises, so an unexpected package layout fails loudly.
    """

    NILVALUE, SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP, REFSXP = (
        254, 1, 2, 9, 10, 13, 14, 16, 19, 255)

    def __init__(self, data: bytes):
        self.data, self.pos, self.refs = data, 0, []

    def _int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def _bytes(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def read(self):
        if self._bytes(2) != b"X\n":
            raise ValueError("not an XDR R serialization")
        version = self._int()
        self._int(), self._int()  # writer R version, minimal reader version
        if version == 3:
            self._bytes(self._int())  # native encoding name
        return self._item()

    def _item(self):
        flags = self._int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == self.NILVALUE:
            return None
        if kind == self.REFSXP:
            index = flags >> 8 or self._int()
            return self.refs[index - 1]
        if kind == self.SYMSXP:
            symbol = ("symbol", self._item())
            self.refs.append(symbol)
            return symbol
        if kind == self.CHARSXP:
            n = self._int()
            return None if n == -1 else self._bytes(n).decode("utf-8")
        if kind == self.LISTSXP:
            attr = self._item() if has_attr else None
            tag = self._item() if has_tag else None
            del attr
            head, tail = self._item(), self._item()
            return [(tag, head)] + (tail if isinstance(tail, list) else [])
        if kind in (self.STRSXP, self.VECSXP, self.INTSXP, self.LGLSXP, self.REALSXP):
            n = self._int()
            if kind in (self.STRSXP, self.VECSXP):
                values = [self._item() for _ in range(n)]
            elif kind == self.REALSXP:
                values = list(struct.unpack(">%dd" % n, self._bytes(8 * n)))
            else:
                values = list(struct.unpack(">%di" % n, self._bytes(4 * n)))
            attrs = dict((tag[1], v) for tag, v in self._item()) if has_attr else {}
            return {"values": values, "attrs": attrs}
        raise ValueError(f"unsupported R node type {kind}")


def read_r_lazyload_db(data_dir: Path) -> dict:
    """Return {name: R object} from an R package's data/Rdata.rdb + Rdata.rdx."""
    index = RUnserializer(gzip.decompress((data_dir / "Rdata.rdx").read_bytes())).read()
    fields = dict(zip(index["attrs"]["names"]["values"], index["values"]))
    variables = fields["variables"]
    blob = (data_dir / "Rdata.rdb").read_bytes()
    out = {}
    for name, where in zip(variables["attrs"]["names"]["values"], variables["values"]):
        offset, length = where["values"]
        record = blob[offset:offset + length]
        # 4-byte big-endian uncompressed length, then a zlib stream (compression type 1).
        out[name] = RUnserializer(zlib.decompress(record[4:])).read()
    return out


def unwrap_paragraphs(lines: list) -> list:
    """Hard-wrapped Gutenberg lines -> one string per paragraph (blank lines separate them)."""
    paragraphs, current = [], []
    for line in lines:
        line = (line or "").strip()
        if line:
            current.append(line)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    # `_word_` marks italics in the Gutenberg transcription; drop the markers, squeeze spaces.
    return [re.sub(r"\s+", " ", p.replace("_", "")).strip() for p in paragraphs]


def prepare_corpus(work: Path) -> tuple:
    """Return (train_texts, val_texts): one string per novel each."""
    pkg_dir = work / "pkg"
    data_dir = pkg_dir / RDATA_DIR
    if not (data_dir / "Rdata.rdb").exists():
        pkg_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", "download", DEB_PACKAGE], cwd=pkg_dir, check=True)
        deb = sorted(pkg_dir.glob(f"{DEB_PACKAGE}_*.deb"))[-1]
        subprocess.run(["dpkg-deb", "-x", str(deb), str(pkg_dir)], check=True)
    objects = read_r_lazyload_db(data_dir)
    train, val = [], []
    for name in NOVELS:
        paragraphs = unwrap_paragraphs(objects[name]["values"] if isinstance(objects[name], dict)
                                       else objects[name])
        cut = int(len(paragraphs) * (1 - VAL_FRACTION))
        train.append("\n\n".join(paragraphs[:cut]))
        val.append("\n\n".join(paragraphs[cut:]))
    (work / "corpus_train.txt").write_text(f"\n\n{EOT}\n\n".join(train))
    (work / "corpus_val.txt").write_text(f"\n\n{EOT}\n\n".join(val))
    return train, val


# --------------------------------------------------------------------------------------------
# 2. Tokenizer
# --------------------------------------------------------------------------------------------
def train_tokenizer(train_texts: list, vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train_texts, trainer=trainer)
    return tok


def encode_texts(tok: Tokenizer, texts: list) -> torch.Tensor:
    eot = tok.token_to_id(EOT)
    ids = []
    for text in texts:
        ids.extend(tok.encode(text).ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------------------------
# 3. Model
# --------------------------------------------------------------------------------------------
def check_grouped_gated_norm() -> str:
    """Make HF's MambaRMSNormGated normalise per group of d_inner/n_groups, as mamba_ssm does.

    Returns a note on what was found. Patches the class in place if it normalises over the whole
    d_inner (older transformers releases did).
    """
    d_inner, n_groups = 8, 2
    norm = modeling_mamba2.MambaRMSNormGated(d_inner, group_size=d_inner // n_groups, eps=1e-6)
    x, z = torch.randn(3, d_inner), torch.randn(3, d_inner)
    y = x * torch.nn.functional.silu(z)
    grouped = y.view(3, n_groups, -1)
    expected = (grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + 1e-6)).view(3, d_inner)
    if torch.allclose(norm(x, z), expected, atol=1e-6):
        return "transformers MambaRMSNormGated already normalises per group (d_inner/n_groups): not patched"

    def grouped_forward(self, hidden_states, gate=None):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        if gate is not None:
            hidden_states = hidden_states * torch.nn.functional.silu(gate.to(torch.float32))
        *prefix, last = hidden_states.shape
        groups = hidden_states.view(*prefix, last // self.group_size, self.group_size)
        groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * groups.view(*prefix, last).to(input_dtype)

    modeling_mamba2.MambaRMSNormGated.forward = grouped_forward
    assert torch.allclose(norm(x, z), expected, atol=1e-6)
    return "transformers MambaRMSNormGated normalised over all of d_inner: patched to grouped form"


def make_config(args, tok: Tokenizer) -> Mamba2Config:
    eot = tok.token_to_id(EOT)
    return Mamba2Config(
        vocab_size=tok.get_vocab_size(),
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        state_size=args.state_size,
        expand=2,
        head_dim=args.head_dim,
        num_heads=2 * args.hidden_size // args.head_dim,
        n_groups=args.n_groups,
        conv_kernel=4,
        chunk_size=args.chunk_size,
        use_bias=False,
        use_conv_bias=True,
        residual_in_fp32=True,
        tie_word_embeddings=True,
        initializer_range=0.02,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
    )


@torch.no_grad()
def validation_loss(model, val_ids: torch.Tensor, seq_len: int, batch: int) -> float:
    """Mean next-token cross-entropy over non-overlapping windows of the validation text."""
    model.eval()
    n = (len(val_ids) - 1) // seq_len
    x = val_ids[: n * seq_len].view(n, seq_len)
    y = val_ids[1: n * seq_len + 1].view(n, seq_len)
    total, count = 0.0, 0
    for i in range(0, n, batch):
        logits = model(input_ids=x[i:i + batch]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 y[i:i + batch].reshape(-1), reduction="sum")
        total += loss.item()
        count += y[i:i + batch].numel()
    model.train()
    return total / count


def lr_at(step: int, warmup: int, progress: float, peak: float, floor_ratio: float = 0.1) -> float:
    """Linear warmup over `warmup` steps, then cosine from `peak` to `floor_ratio * peak`.

    `progress` in [0, 1] is how far the post-warmup part of the run has got (by steps when the
    step count is fixed, by wall time when the run is sized by --minutes).
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, max(0.0, progress))
    return peak * (floor_ratio + (1 - floor_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# --------------------------------------------------------------------------------------------
# 4. Export
# --------------------------------------------------------------------------------------------
def write_config(config: Mamba2Config, out: Path, dtype: torch.dtype):
    """config.json in the HF Mamba2Config layout: the non-default fields plus the Mamba-2 shape."""
    cfg = json.loads(config.to_json_string(use_diff=True))
    for key in ("hidden_size", "num_hidden_layers", "state_size", "expand", "head_dim", "num_heads",
                "n_groups", "conv_kernel", "chunk_size", "use_bias", "use_conv_bias", "residual_in_fp32",
                "layer_norm_epsilon", "tie_word_embeddings", "vocab_size", "hidden_act", "rms_norm"):
        if hasattr(config, key):
            cfg[key] = getattr(config, key)
    # time_step_limit (0, inf) is the default; +inf has no JSON spelling, so leave it out.
    cfg.pop("time_step_limit", None)
    cfg.pop("dtype", None)
    cfg["architectures"] = ["Mamba2ForCausalLM"]
    cfg["model_type"] = "mamba2"
    cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def export(model, config: Mamba2Config, tok: Tokenizer, out: Path, dtype: torch.dtype, meta: dict):
    """Write an HF-layout model folder: config.json, model.safetensors, tokenizer.json, ..."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, value in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied to backbone.embeddings.weight, as in the Hub Mamba-2 checkpoints
        tensors[name] = value.detach().to(dtype).contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    write_config(config, out, dtype)
    eot = tok.token_to_id(EOT)
    gen = {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))
    (out / "training_meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_exported(folder: Path) -> Mamba2ForCausalLM:
    """Load an exported folder with HF, upcast to f32 (how golden data and metrics are made)."""
    model = Mamba2ForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.eval()
    return model


def sample(model, tok: Tokenizer, prompt: str, n: int) -> str:
    ids = torch.tensor([tok.encode(prompt).ids])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False,
                             eos_token_id=tok.token_to_id(EOT), pad_token_id=tok.token_to_id(EOT))
    return tok.decode(out[0].tolist(), skip_special_tokens=False)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/work/train-tmp"),
                        help="scratch folder for the corpus and checkpoints (keep out of git)")
    parser.add_argument("--out", type=Path, default=Path("models/mamba2-tiny"))
    parser.add_argument("--minutes", type=float, default=55.0,
                        help="wall budget for the optimisation loop; steps are derived from a measured step time")
    parser.add_argument("--steps", type=int, default=0, help="fixed step count (overrides --minutes)")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--state-size", type=int, default=64)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--n-groups", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--checkpoint-every-s", type=float, default=300.0)
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()

    torch.set_num_threads(1)  # shared 2-core machine: one thread only
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    started = time.time()
    args.work.mkdir(parents=True, exist_ok=True)
    log_file = open(args.work / "train.log", "a")

    def log(msg: str):
        line = f"[{time.time() - started:7.1f}s] {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    norm_note = check_grouped_gated_norm()
    log(norm_note)

    train_texts, val_texts = prepare_corpus(args.work)
    log(f"corpus: train {sum(map(len, train_texts))} chars, val {sum(map(len, val_texts))} chars")
    tok = train_tokenizer(train_texts, args.vocab)
    train_ids, val_ids = encode_texts(tok, train_texts), encode_texts(tok, val_texts)
    log(f"tokenizer: vocab {tok.get_vocab_size()}; train {len(train_ids)} tokens, val {len(val_ids)} tokens")
    probe = "Once upon a time, Mr. Darcy said: \"Ça va?\"\n\n— fin."
    assert tok.decode(tok.encode(probe).ids) == probe, "byte-level round trip must be lossless"

    config = make_config(args, tok)
    model = Mamba2ForCausalLM(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params} parameters; config {json.dumps(config.to_dict(), default=str)}")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}],
                              lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    generator = torch.Generator().manual_seed(args.seed)

    def train_step(step: int, progress: float) -> float:
        lr = lr_at(step, args.warmup, progress, args.lr)
        for group in optim.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train_ids) - args.seq_len - 1, (args.batch,), generator=generator)
        x = torch.stack([train_ids[s:s + args.seq_len] for s in starts])
        y = torch.stack([train_ids[s + 1:s + args.seq_len + 1] for s in starts])
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        return loss.item()

    # The first steps (real training steps, at warmup LR) measure the step time, which is logged
    # as the estimate of how many steps fit. With --steps the schedule runs by step count;
    # otherwise it runs by wall time, so a machine that slows down (other jobs on the shared
    # cores) shortens the run instead of overrunning the --minutes budget.
    loop_start = time.time()
    budget_s = args.minutes * 60
    step, probe_steps, losses = 0, 8, []
    while step < probe_steps:
        losses.append(train_step(step, 0.0))
        step += 1
    step_time = (time.time() - loop_start) / probe_steps
    log(f"measured {step_time:.3f} s/step (batch {args.batch} x {args.seq_len}); "
        + (f"training {args.steps} steps" if args.steps else
           f"about {int(budget_s * 0.95 / step_time)} steps fit in {args.minutes} min"))

    ckpt_dir = args.work / "checkpoint"
    last_ckpt = time.time()
    dtype = getattr(torch, args.dtype)
    warm_end_s = None  # wall time at the end of warmup (time-based schedule)

    def progress() -> float:
        nonlocal warm_end_s
        if step < args.warmup:
            return 0.0
        if args.steps:
            return (step - args.warmup) / max(1, args.steps - args.warmup)
        if warm_end_s is None:
            warm_end_s = time.time() - loop_start
        return (time.time() - loop_start - warm_end_s) / max(1.0, budget_s - warm_end_s)

    def finished() -> bool:
        return step >= args.steps if args.steps else time.time() - loop_start >= budget_s

    while not finished():
        losses.append(train_step(step, progress()))
        step += 1
        if step % 50 == 0:
            avg = sum(losses[-50:]) / len(losses[-50:])
            log(f"step {step} loss {avg:.4f} lr {optim.param_groups[0]['lr']:.2e} "
                f"elapsed {(time.time() - loop_start) / 60:.1f} min")
        if time.time() - last_ckpt > args.checkpoint_every_s:
            val = validation_loss(model, val_ids[: 64 * args.seq_len + 1], args.seq_len, args.batch)
            meta = {"step": step, "val_loss_subset": val}
            export(model, config, tok, ckpt_dir, dtype, meta)
            log(f"checkpoint at step {step}: val loss (subset) {val:.4f} ppl {math.exp(val):.2f}")
            last_ckpt = time.time()
    train_wall = time.time() - loop_start
    total = step
    log(f"trained {total} steps in {train_wall / 60:.1f} min")

    val_f32 = validation_loss(model, val_ids, args.seq_len, args.batch)
    log(f"final val loss (trained f32 weights) {val_f32:.4f} ppl {math.exp(val_f32):.2f}")
    meta = {
        "corpus": f"Debian package {DEB_PACKAGE}: {', '.join(NOVELS)}",
        "train_tokens": len(train_ids), "val_tokens": len(val_ids),
        "parameters": n_params, "steps": total, "batch": args.batch, "seq_len": args.seq_len,
        "tokens_seen": total * args.batch * args.seq_len, "peak_lr": args.lr, "warmup": args.warmup,
        "step_time_s": step_time, "train_loop_wall_s": train_wall,
        "val_loss_f32": val_f32, "val_ppl_f32": math.exp(val_f32),
        "gated_norm": norm_note, "torch": torch.__version__,
        "transformers": sys.modules["transformers"].__version__,
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
    }
    export(model, config, tok, args.out, dtype, meta)
    shipped = load_exported(args.out)
    val_shipped = validation_loss(shipped, val_ids, args.seq_len, args.batch)
    meta["val_loss_shipped_upcast_f32"] = val_shipped
    meta["val_ppl_shipped_upcast_f32"] = math.exp(val_shipped)
    meta["total_wall_s"] = time.time() - started
    for prompt in ("Once upon a time", "The old man said", "Elizabeth"):
        text = sample(shipped, tok, prompt, 60)
        meta.setdefault("samples", {})[prompt] = text
        log(f"sample: {text!r}")
    (args.out / "training_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    log(f"val ppl shipped ({args.dtype} upcast to f32): {math.exp(val_shipped):.2f}; "
        f"total wall {meta['total_wall_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
