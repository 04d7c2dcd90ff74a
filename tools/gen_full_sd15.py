#!/usr/bin/env python3
"""Write a full-size Stable Diffusion 1.5 pipeline folder with random weights, in diffusers' layout, for
memory measurements of `reneg generate` (BENCHMARKS.md, "Loading weights"). The configs are SD1.5's
(UNet 860M parameters, CLIP ViT-L/14 text encoder, the SD VAE, the PNDM scheduler config it ships); the
weights are torch's default initialisation, stored in float32 or float16 as a single
`diffusion_pytorch_model.safetensors` / `model.safetensors` per component. The tokenizer is copied from the
sd15-tiny parity fixture (the real CLIP vocabulary).

Reference stack: the venv of tools/gen_parity.py, outside the repository; never used in CI. About 7 GB of
disk for both dtypes:

    /work/pyref/bin/python tools/gen_full_sd15.py OUT_DIR {f32,f16}
"""
import json
import shutil
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

SCHEDULER = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}


def main(out: Path, dtype_name: str) -> None:
    dtype = {"f32": torch.float32, "f16": torch.float16}[dtype_name]
    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    unet = UNet2DConditionModel(
        sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    unet.to(dtype).save_pretrained(out / "unet", safe_serialization=True)
    del unet
    vae = AutoencoderKL(
        sample_size=512, block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
        norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    vae.to(dtype).save_pretrained(out / "vae", safe_serialization=True)
    del vae
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
    ))
    te.to(dtype).save_pretrained(out / "text_encoder", safe_serialization=True)
    del te
    fixture = Path(__file__).resolve().parent.parent / "tests/fixtures/parity/sd15-tiny/pipeline"
    shutil.copytree(fixture / "tokenizer", out / "tokenizer", dirs_exist_ok=True)
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler/scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2))
    index = json.loads((fixture / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "PNDMScheduler"]
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    print(out, dtype_name, "written")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
