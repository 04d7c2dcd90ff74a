#!/usr/bin/env python3
"""PyTorch / diffusers reference for benches/train_step.rs: the same cases, shapes and step.

    /work/pyref/bin/python tools/bench_reference.py CASE      # tiny | full16 | full32 | full64 | fullNxB | sdxl32 | pixart32
    python3 tools/bench_reference.py full64x4 --device cuda [--precision f32|tf32|bf16|fp16] [--batch B]

(the venv of tools/gen_parity.py: torch 2.15.0, diffusers 0.42.1, transformers 5.23.0). Prints one JSON
line like the Rust bench; peak RSS is this process's ru_maxrss, so run one case per process
(tools/bench.sh runs both implementations side by side). Threads: torch's default for the machine.

  tiny    the sd15-tiny parity pipeline with the tiny aesthetic reward: guided DDIM sampling without
          gradient for 9 of 10 steps, then the gradient step (negative branch only), x0, decode, [0,1],
          preprocess (antialiased bicubic resize 32->24, CLIP normalisation), reward, backward.
  fullN   SD1.5's UNet and VAE (diffusers configs, random init) at NxN latents: one guided no-grad UNet
          evaluation (a sampling step), and the gradient step: guided UNet with the negative branch
          carrying the graph, x0 (DDIM, epsilon), VAE decode, linear reward, backward to the negative.
  fullNxB the same for a batch of B latents and prompts (--batch B does the same): the sampling evaluation
          is the UNet on 2B latents, the gradient step is for B prompts with one shared negative.
  sdxl32  the same two timings for SDXL base 1.0's UNet (its diffusers config, 2.57 B parameters, random init;
          10.3 GB in f32) and the same VAE with scaling factor 0.13025 at 32x32 latents, batch 1, guidance 5.0,
          no text encoder: random embeds [1, 77, 2048] and pooled [1, 1280] for prompt and negative, size ids
          (256, 256, 0, 0, 256, 256) for both branches; the gradient reaches the negative's embeds and pooled.

  pixart32  PixArt-alpha 512's transformer (PixArt-XL-2-512x512's diffusers config: 28 layers of 1152, 611 M
          parameters, random init) and the SD VAE (scaling factor 0.18215) at 32x32 latents, batch 1, guidance 4.5:
          captions [1, 120, 4096] with attention masks keeping 20 rows (prompt) and 1 (negative: the mask of "");
          the guided output is the first 4 of the 8 channels (learned sigma); the gradient reaches the negative's
          embeddings, its mask fixed.

On a GPU (--device cuda, as RENEG_BENCH_DEVICE=cuda for benches/train_step.rs) each timing synchronizes the
device, the repetitions are 5 (sampling) and 3 (gradient step), and the line adds peak_gpu_mb (the largest
device-wide memory in use, total - free from cudaMemGetInfo, sampled every 2 ms by a second thread, CUDA
context included: the Rust bench's measure), torch_max_allocated_mb and torch_max_reserved_mb. Without
--tf32 the float32 matrix products and convolutions run in true f32 (torch.backends.{cuda.matmul,cudnn}
.allow_tf32 = False; PyTorch's own default lets cuDNN use TF32): reneg's candle build runs f32 in f32.
RENEG_BENCH_SAMPLING_ONLY=1 stops a full case after the sampling evaluation (as the Rust bench), for
interleaved runs of the two implementations.

--precision is reneg's (src/precision.rs), like for like: f32 (TF32 off), tf32 (TF32 on), bf16 / fp16 (weights
in the low type, inputs in f32, both timed steps inside torch.autocast(dtype), which runs matmuls and
convolutions in the low type and norms, softmax and the loss in f32). --dtype f32|bf16|f16 and --tf32 are the
older spellings. Every line has impl, precision, batch, sample_eval_s, grad_step_s, train_step_s, peak_mem_mib
(the device peak on a GPU, peak RSS on the CPU), commit ($RENEG_COMMIT) and device.
"""
import argparse
import contextlib
import os
import threading
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
DEV = torch.device("cpu")
DTYPE = torch.float32
PRECISION = "f32"
CHECKPOINTING = False


def autocast():
    """torch.autocast in the low type for bf16 / fp16, nothing for f32 / tf32."""
    if PRECISION in ("bf16", "fp16"):
        return torch.autocast(DEV.type, dtype=DTYPE)
    return contextlib.nullcontext()


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize(DEV)


class GpuMemory:
    """Device-wide memory in use (total - free), sampled by a thread; nothing on the CPU."""

    def __init__(self):
        self.peak = 0
        self.base = 0
        self._stop = False
        if DEV.type == "cuda":
            self.base = self.used()
            threading.Thread(target=self._run, daemon=True).start()

    @staticmethod
    def used():
        free, total = torch.cuda.mem_get_info(DEV)
        return total - free

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, self.used())
            time.sleep(0.002)

    def take(self):
        """The peak in MiB since the last take."""
        time.sleep(0.01)
        p, self.peak = self.peak, 0
        return p / 2**20


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reps(default):
    # RENEG_BENCH_REPS, as the Rust bench reads it.
    return int(os.environ.get("RENEG_BENCH_REPS", default))


def timed(reps, fn):
    fn()
    sync()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
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

    s = timed(reps(5), step)
    return {"impl": "pytorch", "case": "tiny", "step_s": s, "peak_rss_mb": peak_rss_mb()}


# The VAE of the full cases: SD's (diffusers' config of stable-diffusion-v1-5/vae; SDXL's has the same layout).
SD_VAE = dict(
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)

# SDXL base 1.0's UNet (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json: its keys that shape the model;
# the file's others equal UNet2DConditionModel's defaults): 2.57 B parameters.
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), norm_num_groups=32, cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    flip_sin_to_cos=True, freq_shift=0,
)


def full(n, b=1):
    """A fullN / fullNxB case: SD1.5's UNet and VAE."""
    from diffusers import UNet2DConditionModel, AutoencoderKL

    mem = GpuMemory()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
        sample_size=64,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = AutoencoderKL(**SD_VAE)
    case = f"full{n}" if b == 1 else f"full{n}x{b}"
    return measure(unet, vae, 0.18215, case, n, b, (768, None), 7.5, mem)


def sdxl(n, b=1):
    """The sdxlN case: SDXL base's UNet and the VAE (scaling factor 0.13025), guidance 5 (diffusers' SDXL
    default), the size ids of an 8n x 8n image generated at its own size: (8n, 8n, 0, 0, 8n, 8n)."""
    from diffusers import UNet2DConditionModel, AutoencoderKL

    mem = GpuMemory()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SDXL_UNET)
    vae = AutoencoderKL(**SD_VAE, scaling_factor=0.13025)
    case = f"sdxl{n}" if b == 1 else f"sdxl{n}x{b}"
    return measure(unet, vae, 0.13025, case, n, b, (2048, 1280), 5.0, mem)


PIXART_512 = dict(
    num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28, sample_size=64,
    patch_size=2, caption_channels=4096, cross_attention_dim=1152, norm_type="ada_norm_single",
    norm_elementwise_affine=False, norm_eps=1e-6, attention_bias=True, num_embeds_ada_norm=1000,
)


def pixart(n, b=1):
    """The pixartN case: PixArt-alpha 512's transformer and the SD VAE, guidance 4.5 (its pipeline's default)."""
    from diffusers import PixArtTransformer2DModel, AutoencoderKL

    mem = GpuMemory()
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(**PIXART_512)
    vae = AutoencoderKL(**SD_VAE)
    case = f"pixart{n}" if b == 1 else f"pixart{n}x{b}"
    return measure(transformer, vae, 0.18215, case, n, b, (4096, None), 4.5, mem, tokens=120, masks=(20, 1))


def measure(unet, vae, scale, case, n, b, widths, g, mem, tokens=77, masks=None):
    """Times one guided no-grad UNet evaluation (a sampling step) and the gradient step on seeded random
    conditioning of width widths[0] (and, for SDXL, pooled embeddings of width widths[1] with the size ids) at
    n x n latents, batch b, guidance g; returns the case's JSON line."""
    from diffusers import DDIMScheduler

    gpu = DEV.type == "cuda"
    width, pooled = widths
    for m in (unet, vae):
        m.requires_grad_(False).eval().to(DEV)
        if DTYPE != torch.float32:
            m.to(DTYPE)
        if CHECKPOINTING:
            # diffusers' gradient checkpointing of the UNet's and the decoder's blocks, as
            # RENEG_BENCH_CHECKPOINTING=1 for the Rust bench.
            m.enable_gradient_checkpointing()
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(30)
    # Under autocast the inputs stay f32 (as reneg keeps everything between models in f32).
    act = torch.float32 if PRECISION in ("bf16", "fp16") else DTYPE
    cond = torch.randn(b, tokens, width).to(DEV, act)
    cond_pooled = torch.randn(b, pooled).to(DEV, act) if pooled else None
    neg = torch.randn(1, tokens, width).to(DEV, act)
    neg_pooled = torch.randn(1, pooled).to(DEV, act) if pooled else None
    x = torch.randn(b, 4, n, n).to(DEV, act)
    w = torch.randn(b, 3, 8 * n, 8 * n).to(DEV, act)
    # SDXL's size ids (original size, crop top-left, target size) of an 8n x 8n image, the same for both branches.
    time_ids = torch.tensor([[8 * n, 8 * n, 0, 0, 8 * n, 8 * n]], dtype=act, device=DEV)
    weights_gpu = mem.take()
    if gpu:
        torch.cuda.reset_peak_memory_stats(DEV)

    def mask_of(keep, rows):
        m = torch.zeros(rows, tokens, device=DEV)
        m[:, :keep] = 1
        return m

    def eps(latents, t, embeds, pooled_embeds, rows=None):
        """`rows`: per batch row, "neg" or "prompt" (PixArt's mask of that caption)."""
        if masks:
            # PixArt: each caption's mask, the timestep as a tensor, the noise half of the learned-sigma output.
            m = torch.stack([mask_of(masks[1] if r == "neg" else masks[0], 1)[0] for r in rows])
            ts = torch.full((len(latents),), t, device=DEV)
            out = unet(latents, encoder_hidden_states=embeds, timestep=ts, encoder_attention_mask=m,
                       added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
            return out.chunk(2, dim=1)[0]
        extra = {}
        if pooled:
            extra["added_cond_kwargs"] = {"text_embeds": pooled_embeds, "time_ids": time_ids.expand(len(latents), -1)}
        return unet(latents, t, encoder_hidden_states=embeds, **extra).sample

    def sample_eval():
        with torch.no_grad(), autocast():
            out = eps(torch.cat([x, x]), 501, torch.cat([neg.expand(b, -1, -1), cond]),
                      torch.cat([neg_pooled.expand(b, -1), cond_pooled]) if pooled else None,
                      ["neg"] * b + ["prompt"] * b)
            u, c = out.chunk(2)
            return u + g * (c - u)

    def grad_step():
        v = neg.clone().requires_grad_(True)
        vp = neg_pooled.clone().requires_grad_(True) if pooled else None
        with autocast():
            with torch.no_grad():
                c = eps(x, 201, cond, cond_pooled, ["prompt"] * b)
            u = eps(x, 201, v.expand(b, -1, -1), vp.expand(b, -1) if pooled else None, ["neg"] * b)
            x0 = sched.step(u.float() + g * (c.float() - u.float()), 201, x).pred_original_sample
            img = vae.decode(x0 / scale).sample.float()
            loss = -(w * img).sum() / b
        loss.backward()

    s = timed(reps(5 if gpu else 2), sample_eval)
    rss_sampling = peak_rss_mb()
    if os.environ.get("RENEG_BENCH_SAMPLING_ONLY"):
        # As benches/train_step.rs: the sampling evaluation alone, for interleaved A/B runs.
        mem._stop = True
        return {"impl": "pytorch", "case": case, "sample_eval_s": s, "peak_rss_mb": rss_sampling}
    gpu_sampling = mem.take()
    gs = timed(reps(3 if gpu else 1), grad_step)
    gpu_grad = mem.take()
    out = {"impl": "pytorch", "case": case, "batch": b,
           "sample_eval_s": s, "grad_step_s": gs, "train_step_s": 24.5 * s + gs,
           "peak_rss_sampling_mb": rss_sampling, "peak_rss_mb": peak_rss_mb(),
           "device": str(DEV), "dtype": str(DTYPE).removeprefix("torch."), "precision": PRECISION,
           "commit": os.environ.get("RENEG_COMMIT", ""), "checkpointing": CHECKPOINTING}
    out["peak_mem_mib"] = out["peak_rss_mb"]
    if gpu:
        out.update({"base_gpu_mb": mem.base / 2**20, "weights_gpu_mb": weights_gpu,
                    "peak_gpu_sampling_mb": gpu_sampling, "peak_gpu_grad_mb": gpu_grad,
                    "peak_gpu_mb": max(weights_gpu, gpu_sampling, gpu_grad),
                    "torch_max_allocated_mb": torch.cuda.max_memory_allocated(DEV) / 2**20,
                    "torch_max_reserved_mb": torch.cuda.max_memory_reserved(DEV) / 2**20,
                    "tf32": torch.backends.cudnn.allow_tf32, "gpu_name": torch.cuda.get_device_name(DEV)})
        out["peak_mem_mib"] = out["peak_gpu_mb"]
    mem._stop = True
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="PyTorch / diffusers side of benches/train_step.rs")
    ap.add_argument("case", nargs="?", default="tiny", help="tiny, fullN, fullNxB (N latents, B batch), sdxl32 or pixart32")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--batch", type=int, default=None, help="batch size of a full case (default 1)")
    ap.add_argument("--precision", default=None, choices=["f32", "tf32", "bf16", "fp16"])
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"], help="older spelling")
    ap.add_argument("--tf32", action="store_true", help="older spelling of --precision tf32")
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing of UNet and VAE")
    args = ap.parse_args()
    CHECKPOINTING = args.checkpointing
    DEV = torch.device(args.device)
    PRECISION = args.precision or ("tf32" if args.tf32 else {"f16": "fp16"}.get(args.dtype, args.dtype))
    DTYPE = {"f32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[PRECISION]
    torch.backends.cuda.matmul.allow_tf32 = PRECISION == "tf32"
    torch.backends.cudnn.allow_tf32 = PRECISION == "tf32"
    case = args.case
    if case == "tiny":
        if DEV.type != "cpu" or DTYPE != torch.float32:
            sys.exit("the tiny case runs on the CPU in f32 only")
        result = tiny()
    elif case.startswith("pixart"):
        n, _, b = case.removeprefix("pixart").partition("x")
        result = pixart(int(n), args.batch or int(b or 1))
    elif case.startswith("sdxl"):
        n, _, b = case.removeprefix("sdxl").partition("x")
        result = sdxl(int(n), args.batch or int(b or 1))
    else:
        n, _, b = case.removeprefix("full").partition("x")
        result = full(int(n), args.batch or int(b or 1))
    result["torch_threads"] = torch.get_num_threads()
    print(json.dumps(result))
