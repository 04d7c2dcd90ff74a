"""Writes tests/fixtures/videocrafter/pickles/: small torch.save checkpoints in the nestings
lvdm's loader accepts, with the metadata Lightning and DeepSpeed put beside the weights, for
tests/videocrafter.rs (the safe reader must take the weights and skip the rest).

    /work/pyref/bin/python tools/gen_checkpoint_pickles.py tests/fixtures/videocrafter/pickles
"""
import collections
import sys
from pathlib import Path

import torch

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
g = torch.Generator().manual_seed(0)
weights = collections.OrderedDict(
    [
        ("model.diffusion_model.time_embed.0.weight", torch.randn(4, 2, generator=g)),
        ("first_stage_model.post_quant_conv.bias", torch.randn(3, generator=g).half()),
        ("scale_arr", torch.linspace(1.0, 0.7, 5)),
    ]
)
meta = {
    "epoch": 3,
    "global_step": 123456789012,  # a long int (LONG1)
    "pytorch-lightning_version": "1.9.3",
    "loss": 0.125,
    "flags": [True, False, None],
    "shape": (1, 2, 3),
    "names": {"a", "b"},
    "blob": b"\x00\x01binary",
    "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(4, 2)}}, "param_groups": [{"lr": 1e-4}]}],
    "hyper_parameters": {"linear_start": 0.00085, "channel_mult": [1, 2, 4, 4]},
}
torch.save({"state_dict": weights, **meta}, out / "lightning.ckpt")
torch.save({"module": {"_forward_module." + k: v for k, v in weights.items()}, **meta}, out / "deepspeed.ckpt")
torch.save(weights, out / "plain.ckpt")
# The expected values, as the reader should give them (f32).
from safetensors.torch import save_file

save_file({k: v.float().contiguous() for k, v in weights.items()}, out / "expected.safetensors")
print(sorted(p.name for p in out.iterdir()))
