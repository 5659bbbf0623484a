#!/usr/bin/env python3
"""Build the mixture-of-experts fixtures under tests/fixtures/moe/ from HF transformers' classes.

Families (GitHub issue 16): GraniteMoeHybridForCausalLM with `num_local_experts` > 0 (softmax
top-k router, experts beside the `shared_mlp` in every layer; Granite-4.0-H-Tiny/Small) and
NemotronHForCausalLM with `E` layers (sigmoid router + `e_score_correction_bias`, group-limited
top-k, ReLU² experts + shared experts; Nemotron-3-Nano). Run by hand from the repository root:

    pip install -r scripts/requirements.txt
    python3 scripts/moe_fixtures.py [case ...]

Every case is a tiny random model (f32, CPU) whose every parameter and buffer is overwritten
(router weights and the correction bias included, so that routing is not trivial and near-ties are
unlikely; the smallest top-k margin is printed and asserted). Written per case:

    tests/fixtures/moe/<case>/hf/   config.json + model.safetensors as transformers 5.24 saves them
    tests/fixtures/moe/<case>/hub/  config.json in the Hub repos' spelling, same weights
    tests/fixtures/moe/<case>/reference.safetensors
        input_ids (batch, seq) i64, prefill_len (1), logits_prefill / logits_decode (f32 runs,
        decode = HF's own cache: a prefill of P tokens then one token per forward),
        logits_prefill_bf16 / logits_decode_bf16 (the model reloaded with dtype=bfloat16, so that
        HF's _keep_in_fp32 rules apply as for a real checkpoint), and
        routing.<layer> (batch, seq, top_k) f32: the expert ids the f32 prefill chose per token,
        sorted ascending (Nemotron's router uses topk(sorted=False), whose order is unspecified;
        the set is what the output depends on).

Reuses scripts/hybrid_fixtures.py (its step monkeypatch, runs, randomisation rules, Hub spelling).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import safetensors.torch
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hybrid_fixtures as hfx  # noqa: E402  (also installs its dt-clamp monkeypatch)
from hybrid_cases import COMMON, Case, hub_config  # noqa: E402

from transformers.models.granitemoehybrid import modeling_granitemoehybrid as mg  # noqa: E402
from transformers.models.nemotron_h import modeling_nemotron_h as mn  # noqa: E402

MOE = hfx.REPO_ROOT / "tests" / "fixtures" / "moe"
ROUTERS = (mg.GraniteMoeHybridTopKRouter, mn.NemotronHTopkRouter)

CASES = [
    # Granite-4.0-H-Tiny style: every layer = mixer, then MoE (8 experts, top-3) + shared_mlp.
    Case(
        name="granite_moe_b2",
        family="granitemoehybrid",
        seed=16001,
        batch=2,
        seq=14,
        prefill_len=6,
        splits=(4, 9),
        config=dict(
            COMMON,
            hidden_size=32,
            num_hidden_layers=3,
            layer_types=["mamba", "attention", "mamba"],
            num_attention_heads=4,
            num_key_value_heads=2,
            shared_intermediate_size=24,
            intermediate_size=16,
            num_local_experts=8,
            num_experts_per_tok=3,
            mamba_n_heads=4,
            mamba_d_head=16,
            mamba_n_groups=2,
            mamba_d_state=16,
            mamba_d_conv=4,
            mamba_expand=2,
            mamba_chunk_size=8,
            position_embedding_type="rope",
            embedding_multiplier=6.0,
            residual_multiplier=0.4,
            attention_multiplier=0.2,
            logits_scaling=2.0,
            rms_norm_eps=1e-5,
            max_position_embeddings=4096,
        ),
    ),
    # Nemotron-3-Nano style, group-limited: 8 experts in 4 groups, 2 groups kept, top-3,
    # normalised top-k weights times 2.5.
    Case(
        name="nemotron_moe_grouped_b2",
        family="nemotron_h",
        seed=16002,
        batch=2,
        seq=13,
        prefill_len=5,
        splits=(4, 9),
        config=dict(
            COMMON,
            hidden_size=32,
            hybrid_override_pattern="ME*E-M",
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            mamba_num_heads=4,
            mamba_head_dim=16,
            n_groups=2,
            ssm_state_size=16,
            chunk_size=8,
            intermediate_size=24,
            n_routed_experts=8,
            num_experts_per_tok=3,
            moe_intermediate_size=16,
            moe_shared_expert_intermediate_size=20,
            n_shared_experts=1,
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            max_position_embeddings=4096,
        ),
    ),
    # One group, unnormalised weights (norm_topk_prob false), 6 experts top-2.
    Case(
        name="nemotron_moe_flat_b1",
        family="nemotron_h",
        seed=16003,
        batch=1,
        seq=12,
        prefill_len=7,
        splits=(4, 9),
        config=dict(
            COMMON,
            hidden_size=32,
            hybrid_override_pattern="EM*E",
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            mamba_num_heads=4,
            mamba_head_dim=16,
            n_groups=1,
            ssm_state_size=16,
            chunk_size=8,
            intermediate_size=24,
            n_routed_experts=6,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            moe_shared_expert_intermediate_size=16,
            n_shared_experts=1,
            n_group=1,
            topk_group=1,
            norm_topk_prob=False,
            routed_scaling_factor=1.0,
            max_position_embeddings=4096,
        ),
    ),
]


def hf_config(case: Case):
    kwargs = dict(case.config)
    if case.family == "granitemoehybrid":
        renamed = {"mamba": "linear_attention", "attention": "full_attention"}
        kwargs["layer_types"] = [renamed[t] for t in kwargs["layer_types"]]
    else:
        letters = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
        kwargs["layers_block_type"] = [letters[ch] for ch in kwargs.pop("hybrid_override_pattern")]
    return hfx.FAMILIES[case.family].config_cls(**kwargs)


class _DenseView:
    """The model seen without its MoE parameters, for hybrid_fixtures.randomize's rules."""

    def __init__(self, model, moe_names):
        self.model, self.moe = model, moe_names

    def named_modules(self):
        return self.model.named_modules()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def named_parameters(self, remove_duplicate=True):
        for name, p in self.model.named_parameters(remove_duplicate=remove_duplicate):
            if name not in self.moe:
                yield name, p


def is_moe_param(name: str) -> bool:
    return ".experts." in name or ".router." in name or ".gate." in name


@torch.no_grad()
def randomize(model, case: Case, gen: torch.Generator) -> None:
    moe = {n for n, _ in model.named_parameters() if is_moe_param(n)}
    assert moe, "no MoE parameters"
    hfx.randomize(_DenseView(model, moe), case, gen)
    for name, p in model.named_parameters():
        if name not in moe:
            continue
        leaf = name.split(".")[-1]
        if leaf in ("gate_up_proj", "up_proj"):  # (E, out, hidden)
            v = torch.randn(p.shape, generator=gen) * (case.in_gain / math.sqrt(p.shape[2]))
        elif leaf == "down_proj":  # (E, hidden, I)
            v = torch.randn(p.shape, generator=gen) * (case.out_gain / math.sqrt(p.shape[2]))
        elif leaf == "weight":  # router (E, hidden): logits of O(1) so that top-k is decisive
            v = torch.randn(p.shape, generator=gen) * (1.5 / math.sqrt(p.shape[1]))
        else:
            raise RuntimeError(f"no randomisation rule for MoE parameter {name} {tuple(p.shape)}")
        p.copy_(v)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(torch.randn(b.shape, generator=gen) * 0.3)


class RoutingLog:
    """Forward hooks on every router: the chosen ids of each call, by HF layer index."""

    def __init__(self, model):
        self.calls: dict[int, list] = {}
        self.handles = []
        for i, layer in enumerate(model.model.layers):
            for m in layer.modules():
                if isinstance(m, ROUTERS):
                    self.handles.append(m.register_forward_hook(self._hook(i)))

    def _hook(self, i):
        def hook(_module, _inputs, output):
            self.calls.setdefault(i, []).append(output[2].detach().clone())

        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def top_k_margin(model, case: Case, ids) -> float:
    """Smallest gap between the k-th and (k+1)-th selection score over tokens and MoE layers."""
    margins = []

    def hook(module, inputs, _output):
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
        logits = x @ module.weight.float().T
        if isinstance(module, mn.NemotronHTopkRouter):
            s = logits.sigmoid() + module.e_score_correction_bias
            g = s.view(-1, module.num_group, module.num_experts // module.num_group)
            gs = g.topk(2, dim=-1)[0].sum(-1).sort(dim=-1, descending=True)[0]
            if module.topk_group < module.num_group:
                margins.append((gs[:, module.topk_group - 1] - gs[:, module.topk_group]).min().item())
            keep = torch.zeros_like(gs).scatter_(1, g.topk(2, dim=-1)[0].sum(-1).topk(module.topk_group)[1], 1)
            s = s.masked_fill(~keep.repeat_interleave(module.num_experts // module.num_group, 1).bool(), -1e9)
        else:
            s = logits
        top = s.sort(dim=-1, descending=True)[0]
        margins.append((top[:, module.top_k - 1] - top[:, module.top_k]).min().item())

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, ROUTERS)]
    try:
        hfx.run_prefill(model, ids)
    finally:
        for h in handles:
            h.remove()
    return min(margins)


def write_hub(case: Case, cfg, hf_dir: Path, hub_dir: Path) -> None:
    hub_dir.mkdir(parents=True)
    spelled = hub_config(case, cfg)
    if case.family == "granitemoehybrid":
        spelled |= {"num_local_experts": cfg.num_local_experts, "num_experts_per_tok": cfg.num_experts_per_tok}
    else:
        spelled |= {
            "n_routed_experts": cfg.n_routed_experts,
            "num_experts_per_tok": cfg.num_experts_per_tok,
            "moe_intermediate_size": cfg.moe_intermediate_size,
            "moe_shared_expert_intermediate_size": cfg.moe_shared_expert_intermediate_size,
            "n_shared_experts": cfg.n_shared_experts,
            "n_group": cfg.n_group,
            "topk_group": cfg.topk_group,
            "norm_topk_prob": cfg.norm_topk_prob,
            "routed_scaling_factor": cfg.routed_scaling_factor,
        }
    (hub_dir / "config.json").write_text(json.dumps(spelled, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(hf_dir / "model.safetensors", hub_dir / "model.safetensors")


def build_case(case: Case) -> dict:
    torch.manual_seed(case.seed)
    gen = torch.Generator().manual_seed(case.seed)
    cfg = hf_config(case)
    model = hfx.FAMILIES[case.family].model_cls(cfg).eval()
    randomize(model, case, gen)
    ids = torch.randint(0, cfg.vocab_size, (case.batch, case.seq), generator=gen, dtype=torch.int64)

    log = RoutingLog(model)
    logits_prefill = hfx.run_prefill(model, ids)
    log.close()
    routing = {
        i: calls[0].reshape(case.batch, case.seq, -1).sort(dim=-1)[0].float() for i, calls in log.calls.items()
    }
    assert routing, "no router ran"
    logits_decode, _ = hfx.run_decode(model, ids, case.prefill_len)
    d32 = hfx.max_abs(logits_prefill, logits_decode)
    assert d32 < 1e-4, f"{case.name}: HF f32 decode != prefill ({d32:.3g})"
    margin = top_k_margin(model, case, ids)
    assert margin > 1e-4, f"{case.name}: a top-k near-tie ({margin:.3g}); change the seed"
    n_experts = cfg.num_local_experts
    used = {int(e) for r in routing.values() for e in r.flatten()}

    root = MOE / case.name
    previous = (root / "reference.safetensors").read_bytes() if (root / "reference.safetensors").exists() else None
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    model.save_pretrained(root / "hf")
    write_hub(case, cfg, root / "hf", root / "hub")
    for layout in ("hf", "hub"):
        reloaded = hfx.FAMILIES[case.family].model_cls.from_pretrained(root / layout).eval()
        assert hfx.max_abs(hfx.run_prefill(reloaded, ids), logits_prefill) == 0.0, f"{layout}/ reload differs"

    bf16 = hfx.FAMILIES[case.family].model_cls.from_pretrained(root / "hf", dtype=torch.bfloat16).eval()
    logits_prefill_bf16 = hfx.run_prefill(bf16, ids)
    logits_decode_bf16, _ = hfx.run_decode(bf16, ids, case.prefill_len)

    tensors = {
        "input_ids": ids.contiguous(),
        "prefill_len": torch.tensor([case.prefill_len], dtype=torch.int64),
        "logits_prefill": logits_prefill.contiguous(),
        "logits_decode": logits_decode.contiguous(),
        "logits_prefill_bf16": logits_prefill_bf16.contiguous(),
        "logits_decode_bf16": logits_decode_bf16.contiguous(),
    } | {f"routing.{i}": r.contiguous() for i, r in routing.items()}
    metadata = {
        "case": case.name,
        "family": case.family,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "generator": "scripts/moe_fixtures.py",
        "routing": "expert ids chosen in the f32 prefill, per token, sorted ascending",
    }
    ref = root / "reference.safetensors"
    safetensors.torch.save_file(tensors, ref, metadata=metadata)
    if previous is not None and hfx.same_safetensors(previous, ref.read_bytes()):
        ref.write_bytes(previous)
    return {
        "f32_decode_vs_prefill": d32,
        "bf16_prefill_vs_f32": hfx.max_abs(logits_prefill_bf16, logits_prefill),
        "bf16_decode_vs_f32": hfx.max_abs(logits_decode_bf16, logits_prefill),
        "min_top_k_margin": margin,
        "experts_used": f"{len(used)} of {n_experts}",
        "moe_layers": sorted(routing),
        "hf_tensor_names_moe": sorted(
            n for n in safetensors.torch.load_file(root / "hf" / "model.safetensors") if is_moe_param(n)
            or "shared" in n
        )[:8],
        "bytes": sum(f.stat().st_size for f in root.rglob("*") if f.is_file()),
    }


def main(names) -> None:
    unknown = set(names) - {c.name for c in CASES}
    if unknown:
        sys.exit(f"unknown MoE case(s): {sorted(unknown)}")
    for case in CASES:
        if names and case.name not in names:
            continue
        print(f"== moe/{case.name} ({case.family})")
        for k, v in build_case(case).items():
            print(f"   {k}: {v:.3g}" if isinstance(v, float) else f"   {k}: {v}")
    total = sum(f.stat().st_size for f in MOE.rglob("*") if f.is_file())
    print(f"tests/fixtures/moe total: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main(sys.argv[1:])
