#!/usr/bin/env python3
"""PyTorch / diffusers reference for benches/train_step.rs: the same cases, shapes and step.

    /work/pyref/bin/python tools/bench_reference.py CASE      # tiny | full16 | full32

(the venv of tools/gen_parity.py: torch 2.15.0, diffusers 0.42.1, transformers 5.23.0). Prints one JSON
line like the Rust bench; peak RSS is this process's ru_maxrss, so run one case per process
(tools/bench.sh runs both implementations side by side). Threads: torch's default for the machine.

  tiny    the sd15-tiny parity pipeline with the tiny aesthetic reward: guided DDIM sampling without
          gradient for 9 of 10 steps, then the gradient step (negative branch only), x0, decode, [0,1],
          preprocess (antialiased bicubic resize 32->24, CLIP normalisation), reward, backward.
  fullN   SD1.5's UNet and VAE (diffusers configs, random init) at NxN latents: one guided no-grad UNet
          evaluation (a sampling step), and the gradient step: guided UNet with the negative branch
          carrying the graph, x0 (DDIM, epsilon), VAE decode, linear reward, backward to the negative.
"""
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timed(reps, fn):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def tiny():
    from diffusers import StableDiffusionPipeline, DDIMScheduler
    from transformers import CLIPVisionModelWithProjection
    from safetensors.torch import load_file

    pipe = StableDiffusionPipeline.from_pretrained(REPO / "tests/fixtures/parity/sd15-tiny/pipeline", safety_checker=None)
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    unet, vae, te, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    rdir = REPO / "tests/fixtures/parity/reward-aesthetic/reward"
    clip = CLIPVisionModelWithProjection.from_pretrained(rdir / "clip")
    head_sd = load_file(str(rdir / "head.safetensors"))
    layers = sorted({int(k.split(".")[1]) for k in head_sd})
    for m in (unet, vae, te, clip):
        m.requires_grad_(False).eval()
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    S = clip.config.image_size

    def reward(img):
        x = F.interpolate(img, size=(S, S), mode="bicubic", antialias=True, align_corners=False)
        e = clip(pixel_values=(x - mean) / std).image_embeds
        e = e / e.norm(dim=-1, keepdim=True)
        for i in layers:
            e = F.linear(e, head_sd[f"layers.{i}.weight"], head_sd[f"layers.{i}.bias"])
        return e.squeeze(1)

    def enc(text):
        ids = tok(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return te(ids)[0]

    emb = enc("")
    g = 7.5

    def step():
        with torch.no_grad():
            cond = enc("a red cube on a table")
        sched.set_timesteps(10)
        x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
        ts = sched.timesteps
        with torch.no_grad():
            for t in ts[:9]:
                out = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([emb, cond])).sample
                u, c = out.chunk(2)
                x = sched.step(u + g * (c - u), t, x).prev_sample
        neg = emb.clone().requires_grad_(True)
        t = ts[9]
        with torch.no_grad():
            c = unet(x, t, encoder_hidden_states=cond).sample
        u = unet(x, t, encoder_hidden_states=neg).sample
        x0 = sched.step(u + g * (c - u), t, x).pred_original_sample
        img = (vae.decode(x0 / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        loss = -reward(img).mean()
        loss.backward()

    s = timed(5, step)
    return {"impl": "pytorch", "case": "tiny", "step_s": s, "peak_rss_mb": peak_rss_mb()}


def full(n):
    from diffusers import UNet2DConditionModel, AutoencoderKL, DDIMScheduler

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
        sample_size=64,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    for m in (unet, vae):
        m.requires_grad_(False).eval()
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(30)
    cond = torch.randn(1, 77, 768)
    neg = torch.randn(1, 77, 768)
    x = torch.randn(1, 4, n, n)
    w = torch.randn(1, 3, 8 * n, 8 * n)
    g = 7.5

    def sample_eval():
        with torch.no_grad():
            out = unet(torch.cat([x, x]), 501, encoder_hidden_states=torch.cat([neg, cond])).sample
            u, c = out.chunk(2)
            return u + g * (c - u)

    def grad_step():
        v = neg.clone().requires_grad_(True)
        with torch.no_grad():
            c = unet(x, 201, encoder_hidden_states=cond).sample
        u = unet(x, 201, encoder_hidden_states=v).sample
        x0 = sched.step(u + g * (c - u), 201, x).pred_original_sample
        img = vae.decode(x0 / 0.18215).sample
        (-(w * img).sum()).backward()

    s = timed(2, sample_eval)
    rss_sampling = peak_rss_mb()
    gs = timed(1, grad_step)
    return {"impl": "pytorch", "case": f"full{n}", "sample_eval_s": s, "grad_step_s": gs,
            "peak_rss_sampling_mb": rss_sampling, "peak_rss_mb": peak_rss_mb()}


if __name__ == "__main__":
    case = sys.argv[1] if len(sys.argv) > 1 else "tiny"
    result = tiny() if case == "tiny" else full(int(case.removeprefix("full")))
    result["torch_threads"] = torch.get_num_threads()
    print(json.dumps(result))
