"""Writes tiny_ssm.bin, a small `torch.save`d state dict used by tests/weights_pickle.rs.

Run by hand (python3 make_tiny_pth.py); the output is committed. Values are arange-based so the
Rust test can check them without torch. mamba_ssm-style names, plus tensors that exercise the
pickle reader: shared storage (tied lm_head), a transposed view, an offset view, bf16/f16, an
integer tensor and a non-contiguous 3-d view.
"""
import torch

emb = torch.arange(24, dtype=torch.float32).reshape(6, 4)
base = torch.arange(10, dtype=torch.float32)
sd = {
    "backbone.embedding.weight": emb,
    "lm_head.weight": emb,  # tied: same storage
    "backbone.layers.0.mixer.D": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
    "backbone.layers.0.mixer.A_log": torch.tensor([0.25, 0.5], dtype=torch.float16),
    # (4, 3) stored column-major: a transposed view of a (3, 4) tensor.
    "backbone.layers.0.mixer.in_proj.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),
    # A view that starts 3 elements into its storage: [3., 4.].
    "backbone.layers.0.mixer.dt_bias": base[3:5],
    "backbone.norm_f.weight": torch.arange(4, dtype=torch.int64),
    # Neither C- nor Fortran-contiguous.
    "backbone.layers.0.mixer.conv1d.weight": torch.arange(24, dtype=torch.float32).reshape(2, 3, 4).permute(1, 0, 2),
}
torch.save(sd, "tiny_ssm.bin")
