#!/usr/bin/env python3
"""Build the hybrid reference fixtures under tests/fixtures/hybrid/ from HF transformers' own classes.

Families: GraniteMoeHybridForCausalLM (dense), NemotronHForCausalLM, FalconH1ForCausalLM and
BambaForCausalLM. Run by hand (not by CI), from the repository root, through the main script:

    pip install -r scripts/requirements.txt
    python3 scripts/make_fixtures.py                         # every Mamba-2 and hybrid case
    python3 scripts/make_fixtures.py granite_nope_tied_b2    # only the named case(s)

(`python3 scripts/hybrid_fixtures.py [case ...]` runs the hybrid cases alone.)

For every case it builds a tiny random model on CPU in float32, overwrites every parameter with
random values in realistic ranges, and writes:

    tests/fixtures/hybrid/<case>/hf/    config.json + generation_config.json + model.safetensors as
                                        transformers 5.24's save_pretrained writes them
    tests/fixtures/hybrid/<case>/hub/   the same model with config.json in the spelling of the
                                        published Hub repos (pre-transformers-5) and the weights
                                        under the Hub's tensor names
    tests/fixtures/hybrid/<case>/reference.safetensors
                                        input ids, HF logits of the prefill, decode and continued
                                        (multi-turn) paths in f32, prefill and decode in bf16, and
                                        the final per-layer cache of the f32 decode run

The cases and the Hub spelling of their configs are in scripts/hybrid_cases.py; the file format
and the HF semantics the fixtures rely on are documented in tests/fixtures/hybrid/README.md.

One monkeypatch is applied to the installed transformers before any forward: in each of the four
modeling modules the single-token step (`mamba2_selective_state_update`) clamps dt to the same
limit the chunked path of the calling mixer applies (`mixer.time_step_limit`; for nemotron_h that
is `(config.time_step_min, inf)`, for the others `config.time_step_limit`); each mixer class's
forward is wrapped to tell the step its limit. Stock HF never clamps in the step, so without the
patch its token-by-token logits disagree with its own prefill whenever that limit binds. With the
default limit (0, inf) the patch is a no-op. modeling_mamba2 is not touched here (make_fixtures.py
patches it for the Mamba-2 cases).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
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
from transformers import AutoConfig

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()

# HF picks mamba_ssm / causal_conv1d / hub kernels whenever they import; the reference must be
# HF's plain-torch path (mamba2_chunk_scan, mamba2_selective_state_update, causal_conv1d_fn/update).
# (A bare directory of that name on sys.path, e.g. this repository's kernels/ when Python is started
# from the repository root, is a namespace package without an origin: it is not such a package.)
for _pkg in ("mamba_ssm", "causal_conv1d", "kernels"):
    _spec = importlib.util.find_spec(_pkg)
    if _spec is None or _spec.origin is None:
        continue
    sys.exit(f"{_pkg} is installed: uninstall it (or use a clean venv) so HF runs its torch reference path")

from transformers.models.bamba import modeling_bamba  # noqa: E402
from transformers.models.falcon_h1 import modeling_falcon_h1  # noqa: E402
from transformers.models.granitemoehybrid import modeling_granitemoehybrid  # noqa: E402
from transformers.models.nemotron_h import modeling_nemotron_h  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hybrid_cases import (  # noqa: E402
    CASES,
    DEFAULT_LIMIT,
    HUB_ONLY_KEYS,
    HUB_RENAMES,
    INF,
    Case,
    case_names,
    hub_config,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
HYBRID = REPO_ROOT / "tests" / "fixtures" / "hybrid"
GENERATOR = "scripts/hybrid_fixtures.py"


# --------------------------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    name: str  # HF model_type
    module: object  # the modeling module
    config_cls: type
    model_cls: type
    mixer_cls: type
    attn_cls: type
    rmsnorm_cls: type
    gated_norm_cls: type


FAMILIES = {
    "granitemoehybrid": Family(
        "granitemoehybrid",
        modeling_granitemoehybrid,
        transformers.GraniteMoeHybridConfig,
        transformers.GraniteMoeHybridForCausalLM,
        modeling_granitemoehybrid.GraniteMoeHybridMambaLayer,
        modeling_granitemoehybrid.GraniteMoeHybridAttention,
        modeling_granitemoehybrid.GraniteMoeHybridRMSNorm,
        modeling_granitemoehybrid.GraniteMoeHybridRMSNormGated,
    ),
    "nemotron_h": Family(
        "nemotron_h",
        modeling_nemotron_h,
        transformers.NemotronHConfig,
        transformers.NemotronHForCausalLM,
        modeling_nemotron_h.NemotronHMamba2Mixer,
        modeling_nemotron_h.NemotronHAttention,
        modeling_nemotron_h.NemotronHRMSNorm,
        modeling_nemotron_h.NemotronHRMSNormGated,
    ),
    "falcon_h1": Family(
        "falcon_h1",
        modeling_falcon_h1,
        transformers.FalconH1Config,
        transformers.FalconH1ForCausalLM,
        modeling_falcon_h1.FalconH1Mixer,
        modeling_falcon_h1.FalconH1Attention,
        modeling_falcon_h1.FalconH1RMSNorm,
        modeling_falcon_h1.FalconH1RMSNormGated,
    ),
    "bamba": Family(
        "bamba",
        modeling_bamba,
        transformers.BambaConfig,
        transformers.BambaForCausalLM,
        modeling_bamba.BambaMixer,
        modeling_bamba.BambaAttention,
        modeling_bamba.BambaRMSNorm,
        modeling_bamba.BambaRMSNormGated,
    ),
}


# --------------------------------------------------------------------------------------------
# Monkeypatch: the single-token step clamps dt to the calling mixer's chunked-path limit.
# The mixers call the module-level `mamba2_selective_state_update` without any limit, so each
# mixer's forward is wrapped to publish its own `time_step_limit` while it runs.
# --------------------------------------------------------------------------------------------
_ACTIVE = {"limit": None, "patched": True}


def _clamping_step(stock):
    @functools.wraps(stock)
    def step(state, hidden_states, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, z=None, **kwargs):
        limit = _ACTIVE["limit"]
        assert limit is not None, "step called outside a wrapped mixer forward"
        lo, hi = limit
        if _ACTIVE["patched"] and (lo, hi) != DEFAULT_LIMIT:
            # Same order of operations as the stock step, plus the clamp the chunked path applies
            # (mamba2_chunk_scan: softplus(dt + dt_bias), then clamp(min=lo, max=hi)).
            if dt_bias is not None:
                dt = dt + dt_bias.to(dt.dtype)
            if dt_softplus:
                dt = F.softplus(dt)
            dt = torch.clamp(dt, min=lo, max=hi)
            dt_bias, dt_softplus = None, False
        return stock(state, hidden_states, dt, A, B, C, D, dt_bias=dt_bias, dt_softplus=dt_softplus, z=z, **kwargs)

    return step


def _publishing_forward(forward):
    @functools.wraps(forward)
    def wrapped(self, *args, **kwargs):
        previous = _ACTIVE["limit"]
        _ACTIVE["limit"] = tuple(float(v) for v in self.time_step_limit)
        try:
            return forward(self, *args, **kwargs)
        finally:
            _ACTIVE["limit"] = previous

    return wrapped


for _fam in FAMILIES.values():
    if getattr(_fam.module.mamba2_selective_state_update, "_clamps_to_mixer_limit", False):
        continue  # already patched (this file imported a second time)
    _fam.module.mamba2_selective_state_update = _clamping_step(_fam.module.mamba2_selective_state_update)
    _fam.module.mamba2_selective_state_update._clamps_to_mixer_limit = True
    _fam.mixer_cls.forward = _publishing_forward(_fam.mixer_cls.forward)


# --------------------------------------------------------------------------------------------
# Model construction and randomisation
# --------------------------------------------------------------------------------------------
def hf_config(case: Case):
    kwargs = dict(case.config)
    if case.family == "granitemoehybrid":
        renamed = {"mamba": "linear_attention", "attention": "full_attention"}
        kwargs["layer_types"] = [renamed[t] for t in kwargs["layer_types"]]
    if case.family == "nemotron_h":
        pattern = kwargs.pop("hybrid_override_pattern")
        kwargs["layers_block_type"] = [
            {"M": "linear_attention", "*": "full_attention", "-": "mlp"}[ch] for ch in pattern
        ]
    return FAMILIES[case.family].config_cls(**kwargs)


def layer_kinds(model, case: Case) -> list:
    """Per HF layer index: the set of {'mamba', 'attention', 'mlp'} parts it has."""
    fam = FAMILIES[case.family]
    kinds = []
    for layer in model.model.layers:
        parts = set()
        for m in layer.modules():
            if isinstance(m, fam.mixer_cls):
                parts.add("mamba")
            elif isinstance(m, fam.attn_cls):
                parts.add("attention")
        kinds.append(parts)
    return kinds


def _modules_of(model, cls) -> dict:
    return {i: m for i, layer in enumerate(model.model.layers) for m in layer.modules() if isinstance(m, cls)}


def mixers(model, case: Case) -> dict:
    """HF layer index -> Mamba-2 mixer."""
    return _modules_of(model, FAMILIES[case.family].mixer_cls)


def attentions(model, case: Case) -> dict:
    """HF layer index -> attention module."""
    return _modules_of(model, FAMILIES[case.family].attn_cls)


INPUT_PROJ = ("in_proj", "q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "input_linear")
OUTPUT_PROJ = ("out_proj", "o_proj", "down_proj", "output_linear")


@torch.no_grad()
def randomize(model, case: Case, gen: torch.Generator) -> None:
    """Overwrite every parameter; fail if one is left untouched or has no rule."""

    def normal(shape, std, mean=0.0):
        return torch.randn(shape, generator=gen) * std + mean

    def uniform(shape, lo, hi):
        return torch.rand(shape, generator=gen) * (hi - lo) + lo

    fam = FAMILIES[case.family]
    norm_modules = {name for name, m in model.named_modules() if isinstance(m, (fam.rmsnorm_cls, fam.gated_norm_cls))}
    embedding = model.get_input_embeddings().weight
    touched = set()
    for name, p in model.named_parameters():
        leaf = name.split(".")[-1]
        parent = name.rsplit(".", 1)[0]
        short = parent.split(".")[-1]
        if leaf == "A_log":
            v = torch.log(uniform(p.shape, 1.0, 16.0))
        elif leaf == "dt_bias":
            dt = torch.exp(uniform(p.shape, math.log(1e-3), math.log(1e-1)))
            v = dt + torch.log(-torch.expm1(-dt))  # inverse softplus
        elif leaf == "D":
            v = uniform(p.shape, 0.5, 1.5)
        elif short == "conv1d" and leaf == "weight":
            v = uniform(p.shape, -0.6, 0.6)
        elif short == "conv1d" and leaf == "bias":
            v = normal(p.shape, 0.2)
        elif parent in norm_modules and leaf == "weight":
            v = normal(p.shape, 0.2, 1.0)
        elif short in INPUT_PROJ and leaf == "weight":
            v = normal(p.shape, case.in_gain / math.sqrt(p.shape[1]))
        elif short in OUTPUT_PROJ and leaf == "weight":
            v = normal(p.shape, case.out_gain / math.sqrt(p.shape[1]))
        elif short in INPUT_PROJ + OUTPUT_PROJ and leaf == "bias":
            v = normal(p.shape, 0.1)
        elif p is embedding:
            v = normal(p.shape, case.emb_std)
        elif name == "lm_head.weight":
            v = normal(p.shape, case.head_std)
        else:
            raise RuntimeError(f"no randomisation rule for parameter {name} {tuple(p.shape)}")
        p.copy_(v.to(p.dtype))
        touched.add(name)
    named = dict(model.named_parameters(remove_duplicate=False))
    missing = set(named) - touched
    # With tied embeddings lm_head.weight is the embedding Parameter, already randomised.
    assert all(named[m] is embedding for m in missing), missing


# --------------------------------------------------------------------------------------------
# Runs (explicit position_ids in every forward: Bamba's default restarts at 0 on a cache)
# --------------------------------------------------------------------------------------------
def positions(batch, start, end):
    return torch.arange(start, end, dtype=torch.int64).unsqueeze(0).expand(batch, -1)


@torch.no_grad()
def run_prefill(model, ids):
    b, s = ids.shape
    return model(input_ids=ids, position_ids=positions(b, 0, s), use_cache=False).logits.float()


@torch.no_grad()
def run_pieces(model, ids, bounds, explicit_positions=True):
    """Feed ids[:, bounds[k]:bounds[k+1]] through one cache; return (logits of all positions, cache)."""
    b = ids.shape[0]
    cache, logits = None, []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        pos = {"position_ids": positions(b, lo, hi)} if explicit_positions else {}
        out = model(input_ids=ids[:, lo:hi], cache=cache, use_cache=True, **pos)
        cache = out.cache
        logits.append(out.logits.float())
    return torch.cat(logits, dim=1), cache


def run_decode(model, ids, prefill_len):
    return run_pieces(model, ids, [0, prefill_len, *range(prefill_len + 1, ids.shape[1] + 1)])


def run_continued(model, ids, splits):
    return run_pieces(model, ids, [0, *splits, ids.shape[1]])


def cache_tensors(model, case: Case, cache) -> dict:
    out = {}
    kinds = layer_kinds(model, case)
    for i, parts in enumerate(kinds):
        if "mamba" in parts:
            out[f"conv_state.{i}"] = cache.get_conv_state(i)
            out[f"ssm_state.{i}"] = cache.get_recurrent_state(i)
        if "attention" in parts:
            layer = cache.layers[i]
            # HF caches (batch, n_kv, seq, head_dim); stored as (batch, seq, n_kv, head_dim).
            out[f"key.{i}"] = layer.keys.transpose(1, 2)
            out[f"value.{i}"] = layer.values.transpose(1, 2)
    return out


def max_abs(a, b):
    return (a.float() - b.float()).abs().max().item()


def same_safetensors(a: bytes, b: bytes) -> bool:
    """Same tensors (bitwise) and the same metadata, whatever the header order."""
    ta, tb = safetensors.torch.load(a), safetensors.torch.load(b)
    if ta.keys() != tb.keys() or any(ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k]) for k in ta):
        return False

    def meta(raw):
        n = int.from_bytes(raw[:8], "little")
        return json.loads(raw[8 : 8 + n]).get("__metadata__")

    return meta(a) == meta(b)


# --------------------------------------------------------------------------------------------
# Checks of HF semantics the fixtures rely on (documented in tests/fixtures/hybrid/README.md)
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def check_gated_norm(model, case: Case, gen):
    """The installed gated RMSNorm equals the documented formula (grouped; Falcon-H1 optionally
    normalises before the gate); with ngroups > 1 the grouping must matter."""
    mixer = next(iter(mixers(model, case).values()))
    norm = mixer.norm
    if case.family == "falcon_h1" and not case.config["mamba_rms_norm"]:
        assert isinstance(norm, torch.nn.Identity)
        return
    d = mixer.intermediate_size
    groups = mixer.n_groups
    y = torch.randn(2, 3, d, generator=gen)
    z = torch.randn(2, 3, d, generator=gen)

    def rms(h, g):
        hg = h.view(2, 3, g, d // g)
        return (hg * torch.rsqrt(hg.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)).view(2, 3, d)

    before_gate = case.family == "falcon_h1" and case.config["mamba_norm_before_gate"]
    if before_gate:
        expect = rms(y, groups) * norm.weight * F.silu(z)
        other = rms(y, 1) * norm.weight * F.silu(z)
    else:
        expect = rms(y * F.silu(z), groups) * norm.weight
        other = rms(y * F.silu(z), 1) * norm.weight
    got = norm(y, z)
    assert max_abs(got, expect) < 1e-5, f"{case.name}: gated norm is not the documented formula"
    if groups > 1:
        assert max_abs(got, other) > 1e-3, "grouped and ungrouped norms coincide; check is vacuous"

    # bf16, bitwise: where the weight multiply and the cast happen. Granite / Nemotron-H / Bamba:
    # normalise in f32, cast to the input dtype, then multiply by the weight in that dtype.
    # Falcon-H1: multiply by the weight (promoted to f32) and the gate in f32, cast last.
    nb = copy.deepcopy(norm).to(torch.bfloat16)
    yb, zb = y.to(torch.bfloat16), z.to(torch.bfloat16)
    if case.family != "falcon_h1":
        expect_b = nb.weight * rms(yb.float() * F.silu(zb.float()), groups).to(torch.bfloat16)
    elif before_gate:
        w = nb.weight.view(groups, d // groups)
        expect_b = ((w * rms(yb.float(), groups).view(2, 3, groups, d // groups)).view(2, 3, d) * F.silu(zb.float()))
        expect_b = expect_b.to(torch.bfloat16)
    else:
        w = nb.weight.view(groups, d // groups)
        normed = rms(yb * F.silu(zb.float()), groups).view(2, 3, groups, d // groups)
        expect_b = (w * normed).view(2, 3, d).to(torch.bfloat16)
    assert torch.equal(nb(yb, zb), expect_b), f"{case.name}: bf16 gated norm casts elsewhere than documented"


@torch.no_grad()
def rmsnorm_weight_order(model, case: Case, gen) -> str:
    """Which bf16 RMSNorm form the family uses: 'weight * x.to(bf16)' (cast, then multiply in bf16)
    or '(weight.f32 * x).to(bf16)' (multiply in f32, then cast). Checked bitwise."""
    final = {
        "granitemoehybrid": "norm",
        "nemotron_h": "norm_f",
        "falcon_h1": "final_layernorm",
        "bamba": "final_layernorm",
    }
    norm = copy.deepcopy(getattr(model.model, final[case.family])).to(torch.bfloat16)
    x = (torch.randn(4, norm.weight.shape[0], generator=gen) * 3).to(torch.bfloat16)
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    cast_then_mul = norm.weight * normed.to(torch.bfloat16)
    mul_then_cast = (norm.weight.float() * normed).to(torch.bfloat16)
    got = norm(x)
    a, b = torch.equal(got, cast_then_mul), torch.equal(got, mul_then_cast)
    assert a != b, "cannot tell the RMSNorm weight order apart"
    return "cast_then_weight" if a else "weight_in_f32_then_cast"


@torch.no_grad()
def dt_clamp_fractions(model, case: Case, ids):
    """Over all Mamba layers and positions of the f32 prefill: fraction of
    dt = softplus(dt_raw + dt_bias) below / above the chunked path's limit."""
    seen = []
    hooks = []
    for mixer in mixers(model, case).values():

        def fn(_m, _i, out, mixer=mixer):
            if hasattr(mixer, "mup_vector"):
                out = out * mixer.mup_vector
            dt_raw = out[..., -mixer.num_heads :]
            seen.append((F.softplus(dt_raw + mixer.dt_bias), mixer.time_step_limit))

        hooks.append(mixer.in_proj.register_forward_hook(fn))
    run_prefill(model, ids)
    for h in hooks:
        h.remove()
    below = sum((dt < lim[0]).sum().item() for dt, lim in seen)
    above = sum((dt > lim[1]).sum().item() for dt, lim in seen)
    total = sum(dt.numel() for dt, _ in seen)
    return below / total, above / total


@torch.no_grad()
def check_conv_state_is_preconv_input(model, case: Case, ids, conv_states):
    """The cached conv state is the last d_conv xBC inputs of the conv (after in_proj and, in
    Falcon-H1, after the µP multiplier vector; before the conv and its SiLU)."""
    captured = {i: [] for i in mixers(model, case)}
    hooks = []
    for i, mixer in mixers(model, case).items():

        def fn(_m, _i, out, i=i, mixer=mixer):
            if hasattr(mixer, "mup_vector"):
                out = out * mixer.mup_vector
            captured[i].append(out[..., mixer.intermediate_size : mixer.intermediate_size + mixer.conv_dim])

        hooks.append(mixer.in_proj.register_forward_hook(fn))
    run_decode(model, ids, case.prefill_len)
    for h in hooks:
        h.remove()
    for i, mixer in mixers(model, case).items():
        xbc = torch.cat(captured[i], dim=1).transpose(1, 2)[..., -mixer.conv_kernel_size :]
        assert max_abs(conv_states[i], xbc) == 0.0, f"layer {i}: conv state is not the pre-conv input"


# --------------------------------------------------------------------------------------------
# Hub layout
# --------------------------------------------------------------------------------------------
def check_hub_config_equivalent(case: Case, hf_dir: Path, hub_dir: Path) -> list:
    a = AutoConfig.from_pretrained(hf_dir)
    b = AutoConfig.from_pretrained(hub_dir)
    assert type(a) is type(b) is FAMILIES[case.family].config_cls
    da, db = a.to_dict(), b.to_dict()
    differ = sorted(k for k in set(da) | set(db) if da.get(k) != db.get(k))
    bad = [k for k in differ if k not in HUB_ONLY_KEYS]
    if case.family != "nemotron_h":
        bad += [k for k in differ if k == "rms_norm_eps"]
    detail = ", ".join(f"{k}: {da.get(k)!r} vs {db.get(k)!r}" for k in bad)
    assert not bad, f"{case.name}: hub config loads differently: {detail}"
    # The things an engine reads, spelled out.
    assert list(a.layer_types) == list(b.layer_types)
    assert getattr(a, "rope_parameters", None) == getattr(b, "rope_parameters", None)
    return differ


def write_hub(case: Case, cfg, hf_dir: Path, hub_dir: Path) -> list:
    hub_dir.mkdir(parents=True)
    # json.dumps writes an infinite limit as the bare literal `Infinity`, as the Hub repos do.
    (hub_dir / "config.json").write_text(json.dumps(hub_config(case, cfg), indent=2, sort_keys=True) + "\n")
    tensors = safetensors.torch.load_file(hf_dir / "model.safetensors")
    for src, dst in HUB_RENAMES[case.family]:
        tensors = {k.replace(src, dst): v for k, v in tensors.items()}
    if not case.hub_sharded and not HUB_RENAMES[case.family]:
        shutil.copyfile(hf_dir / "model.safetensors", hub_dir / "model.safetensors")
    elif not case.hub_sharded:
        safetensors.torch.save_file(tensors, hub_dir / "model.safetensors", metadata={"format": "pt"})
    else:
        # Two shards: embedding and the first half of the layers, then the rest (lm_head, final norm).
        names = sorted(tensors)
        nl = cfg.num_hidden_layers

        def shard_of(n):
            parts = n.split(".")
            if "layers" in parts:
                return 1 if int(parts[parts.index("layers") + 1]) < (nl + 1) // 2 else 2
            return 1 if "embed" in n else 2

        weight_map = {}
        for s in (1, 2):
            fname = f"model-0000{s}-of-00002.safetensors"
            part = {n: tensors[n].contiguous() for n in names if shard_of(n) == s}
            safetensors.torch.save_file(part, hub_dir / fname, metadata={"format": "pt"})
            weight_map |= {n: fname for n in part}
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (hub_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return sorted(p.name for p in hub_dir.iterdir())


# --------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------
def build_case(case: Case) -> dict:
    assert 1 <= case.prefill_len < case.seq
    p1, p2 = case.splits
    lengths = (p1, p2 - p1, case.seq - p2)
    assert min(lengths) >= 2 and len(set(lengths)) == 3, lengths
    torch.manual_seed(case.seed)
    gen = torch.Generator().manual_seed(case.seed)

    cfg = hf_config(case)
    model = FAMILIES[case.family].model_cls(cfg).eval()
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    assert tied == cfg.tie_word_embeddings
    randomize(model, case, gen)
    kinds = layer_kinds(model, case)
    n_mamba = sum("mamba" in k for k in kinds)
    n_attn = sum("attention" in k for k in kinds)
    assert n_mamba >= 2 and n_attn >= 2, kinds
    check_gated_norm(model, case, gen)
    norm_order = rmsnorm_weight_order(model, case, gen)

    ids = torch.randint(0, cfg.vocab_size, (case.batch, case.seq), generator=gen, dtype=torch.int64)

    # f32 reference
    logits_prefill = run_prefill(model, ids)
    logits_decode, cache = run_decode(model, ids, case.prefill_len)
    logits_continued, cont_cache = run_continued(model, ids, case.splits)
    states = cache_tensors(model, case, cache)
    d32 = max_abs(logits_prefill, logits_decode)
    dcont = max_abs(logits_prefill, logits_continued)
    assert d32 < 1e-4, f"{case.name}: HF f32 decode != prefill ({d32:.3g})"
    assert dcont < 1e-4, f"{case.name}: HF f32 continued != prefill ({dcont:.3g})"
    # The prefill-only and continued caches hold the same final state as the decode run.
    _, pre_cache = run_pieces(model, ids, [0, case.seq])
    dstate = {}
    for other, tag in ((pre_cache, "prefill"), (cont_cache, "continued")):
        o = cache_tensors(model, case, other)
        assert o.keys() == states.keys()
        dstate[tag] = {kind: max((max_abs(o[k], states[k]) for k in states if k.startswith(kind + ".")), default=0.0)
                       for kind in ("conv_state", "ssm_state", "key", "value")}
        assert dstate[tag]["ssm_state"] < 1e-4 and dstate[tag]["conv_state"] < 1e-5, dstate
        assert dstate[tag]["key"] < 1e-5 and dstate[tag]["value"] < 1e-5, dstate
    check_conv_state_is_preconv_input(model, case, ids, {i: states[f"conv_state.{i}"] for i in mixers(model, case)})
    for k, v in states.items():
        assert v.dtype == torch.float32, (k, v.dtype)
    for i, m in mixers(model, case).items():
        assert states[f"conv_state.{i}"].shape == (case.batch, m.conv_dim, m.conv_kernel_size)
        assert states[f"ssm_state.{i}"].shape == (case.batch, m.num_heads, m.head_dim, m.ssm_state_size)
    for i, a in attentions(model, case).items():
        assert states[f"key.{i}"].shape == (case.batch, case.seq, cfg.num_key_value_heads, a.head_dim)

    chunk_limits = {tuple(float(v) for v in m.time_step_limit) for m in mixers(model, case).values()}
    assert len(chunk_limits) == 1
    chunk_limit = chunk_limits.pop()
    below, above = dt_clamp_fractions(model, case, ids)
    info = {
        "f32_decode_vs_prefill": d32,
        "f32_continued_vs_prefill": dcont,
        "final_state_prefill_vs_decode": dstate["prefill"],
        "final_state_continued_vs_decode": dstate["continued"],
        "logit_abs_max": logits_prefill.abs().max().item(),
        "logit_std": logits_prefill.std().item(),
        "logit_position_spread": (logits_prefill[:, 1:] - logits_prefill[:, :-1]).abs().mean().item(),
        "chunk_dt_limit": chunk_limit,
        "dt_fraction_below_limit": below,
        "dt_fraction_above_limit": above,
        "rmsnorm_weight_order": norm_order,
        "layer_kinds": ["+".join(sorted(k)) or "mlp" for k in kinds],
    }
    # Evidence for passing position_ids: HF's own default on a non-empty cache (Bamba restarts at 0).
    bounds = [0, case.prefill_len, *range(case.prefill_len + 1, case.seq + 1)]
    info["decode_default_position_ids_vs_prefill"] = max_abs(
        run_pieces(model, ids, bounds, explicit_positions=False)[0], logits_prefill
    )
    patched = chunk_limit != DEFAULT_LIMIT
    if patched:
        assert below + above > 0.02, f"{case.name}: the limit hardly binds ({below:.3f} below, {above:.3f} above)"
        # Evidence for the patch: stock HF (no clamp in the step) disagrees with its own prefill.
        _ACTIVE["patched"] = False
        try:
            stock_decode, _ = run_decode(model, ids, case.prefill_len)
        finally:
            _ACTIVE["patched"] = True
        info["stock_hf_decode_vs_prefill"] = max_abs(stock_decode, logits_prefill)

    # bf16 runs (HF's own bf16 numerics, logits cast to f32)
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    logits_prefill_bf16 = run_prefill(model_bf16, ids)
    logits_decode_bf16, cache_bf16 = run_decode(model_bf16, ids, case.prefill_len)
    info["bf16_prefill_vs_f32"] = max_abs(logits_prefill_bf16, logits_prefill)
    info["bf16_decode_vs_f32"] = max_abs(logits_decode_bf16, logits_prefill)
    info["bf16_decode_vs_bf16_prefill"] = max_abs(logits_decode_bf16, logits_prefill_bf16)
    first_mamba = next(iter(mixers(model, case)))
    info["bf16_conv_state_dtype"] = str(cache_bf16.get_conv_state(first_mamba).dtype)
    info["bf16_ssm_state_dtype"] = str(cache_bf16.get_recurrent_state(first_mamba).dtype)

    # Write
    root = HYBRID / case.name
    previous_reference = None
    if (root / "reference.safetensors").exists():
        previous_reference = (root / "reference.safetensors").read_bytes()
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    model.save_pretrained(root / "hf")
    assert (root / "hf" / "model.safetensors").exists()
    hf_files = sorted(p.name for p in (root / "hf").iterdir())
    hub_files = write_hub(case, cfg, root / "hf", root / "hub")

    # Both layouts reload (config and weights) to bitwise the same logits.
    info["hub_config_keys_differing"] = check_hub_config_equivalent(case, root / "hf", root / "hub")
    for layout in ("hf", "hub"):
        reloaded = FAMILIES[case.family].model_cls.from_pretrained(root / layout).eval()
        assert max_abs(run_prefill(reloaded, ids), logits_prefill) == 0.0, f"{case.name}: {layout}/ reload differs"
    hf_names = sorted(safetensors.torch.load_file(root / "hf" / "model.safetensors"))
    hub_names = sorted(
        n for f in sorted((root / "hub").glob("*.safetensors")) for n in safetensors.torch.load_file(f)
    )
    info["tensor_names_identical_in_both_layouts"] = hf_names == hub_names

    tensors = {
        "input_ids": ids.contiguous(),
        "prefill_len": torch.tensor([case.prefill_len], dtype=torch.int64),
        "continued_splits": torch.tensor(list(case.splits), dtype=torch.int64),
        "logits_prefill": logits_prefill.contiguous(),
        "logits_decode": logits_decode.contiguous(),
        "logits_continued": logits_continued.contiguous(),
        "logits_prefill_bf16": logits_prefill_bf16.contiguous(),
        "logits_decode_bf16": logits_decode_bf16.contiguous(),
    }
    for k, v in states.items():
        tensors[k] = v.float().contiguous()
    lo, hi = chunk_limit
    metadata = {
        "case": case.name,
        "family": case.family,
        "hf_class": FAMILIES[case.family].model_cls.__name__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "generator": GENERATOR,
        "position_ids": "explicit in every forward",
        "patches": f"modeling_{case.family}.mamba2_selective_state_update clamps dt to the mixer's time_step_limit",
        "chunk_dt_limit": json.dumps([lo, "inf" if hi == INF else hi]),
        "decode_dt_clamp_patched": str(patched).lower(),
    }
    ref_path = root / "reference.safetensors"
    safetensors.torch.save_file(tensors, ref_path, metadata=metadata)
    if previous_reference is not None and same_safetensors(previous_reference, ref_path.read_bytes()):
        # safetensors orders the header's metadata by hash: keep the old bytes so that a rerun
        # with the same results leaves git clean.
        ref_path.write_bytes(previous_reference)
    info["hf_files"] = hf_files
    info["hub_files"] = hub_files
    info["bytes"] = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    return info


def run(names=None) -> dict:
    """Build the named hybrid cases (all when names is empty/None) and print their numbers."""
    wanted = set(names or [])
    unknown = wanted - set(case_names())
    if unknown:
        sys.exit(f"unknown hybrid case(s): {sorted(unknown)}")
    summary = {}
    for case in CASES:
        if wanted and case.name not in wanted:
            continue
        info = build_case(case)
        summary[case.name] = info
        print(f"== hybrid/{case.name} ({case.family})")
        for k, v in info.items():
            print(f"   {k}: {v:.3g}" if isinstance(v, float) else f"   {k}: {v}")
    if HYBRID.exists():
        total = sum(f.stat().st_size for f in HYBRID.rglob("*") if f.is_file())
        print(f"tests/fixtures/hybrid total: {total / 1e6:.2f} MB")
    return summary


if __name__ == "__main__":
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, safetensors {safetensors.__version__}")
    run(sys.argv[1:])
