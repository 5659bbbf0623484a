#!/usr/bin/env python3
"""Build the reference fixtures under tests/fixtures/ from HF transformers' Mamba2ForCausalLM.

Run by hand (not by CI), from the repository root:

    pip install -r scripts/requirements.txt
    python3 scripts/make_fixtures.py            # all cases (Mamba-2 and hybrid)
    python3 scripts/make_fixtures.py g2_ds16_seq3_b2   # only the named case(s)

The hybrid cases (Granite-4.0-H, Nemotron-H, Falcon-H1, Bamba; tests/fixtures/hybrid/<case>/) are
built by scripts/hybrid_fixtures.py, which main() calls after the Mamba-2 cases; their names are
accepted here too. See tests/fixtures/hybrid/README.md.

For every case it builds a tiny random Mamba-2 model on CPU in float32, overwrites every
parameter with random values (so no weight is the trivial 0/1 that HF's init leaves), and writes:

    tests/fixtures/<case>/hf/         config.json + safetensors, HF-transformers layout (save_pretrained)
    tests/fixtures/<case>/ssm/        config.json + pytorch_model.bin, mamba_ssm layout
    tests/fixtures/<case>/reference.safetensors
                                      input ids, HF logits of the prefill and decode paths (f32 and
                                      bf16), final per-layer cache states of the f32 decode run

The file format and the HF semantics the fixtures rely on are documented in tests/fixtures/README.md.

One monkeypatch is applied to the installed transformers before any forward (see README): the
single-token step clamps dt to time_step_limit, as the chunked path does, so that both paths
compute the same function (stock HF only clamps in the chunked path). MambaRMSNormGated needs no
patch: it already normalises per group in transformers 5.24; the script checks that instead of
assuming it.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
import transformers
from transformers import Mamba2Config, Mamba2ForCausalLM
from transformers.models.mamba2 import modeling_mamba2

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()

# HF picks mamba_ssm / causal_conv1d kernels whenever they import; the reference must be HF's
# plain-torch path (mamba2_chunk_scan, mamba2_selective_state_update, causal_conv1d_fn/update).
for _pkg in ("mamba_ssm", "causal_conv1d", "kernels"):
    try:
        __import__(_pkg)
    except ImportError:
        continue
    sys.exit(f"{_pkg} is installed: uninstall it (or use a clean venv) so HF runs its torch reference path")

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = REPO_ROOT / "tests" / "fixtures"
INF = float("inf")
DEFAULT_LIMIT = (0.0, INF)

# mamba_ssm's Mamba2 constructor defaults: an ssm_cfg key equal to these may be omitted from the
# mamba_ssm config (real state-spaces checkpoints ship `"ssm_cfg": {"layer": "Mamba2"}` only).
SSM_DEFAULTS = {
    "d_state": 128,
    "d_conv": 4,
    "expand": 2,
    "headdim": 64,
    "ngroups": 1,
    "chunk_size": 256,
    "bias": False,
    "conv_bias": True,
}


@dataclass
class Case:
    name: str
    seed: int
    hidden: int
    n_layer: int
    expand: int
    headdim: int
    ngroups: int
    d_state: int
    chunk: int
    vocab: int  # the tokenizer's vocabulary (mamba_ssm `vocab_size`)
    pad_multiple: int  # mamba_ssm `pad_vocab_size_multiple`
    seq: int
    batch: int
    prefill_len: int
    tied: bool
    residual_in_fp32: bool
    d_conv: int = 4
    limit: tuple = DEFAULT_LIMIT
    conv_bias: bool = True
    bias: bool = False
    # layout options
    hf_sharded: bool = False
    hf_literal_infinity: bool = False  # rewrite HF config.json with a bare `Infinity` literal
    ssm_minimal_cfg: bool = False  # omit ssm_cfg keys equal to mamba_ssm defaults
    ssm_explicit_default_limit: bool = False  # write dt_limit [0.0, Infinity] into ssm_cfg
    ssm_tied_lm_head_key: bool = False  # store lm_head.weight (sharing the embedding) although tied

    @property
    def d_inner(self) -> int:
        return self.expand * self.hidden

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.ngroups * self.d_state

    @property
    def vocab_rows(self) -> int:
        m = self.pad_multiple
        return self.vocab if self.vocab % m == 0 else self.vocab + m - self.vocab % m


CASES = [
    # mamba_ssm defaults (headdim 64, d_state 128, ngroups 1, chunk 256) like state-spaces/mamba2-*,
    # vocab padded 250 -> 256 rows, tied with an explicit lm_head.weight in the .bin.
    Case(
        name="g1_ds128_hd64_padvocab",
        seed=1001,
        hidden=32,
        n_layer=2,
        expand=4,
        headdim=64,
        ngroups=1,
        d_state=128,
        chunk=256,
        vocab=250,
        pad_multiple=16,
        seq=37,
        batch=1,
        prefill_len=20,
        tied=True,
        residual_in_fp32=True,
        ssm_minimal_cfg=True,
        ssm_tied_lm_head_key=True,
    ),
    # ngroups 8 (one head per group, like Codestral's grouping), batch 3, untied, chunk 16 with
    # 50 % 16 = 2, residual in model dtype; HF weights sharded in two files.
    Case(
        name="g8_ds16_hd16_b3_untied",
        seed=2002,
        hidden=32,
        n_layer=2,
        expand=4,
        headdim=16,
        ngroups=8,
        d_state=16,
        chunk=16,
        vocab=160,
        pad_multiple=8,
        seq=50,
        batch=3,
        prefill_len=21,
        tied=False,
        residual_in_fp32=False,
        hf_sharded=True,
    ),
    # ngroups 2 with 6 heads (not a power of two, 3 heads per group), d_state 64, chunk 8,
    # time_step_limit (0.01, 0.05) that binds on both sides, no conv bias, in/out_proj bias.
    Case(
        name="g2_nh6_ds64_limit_bias",
        seed=3003,
        hidden=48,
        n_layer=2,
        expand=2,
        headdim=16,
        ngroups=2,
        d_state=64,
        chunk=8,
        vocab=200,
        pad_multiple=8,
        seq=37,
        batch=1,
        prefill_len=13,
        tied=True,
        residual_in_fp32=True,
        limit=(0.01, 0.05),
        conv_bias=False,
        bias=True,
    ),
    # A prompt shorter than a chunk (5 < 16), prefill of 2 tokens (< d_conv: zero-padded conv state
    # after the prefill), batch 3, headdim 32, untied; configs with bare `Infinity` literals.
    Case(
        name="g1_ds32_hd32_short_b3",
        seed=4004,
        hidden=32,
        n_layer=2,
        expand=2,
        headdim=32,
        ngroups=1,
        d_state=32,
        chunk=16,
        vocab=128,
        pad_multiple=8,
        seq=5,
        batch=3,
        prefill_len=2,
        tied=False,
        residual_in_fp32=False,
        hf_literal_infinity=True,
        ssm_explicit_default_limit=True,
    ),
    # Whole sequence (3 tokens) shorter than d_conv: the final conv state still holds a zero
    # column. Prefill of 1 token, then two steps. ngroups 2, 4 heads, chunk 8.
    Case(
        name="g2_ds16_seq3_b2",
        seed=5005,
        hidden=32,
        n_layer=2,
        expand=2,
        headdim=16,
        ngroups=2,
        d_state=16,
        chunk=8,
        vocab=96,
        pad_multiple=8,
        seq=3,
        batch=2,
        prefill_len=1,
        tied=True,
        residual_in_fp32=True,
    ),
]


# --------------------------------------------------------------------------------------------
# Monkeypatch: clamp dt in the single-token step too (stock HF only clamps in mamba2_chunk_scan).
# The mixer calls the module-level `mamba2_selective_state_update` without passing its
# time_step_limit, so the limit of the model being run is held here.
# --------------------------------------------------------------------------------------------
_STOCK_STEP = modeling_mamba2.mamba2_selective_state_update
_STEP_LIMIT = {"value": DEFAULT_LIMIT, "patched": True}


def _clamping_step(state, hidden_states, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, z=None, **kwargs):
    lo, hi = _STEP_LIMIT["value"]
    if _STEP_LIMIT["patched"] and (lo, hi) != DEFAULT_LIMIT:
        # Same order of operations as the stock step, plus the clamp the chunked path applies.
        if dt_bias is not None:
            dt = dt + dt_bias.to(dt.dtype)
        if dt_softplus:
            dt = F.softplus(dt)
        dt = torch.clamp(dt, min=lo, max=hi)
        dt_bias, dt_softplus = None, False
    return _STOCK_STEP(state, hidden_states, dt, A, B, C, D, dt_bias=dt_bias, dt_softplus=dt_softplus, z=z, **kwargs)


modeling_mamba2.mamba2_selective_state_update = _clamping_step


# --------------------------------------------------------------------------------------------
# Model construction and randomisation
# --------------------------------------------------------------------------------------------
def hf_config(case: Case) -> Mamba2Config:
    return Mamba2Config(
        vocab_size=case.vocab_rows,
        hidden_size=case.hidden,
        num_hidden_layers=case.n_layer,
        expand=case.expand,
        head_dim=case.headdim,
        num_heads=case.nheads,
        n_groups=case.ngroups,
        state_size=case.d_state,
        conv_kernel=case.d_conv,
        chunk_size=case.chunk,
        use_bias=case.bias,
        use_conv_bias=case.conv_bias,
        time_step_limit=tuple(case.limit),
        residual_in_fp32=case.residual_in_fp32,
        tie_word_embeddings=case.tied,
        layer_norm_epsilon=1e-5,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )


@torch.no_grad()
def randomize(model: Mamba2ForCausalLM, case: Case, gen: torch.Generator) -> None:
    """Overwrite every parameter; fail if one is left untouched."""

    def normal(shape, std, mean=0.0):
        return torch.randn(shape, generator=gen) * std + mean

    def uniform(shape, lo, hi):
        return torch.rand(shape, generator=gen) * (hi - lo) + lo

    touched = set()
    for name, p in model.named_parameters():
        leaf = name.split(".")[-1]
        parent = name.rsplit(".", 1)[0]
        if name.endswith("A_log"):
            v = torch.log(uniform(p.shape, 1.0, 16.0))
        elif name.endswith("dt_bias"):
            dt = torch.exp(uniform(p.shape, math.log(1e-3), math.log(1e-1)))
            v = dt + torch.log(-torch.expm1(-dt))  # inverse softplus
        elif name.endswith("mixer.D"):
            v = uniform(p.shape, 0.5, 1.5)
        elif parent.endswith("conv1d") and leaf == "weight":
            v = uniform(p.shape, -0.6, 0.6)
        elif parent.endswith("conv1d") and leaf == "bias":
            v = normal(p.shape, 0.2)
        elif leaf == "weight" and (parent.endswith("norm") or parent.endswith("norm_f")):
            v = normal(p.shape, 0.2, 1.0)
        elif parent.endswith("in_proj") and leaf == "weight":
            v = normal(p.shape, 0.15)
        elif parent.endswith("out_proj") and leaf == "weight":
            v = normal(p.shape, 0.1)
        elif leaf == "bias" and (parent.endswith("in_proj") or parent.endswith("out_proj")):
            v = normal(p.shape, 0.1)
        elif name == "backbone.embeddings.weight":
            v = normal(p.shape, 0.2)
        elif name == "lm_head.weight":
            v = normal(p.shape, 0.2)
        else:
            raise RuntimeError(f"no randomisation rule for parameter {name} {tuple(p.shape)}")
        p.copy_(v.to(p.dtype))
        touched.add(name)
    named = dict(model.named_parameters(remove_duplicate=False))
    missing = set(named) - touched
    # With tied embeddings lm_head.weight is the embedding Parameter, already randomised.
    assert all(named[m] is model.backbone.embeddings.weight for m in missing), missing


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def run_prefill(model, ids):
    return model(input_ids=ids, use_cache=False).logits.float()


@torch.no_grad()
def run_decode(model, ids, prefill_len):
    out = model(input_ids=ids[:, :prefill_len], use_cache=True)
    cache = out.cache
    logits = [out.logits.float()]
    for t in range(prefill_len, ids.shape[1]):
        out = model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True)
        cache = out.cache
        logits.append(out.logits.float())
    return torch.cat(logits, dim=1), cache


def cache_states(model, cache):
    conv, ssm = [], []
    for layer in range(model.config.num_hidden_layers):
        conv.append(cache.get_conv_state(layer))
        ssm.append(cache.get_recurrent_state(layer))
    return conv, ssm


def same_safetensors(a: bytes, b: bytes) -> bool:
    """Same tensors (bitwise) and the same metadata, whatever the header order."""
    ta, tb = safetensors.torch.load(a), safetensors.torch.load(b)
    if ta.keys() != tb.keys() or any(ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k]) for k in ta):
        return False

    def meta(raw):
        n = int.from_bytes(raw[:8], "little")
        return json.loads(raw[8 : 8 + n]).get("__metadata__")

    return meta(a) == meta(b)


def max_abs(a, b):
    return (a.float() - b.float()).abs().max().item()


# --------------------------------------------------------------------------------------------
# Checks of HF semantics the fixtures rely on
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def check_gated_norm_is_grouped(model, case, gen):
    norm = model.backbone.layers[0].mixer.norm
    y = torch.randn(2, 3, case.d_inner, generator=gen)
    z = torch.randn(2, 3, case.d_inner, generator=gen)
    g = (y * F.silu(z)).view(2, 3, case.ngroups, case.d_inner // case.ngroups)
    grouped = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)).view(2, 3, -1) * norm.weight
    got = norm(y, z)
    assert max_abs(got, grouped) < 1e-5, "installed MambaRMSNormGated is not the grouped form"
    if case.ngroups > 1:
        h = y * F.silu(z)
        ungrouped = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight
        assert max_abs(got, ungrouped) > 1e-3, "grouped and ungrouped norms coincide; check is vacuous"


@torch.no_grad()
def dt_clamp_fractions(model, ids, case):
    """Fraction of dt = softplus(dt_raw + dt_bias) below / above the limit, over all layers."""
    below, above, total = 0, 0, 0
    hooks = []
    seen = []

    def hook(mixer):
        def fn(_mod, _inp, out):
            dt_raw = out[..., -case.nheads :]
            seen.append(F.softplus(dt_raw + mixer.dt_bias))

        return fn

    for layer in model.backbone.layers:
        hooks.append(layer.mixer.in_proj.register_forward_hook(hook(layer.mixer)))
    model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    for dt in seen:
        below += (dt < case.limit[0]).sum().item()
        above += (dt > case.limit[1]).sum().item()
        total += dt.numel()
    return below / total, above / total


@torch.no_grad()
def check_conv_state_is_preconv_input(model, ids, case):
    """Re-run the decode capturing in_proj outputs: the cached conv state must be the last d_conv
    xBC columns (before the conv and its SiLU), left-padded with zeros."""
    captured = {i: [] for i in range(case.n_layer)}
    hooks = []
    for i, layer in enumerate(model.backbone.layers):

        def fn(_m, _i, out, i=i):
            captured[i].append(out[..., case.d_inner : case.d_inner + case.conv_dim])

        hooks.append(layer.mixer.in_proj.register_forward_hook(fn))
    _, cache = run_decode(model, ids, case.prefill_len)
    for h in hooks:
        h.remove()
    for i in range(case.n_layer):
        xbc = torch.cat(captured[i], dim=1).transpose(1, 2)  # (batch, conv_dim, seq)
        xbc = F.pad(xbc, (max(0, case.d_conv - case.seq), 0))[..., -case.d_conv :]
        assert max_abs(cache.get_conv_state(i), xbc) == 0.0, f"layer {i}: conv state is not the pre-conv input"


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------
def write_hf(model, case: Case, out: Path) -> list:
    out.mkdir(parents=True)
    if case.hf_sharded:
        total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
        model.save_pretrained(out, max_shard_size=int(total * 0.6))
        shards = sorted(out.glob("model-*.safetensors"))
        assert [s.name for s in shards] == [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        ], shards
        assert (out / "model.safetensors.index.json").exists()
    else:
        model.save_pretrained(out)
        assert (out / "model.safetensors").exists()
    cfg_path = out / "config.json"
    text = cfg_path.read_text()
    if case.hf_literal_infinity:
        # Older transformers (and many Hub repos) wrote bare `Infinity`; exercise that form too.
        cfg = json.loads(text)
        cfg["time_step_limit"] = list(case.limit)
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return sorted(p.name for p in out.iterdir())


def ssm_state_dict(model, case: Case) -> dict:
    sd = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight" and case.tied:
            continue
        sd[k.replace("backbone.embeddings.", "backbone.embedding.")] = v.detach().clone().contiguous()
    if case.tied and case.ssm_tied_lm_head_key:
        # mamba_ssm's own checkpoints keep lm_head.weight in the state dict, sharing the
        # embedding's storage; torch.save writes that storage once.
        sd["lm_head.weight"] = sd["backbone.embedding.weight"]
    assert sd["backbone.embedding.weight"].shape[0] == case.vocab_rows
    return sd


def ssm_config(case: Case) -> dict:
    ssm_cfg = {
        "layer": "Mamba2",
        "d_state": case.d_state,
        "d_conv": case.d_conv,
        "expand": case.expand,
        "headdim": case.headdim,
        "ngroups": case.ngroups,
        "chunk_size": case.chunk,
        "bias": case.bias,
        "conv_bias": case.conv_bias,
    }
    if case.ssm_minimal_cfg:
        ssm_cfg = {k: v for k, v in ssm_cfg.items() if k == "layer" or SSM_DEFAULTS[k] != v}
    if tuple(case.limit) != DEFAULT_LIMIT or case.ssm_explicit_default_limit:
        ssm_cfg["dt_limit"] = list(case.limit)
    return {
        "d_model": case.hidden,
        "d_intermediate": 0,
        "n_layer": case.n_layer,
        "vocab_size": case.vocab,
        "ssm_cfg": ssm_cfg,
        "attn_layer_idx": [],
        "attn_cfg": {},
        "rms_norm": True,
        "residual_in_fp32": case.residual_in_fp32,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": case.pad_multiple,
        "tie_embeddings": case.tied,
    }


def write_ssm(model, case: Case, out: Path) -> list:
    out.mkdir(parents=True)
    # json.dumps writes float('inf') as the bare literal `Infinity`, as mamba_ssm's configs do.
    (out / "config.json").write_text(json.dumps(ssm_config(case), indent=2) + "\n")
    torch.save(ssm_state_dict(model, case), out / "pytorch_model.bin")
    return sorted(p.name for p in out.iterdir())


# --------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------
def build_case(case: Case) -> dict:
    assert case.d_inner % case.headdim == 0 and case.nheads % case.ngroups == 0
    assert 1 <= case.prefill_len <= case.seq
    torch.manual_seed(case.seed)
    gen = torch.Generator().manual_seed(case.seed)
    _STEP_LIMIT["value"] = tuple(case.limit)

    model = Mamba2ForCausalLM(hf_config(case)).eval()
    assert (model.lm_head.weight is model.backbone.embeddings.weight) == case.tied
    randomize(model, case, gen)
    check_gated_norm_is_grouped(model, case, gen)

    ids = torch.randint(0, case.vocab, (case.batch, case.seq), generator=gen, dtype=torch.int64)

    # f32 reference
    logits_prefill = run_prefill(model, ids)
    logits_decode, cache = run_decode(model, ids, case.prefill_len)
    conv, ssm = cache_states(model, cache)
    d32 = max_abs(logits_prefill, logits_decode)
    assert d32 < 1e-4, f"{case.name}: HF f32 decode != prefill ({d32:.3g})"
    check_conv_state_is_preconv_input(model, ids, case)
    # The prefill-only final state must equal the decoded one (the chunked scan's final state).
    pre = model(input_ids=ids, use_cache=True).cache
    dstate = max(max_abs(pre.get_recurrent_state(i), ssm[i]) for i in range(case.n_layer))
    dconv = max(max_abs(pre.get_conv_state(i), conv[i]) for i in range(case.n_layer))
    # Layer 0's conv inputs are bitwise equal; deeper layers see round-off of the layers below.
    assert dstate < 1e-4 and dconv < 1e-5, (dstate, dconv)
    for i in range(case.n_layer):
        assert conv[i].dtype == torch.float32 and ssm[i].dtype == torch.float32
        assert conv[i].shape == (case.batch, case.conv_dim, case.d_conv), conv[i].shape
        assert ssm[i].shape == (case.batch, case.nheads, case.headdim, case.d_state), ssm[i].shape

    # Split prefill (HF feeds the second chunk through the chunked scan with initial_states and
    # the cached conv columns): not stored, but it must agree too.
    split_cache = model(input_ids=ids[:, : case.prefill_len], use_cache=True).cache
    split_logits = model(input_ids=ids[:, case.prefill_len :], cache=split_cache, use_cache=True).logits
    dsplit = max_abs(split_logits, logits_prefill[:, case.prefill_len :]) if case.prefill_len < case.seq else 0.0
    assert dsplit < 1e-4, f"{case.name}: HF split prefill != prefill ({dsplit:.3g})"

    info = {
        "f32_decode_vs_prefill": d32,
        "f32_split_prefill_vs_prefill": dsplit,
        "prefill_vs_decode_final_ssm_state": dstate,
        "prefill_vs_decode_final_conv_state": dconv,
        "logit_abs_max": logits_prefill.abs().max().item(),
        "logit_std": logits_prefill.std().item(),
        "logit_position_spread": (logits_prefill[:, 1:] - logits_prefill[:, :-1]).abs().mean().item()
        if case.seq > 1
        else 0.0,
    }

    if tuple(case.limit) != DEFAULT_LIMIT:
        below, above = dt_clamp_fractions(model, ids, case)
        assert below > 0.05 and above > 0.05, f"limit does not bind enough: {below:.2f} below, {above:.2f} above"
        info["dt_fraction_below_limit"] = below
        info["dt_fraction_above_limit"] = above
        # Evidence for the decision: stock HF (no clamp in the step) disagrees with its own prefill.
        _STEP_LIMIT["patched"] = False
        stock_decode, _ = run_decode(model, ids, case.prefill_len)
        _STEP_LIMIT["patched"] = True
        info["stock_hf_decode_vs_prefill"] = max_abs(stock_decode, logits_prefill)
        # ... and the limit changes the function (it is not a no-op on these inputs).
        unlimited = copy.deepcopy(model)
        for layer in unlimited.backbone.layers:
            layer.mixer.time_step_limit = DEFAULT_LIMIT
        info["limit_effect_on_logits"] = max_abs(run_prefill(unlimited, ids), logits_prefill)
        assert info["limit_effect_on_logits"] > 1e-2

    # bf16 runs, for information (HF's own bf16 numerics, cast to f32)
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    logits_prefill_bf16 = run_prefill(model_bf16, ids)
    logits_decode_bf16, cache_bf16 = run_decode(model_bf16, ids, case.prefill_len)
    info["bf16_prefill_vs_f32"] = max_abs(logits_prefill_bf16, logits_prefill)
    info["bf16_decode_vs_f32"] = max_abs(logits_decode_bf16, logits_prefill)
    info["bf16_decode_vs_bf16_prefill"] = max_abs(logits_decode_bf16, logits_prefill_bf16)
    info["bf16_conv_state_dtype"] = str(cache_bf16.get_conv_state(0).dtype)
    info["bf16_ssm_state_dtype"] = str(cache_bf16.get_recurrent_state(0).dtype)

    # Write
    root = FIXTURES / case.name
    previous_reference = None
    if (root / "reference.safetensors").exists():
        previous_reference = (root / "reference.safetensors").read_bytes()
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    hf_files = write_hf(model, case, root / "hf")
    ssm_files = write_ssm(model, case, root / "ssm")

    # Round trip: the written HF folder reloads to the same logits.
    reloaded = Mamba2ForCausalLM.from_pretrained(root / "hf").eval()
    assert max_abs(run_prefill(reloaded, ids), logits_prefill) == 0.0
    # The mamba_ssm state dict, renamed back, loads strictly into the HF model.
    sd = torch.load(root / "ssm" / "pytorch_model.bin", map_location="cpu", weights_only=True)
    sd = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in sd.items()}
    if case.tied:
        sd.pop("lm_head.weight", None)
    fresh = Mamba2ForCausalLM(hf_config(case)).eval()
    missing, unexpected = fresh.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if case.tied:
        fresh.tie_weights()
    assert max_abs(run_prefill(fresh, ids), logits_prefill) == 0.0

    tensors = {
        "input_ids": ids.contiguous(),
        "prefill_len": torch.tensor([case.prefill_len], dtype=torch.int64),
        "logits_prefill": logits_prefill.contiguous(),
        "logits_decode": logits_decode.contiguous(),
        "logits_prefill_bf16": logits_prefill_bf16.contiguous(),
        "logits_decode_bf16": logits_decode_bf16.contiguous(),
    }
    for i in range(case.n_layer):
        tensors[f"conv_state.{i}"] = conv[i].float().contiguous()
        tensors[f"ssm_state.{i}"] = ssm[i].float().contiguous()
    metadata = {
        "case": case.name,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "generator": "scripts/make_fixtures.py",
        "decode_dt_clamp_patched": str(tuple(case.limit) != DEFAULT_LIMIT).lower(),
    }
    ref_path = root / "reference.safetensors"
    safetensors.torch.save_file(tensors, ref_path, metadata=metadata)
    if previous_reference is not None and same_safetensors(previous_reference, ref_path.read_bytes()):
        # safetensors orders the header's metadata by hash: keep the old bytes so that a rerun
        # with the same results leaves git clean.
        ref_path.write_bytes(previous_reference)
    info["hf_files"] = hf_files
    info["ssm_files"] = ssm_files
    info["bytes"] = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    return info


def main(argv):
    from hybrid_cases import case_names as hybrid_case_names  # tests/fixtures/hybrid/ (scripts/hybrid_fixtures.py)

    wanted = set(argv[1:])
    hybrid_wanted = wanted & set(hybrid_case_names())
    unknown = wanted - {c.name for c in CASES} - hybrid_wanted
    if unknown:
        sys.exit(f"unknown case(s): {sorted(unknown)}")
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, safetensors {safetensors.__version__}")
    summary = {}
    for case in CASES:
        if wanted and case.name not in wanted:
            continue
        info = build_case(case)
        summary[case.name] = info
        print(f"== {case.name}")
        for k, v in info.items():
            print(f"   {k}: {v:.3g}" if isinstance(v, float) else f"   {k}: {v}")
    if not wanted or hybrid_wanted:
        import hybrid_fixtures  # patches only the four hybrid modeling modules, not modeling_mamba2

        hybrid_fixtures.run(sorted(hybrid_wanted))
    total = sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file())
    print(f"tests/fixtures total: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main(sys.argv)
