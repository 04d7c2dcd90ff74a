#!/usr/bin/env python3
"""Generate the text-to-video parity cases (PyTorch reference) that reneg's Rust code is checked against.

Format: ../shared/docs/parity-fixtures.md, "Text-to-video case" (on top of its "Pipeline case"); the choices that
document leaves open are written down in docs/parity-text2video.md. Never run in CI: it needs the pinned
reference venv described in tools/gen_parity.py (torch 2.15.0, diffusers 0.42.1, transformers 5.23.0,
safetensors 0.8.0, numpy), outside the repository.

Run (CPU only; about 1.5 minutes on 2 idle cores, longer on a busy machine):

    /work/pyref/bin/python tools/gen_text2video_parity.py [--bpe PATH] [--out tests/fixtures/parity] [--only NAME ...]

    --bpe   CLIP BPE merges in open_clip format (default ../shared/data/clip-tokenizer/bpe_simple_vocab_16e6.txt.gz
            relative to the repository root, or $RENEG_CLIP_BPE)
    --out   folder that receives the case folders (default <repo>/tests/fixtures/parity)
    --only  restrict to some of: text2video-ms-tiny text2video-zs-tiny

Reuses the generic helpers of tools/gen_parity.py beside it (imported by path, no bytecode written into the repo):
the HF tokenizer files built from the BPE file, the tiny text encoder / VAE builders, the f16 rounding and the
tokenizer folder layout fix-up. Everything video-specific (UNet3DConditionModel, the seeded O(1) init extended to
Conv3d, calibration on 5-D latents, sampling loop, per-frame decoding, gradient, checks) is here.

What it writes, per case (deterministic: fixed seeds, torch.use_deterministic_algorithms, 2 threads, f32 on CPU;
a rerun gives identical bytes):

    <out>/<case>/case.json       {"kind": "text2video", prompt, negative_prompt, guidance_scale, num_inference_steps,
                                  grad_step_index, height, width, num_frames}
    <out>/<case>/pipeline/       TextToVideoSDPipeline.save_pretrained(safe_serialization=True):
                                  model_index.json, scheduler/ (DDIMScheduler), text_encoder/ (CLIPTextModel),
                                  tokenizer/, unet/ (UNet3DConditionModel), vae/ (AutoencoderKL)
    <out>/<case>/expected.safetensors   (f32 unless noted; video layout [batch, channels, frames, height, width])
        prompt_input_ids, negative_input_ids   [1,77] i64
        prompt_embeds, negative_prompt_embeds  [1,77,D]
        init_latents, final_latents            [1,C,F,h,w]
        timesteps                              [N] i64
        video                                  [1,3,F,H,W]   TextToVideoSDPipeline.decode_latents(final_latents)
                                                             before its float cast: raw VAE decoder output per frame
        grad_latents_in, x0_pred               [1,C,F,h,w]
        reward_weight                          [1,3,F,H,W]
        loss                                   []            -(reward_weight * decode_latents(x0_pred)).sum()
        grad_negative_prompt_embeds            [1,77,D]
        extra (not in the shared format; for locating a mismatch):
        eps_negative, eps_prompt               [1,C,F,h,w]   the UNet3D outputs for the negative / prompt half of the
                                                             batch at step grad_step_index (input: grad_latents_in
                                                             after scheduler.scale_model_input, the identity for DDIM)
        transformer_in_probe_input             [F,C,h,w]     tanh(randn), own generator (case seed + 6), frames on
                                                             axis 0 (batch 1 x F frames, the UNet's internal layout)
        transformer_in_probe_conv_in           [F,c0,h,w]    unet.conv_in(probe input)
        transformer_in_probe_output            [F,c0,h,w]    unet.transformer_in(that, num_frames=F) (incl. residual)

The sampling loop is written out by hand with diffusers' own modules, as TextToVideoSDPipeline.__call__ does it:
latent_model_input = scale_model_input(cat([latents] * 2), t), embeddings cat([negative, prompt]),
eps = u + g (c - u) on [1,C,F,h,w]; then latents and eps are permuted/reshaped to [F,C,h,w] (frames as batch),
DDIMScheduler.step (eta 0), and the result reshaped back to [1,C,F,h,w].

Weights: every parameter gets gen_parity's seeded O(1) init, extended to Conv3d (fan_in = C_in x 3). This re-draws
the parameters diffusers zero-initialises (every TemporalConvLayer's conv4 Conv3d, which would make it the
identity). Then the UNet's and the VAE decoder's conv_out are rescaled (UNet output ~ unit std on random 5-D
latents, video O(1)).

Checks printed: the in-memory pipeline's own __call__ and the pipeline reloaded from disk (latents=init_latents,
output_type "pt", final latents read from the pipeline's step callback) reproduce final_latents and the
post-processed video exactly, and pipe.decode_latents(final_latents) reproduces video; the reloaded tokenizer gives
the same ids as the in-memory one on all of gen_parity's tokenizer prompts; the temporal layers matter
(final_latents with the temporal convolutions, the temporal transformers, transformer_in, or all three made
identities differ by a large fraction of max |final_latents|); the UNet mixes frames; the f32 forward against a
float64 forward; the f32 gradient against a float64 autograd gradient and float64 central finite differences.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.dont_write_bytecode = True  # do not drop __pycache__ into the repo's tools/
_GP_PATH = Path(os.environ.get("RENEG_GEN_PARITY", Path(__file__).resolve().parent / "gen_parity.py"))
_spec = importlib.util.spec_from_file_location("gen_parity", _GP_PATH)
gp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gp)

import numpy as np  # noqa: E402
import torch  # noqa: E402  (gen_parity already set threads=2 and deterministic algorithms)
from diffusers import DDIMScheduler, TextToVideoSDPipeline, UNet3DConditionModel  # noqa: E402
from diffusers.models.resnet import TemporalConvLayer  # noqa: E402
from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

REPO = gp.REPO
SD_SCHED = gp.SD_SCHED
# use_deterministic_algorithms(True) (set by gen_parity) also fills every torch.empty with NaN, ~15% of this
# script's time; every such buffer is overwritten, so the results (and the bytes written) are the same without it
torch.utils.deterministic.fill_uninitialized_memory = False

# --------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------
CASES = {
    # ModelScope-like (damo-vilab/text-to-video-ms-1.7b): its DDIM config (epsilon, "leading", steps_offset 1),
    # OpenCLIP-H-like text encoder converted to CLIPTextModel (gelu, not quick_gelu), vocab.json + merges.txt with
    # pad '!', the ModelScope block order (CrossAttn down / plain down, plain up / CrossAttn up), int
    # attention_head_dim 4 (= per-head width in UNet3D: 4 heads at 16 ch, 8 heads at 32 ch; transformer_in 8 x 4),
    # negative prompt "" (null text). 5 frames of 32 x 48 px -> latents 5 x 16 x 24.
    "text2video-ms-tiny": dict(
        seed=7100,
        text=dict(hidden=16, intermediate=40, layers=2, heads=2, act="gelu"),
        unet=dict(
            sample_size=16, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
            up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
            block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=4, norm_num_groups=4,
            cross_attention_dim=16,
        ),
        vae=dict(
            in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, scaling_factor=0.18215,
        ),
        sched=dict(SD_SCHED, prediction_type="epsilon", timestep_spacing="leading"),
        pad="!", tokenizer_layout="vocab", f16=False,
        case=dict(prompt="a panda playing an acoustic guitar on a beach at sunset, cinematic", negative_prompt="",
                  guidance_scale=9.0, num_inference_steps=4, grad_step_index=2, height=32, width=48, num_frames=5),
    ),
    # ZeroScope-like but deliberately different: epsilon kept (ZeroScope does not use v_prediction) with "trailing"
    # spacing; three levels (16, 24, 32) with two CrossAttn levels, layers_per_block 2 (3 resnets per up level),
    # attention_head_dim 8 (2 / 3 / 4 heads of 8; transformer_in 8 x 8 = 64 wide on 16 channels),
    # norm_num_groups 8, tokenizer.json with pad '!' and a prompt with '!!', weights stored in float16 (expected
    # tensors computed in f32 from the f16-rounded weights). 3 frames of 40 x 24 px (tall) -> latents 3 x 20 x 12.
    "text2video-zs-tiny": dict(
        seed=7200,
        text=dict(hidden=16, intermediate=24, layers=2, heads=4, act="gelu"),
        unet=dict(
            sample_size=16, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
            up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
            block_out_channels=(16, 24, 32), layers_per_block=2, attention_head_dim=8, norm_num_groups=8,
            cross_attention_dim=16,
        ),
        vae=dict(
            in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, scaling_factor=0.18215,
        ),
        sched=dict(SD_SCHED, prediction_type="epsilon", timestep_spacing="trailing"),
        pad="!", tokenizer_layout="json", f16=True,
        case=dict(prompt="a sailing boat on a stormy sea!! slow motion drone shot",
                  negative_prompt="blurry, low quality, watermark",
                  guidance_scale=5.0, num_inference_steps=3, grad_step_index=1, height=40, width=24, num_frames=3),
    ),
}


# --------------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def o1_init(model: torch.nn.Module, seed: int, w_gain: float = 0.7, qk_gain: float = 2.0, emb_std: float = 0.5) -> None:
    """gen_parity.o1_init with Conv3d treated as Conv2d (same draws, in the same module order; for a model without
    Conv3d it is gen_parity.o1_init exactly)."""
    g = torch.Generator().manual_seed(seed)

    def rn(t):
        return torch.randn(t.shape, generator=g, dtype=torch.float32)

    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)):
            fan_in = m.weight[0].numel()
            m.weight.copy_(rn(m.weight) * (w_gain / math.sqrt(fan_in)))
            if name.split(".")[-1] in ("to_q", "to_k", "q_proj", "k_proj", "query", "key"):
                m.weight.mul_(qk_gain)
            if m.bias is not None:
                m.bias.copy_(0.05 * rn(m.bias))
        elif isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            if m.weight is not None:
                m.weight.copy_(1.0 + 0.1 * rn(m.weight))
                m.bias.copy_(0.1 * rn(m.bias))
        elif isinstance(m, torch.nn.Embedding):
            m.weight.copy_(emb_std * rn(m.weight))


@torch.no_grad()
def build_unet3d(c: dict, seed: int) -> UNet3DConditionModel:
    torch.manual_seed(seed)
    unet = UNet3DConditionModel(**c).eval()
    # what the re-init must undo: diffusers zero-initialises every TemporalConvLayer's last Conv3d
    tcs = [m for m in unet.modules() if isinstance(m, TemporalConvLayer)]
    assert tcs and all(float(m.conv4[-1].weight.abs().max()) == 0.0 for m in tcs)
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    o1_init(unet, seed)
    for n, p in unet.named_parameters():
        assert not torch.equal(p, before[n]), f"not re-drawn: {n}"
        assert float(p.abs().max()) > 0.0 and (p.numel() == 1 or float(p.std()) > 0.0), n
    return unet


def frames_to_batch(x: torch.Tensor) -> torch.Tensor:
    """[B,C,F,h,w] -> [B*F,C,h,w], frame index fastest within a batch element (as the pipeline and UNet3D do)."""
    b, c, f, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def batch_to_frames(x: torch.Tensor, b: int, f: int) -> torch.Tensor:
    """[B*F,C,h,w] -> [B,C,F,h,w] (the inverse of frames_to_batch, written as the pipeline writes it)."""
    return x[None, :].reshape((b, f) + x.shape[1:]).permute(0, 2, 1, 3, 4)


def decode_video(vae, latents: torch.Tensor) -> torch.Tensor:
    """TextToVideoSDPipeline.decode_latents without its trailing float cast: every frame through vae.decode."""
    latents = 1 / vae.config.scaling_factor * latents
    b, c, f, h, w = latents.shape
    image = vae.decode(frames_to_batch(latents)).sample
    return image[None, :].reshape((b, f, -1) + image.shape[2:]).permute(0, 2, 1, 3, 4)


@torch.no_grad()
def calibrate(unet, vae, te, lat_shape, seed):
    """Rescale UNet conv_out so its output is ~unit std on random video latents, and the VAE decoder's conv_out so
    the decoded frames are O(1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(lat_shape, generator=g)
    ids = torch.randint(0, 49406, (1, gp.MAX_LEN), generator=g)
    emb = te(ids)[0]
    stds = [unet(x, torch.tensor(t), encoder_hidden_states=emb).sample.std().item() for t in (50, 500, 950)]
    s = float(np.mean(stds))
    unet.conv_out.weight.div_(s)
    unet.conv_out.bias.div_(s)
    vid = decode_video(vae, x)
    s2 = vid.std().item() / 0.5
    vae.decoder.conv_out.weight.div_(s2)
    vae.decoder.conv_out.bias.div_(s2)
    return s, s2


# --------------------------------------------------------------------------------------------------
# Reference computation (diffusers' own modules, the same calls as TextToVideoSDPipeline.__call__)
# --------------------------------------------------------------------------------------------------
def guided_eps(unet, sched, latents, t, neg, pos, g):
    """latents: [1,C,F,h,w]. As the pipeline: scale_model_input(cat([latents] * 2)). Returns (guided eps, u, c)."""
    inp = sched.scale_model_input(torch.cat([latents] * 2), t)
    noise = unet(inp, t, encoder_hidden_states=torch.cat([neg, pos]), return_dict=False)[0]
    u, c = noise.chunk(2)
    return u + g * (c - u), u, c


def ddim_step(sched, eps, t, latents):
    """The pipeline's step: [1,C,F,h,w] -> frames as batch -> scheduler.step -> back. Returns (prev, x0)."""
    b, c, f, h, w = latents.shape
    st = sched.step(frames_to_batch(eps), t, frames_to_batch(latents), eta=0.0)
    return batch_to_frames(st.prev_sample, b, f), batch_to_frames(st.pred_original_sample, b, f)


def grad_step_loss(unet, vae, sched, latents_in, t, neg, pos, g, reward):
    eps, _, _ = guided_eps(unet, sched, latents_in, t, neg, pos, g)
    _, x0 = ddim_step(sched, eps, t, latents_in)
    return -(reward * decode_video(vae, x0)).sum(), x0


def sample(unet, sched_config, init, neg, pos, case, record_step=None):
    sched = DDIMScheduler.from_config(sched_config)
    sched.set_timesteps(case["num_inference_steps"])
    assert float(sched.init_noise_sigma) == 1.0
    rec = {}
    latents = init * sched.init_noise_sigma
    for i, t in enumerate(sched.timesteps):
        eps, u, c = guided_eps(unet, sched, latents, t, neg, pos, case["guidance_scale"])
        prev, x0 = ddim_step(sched, eps, t, latents)
        if i == record_step:
            rec = dict(lat_in=latents.clone(), x0=x0.clone(), u=u.clone(), c=c.clone())
        latents = prev
    return latents, sched.timesteps.clone(), rec


def reference(pipe, case, seed):
    tok, te, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
    N, k = case["num_inference_steps"], case["grad_step_index"]
    H, W, F = case["height"], case["width"], case["num_frames"]
    vsf = pipe.vae_scale_factor
    C = unet.config.in_channels
    with torch.no_grad():
        pids = tok(case["prompt"], padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids
        nids = tok(case["negative_prompt"], padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids
        assert not getattr(te.config, "use_attention_mask", False)
        pos = te(pids, attention_mask=None)[0]
        neg = te(nids, attention_mask=None)[0]
        gen = torch.Generator().manual_seed(seed)
        init = torch.randn((1, C, F, H // vsf, W // vsf), generator=gen, dtype=torch.float32)
        reward = torch.randn((1, 3, F, H, W), generator=gen, dtype=torch.float32)
        final, timesteps, rec = sample(unet, pipe.scheduler.config, init, neg, pos, case, record_step=k)
        video = decode_video(vae, final)

    # gradient: only the guided step at grad_step_index carries the graph
    neg_p = neg.detach().clone().requires_grad_(True)
    sched_g = DDIMScheduler.from_config(pipe.scheduler.config)
    sched_g.set_timesteps(N)
    loss, x0 = grad_step_loss(unet, vae, sched_g, rec["lat_in"].detach(), timesteps[k], neg_p, pos.detach(),
                              case["guidance_scale"], reward)
    loss.backward()
    grad = neg_p.grad.detach().clone()
    assert torch.equal(x0.detach(), rec["x0"]), (x0.detach() - rec["x0"]).abs().max()

    out = dict(
        prompt_input_ids=pids.to(torch.int64), negative_input_ids=nids.to(torch.int64),
        prompt_embeds=pos, negative_prompt_embeds=neg, init_latents=init,
        timesteps=timesteps.to(torch.int64), final_latents=final, video=video,
        grad_latents_in=rec["lat_in"], x0_pred=x0.detach(), reward_weight=reward,
        loss=loss.detach().reshape([]), grad_negative_prompt_embeds=grad,
        eps_negative=rec["u"], eps_prompt=rec["c"],
    )
    return {k_: v.detach().contiguous() for k_, v in out.items()}


@torch.no_grad()
def transformer_in_probe(unet, num_frames, lat_h, lat_w, seed):
    """Extra tensors: conv_in then transformer_in alone, on a fixed input in (-1, 1) drawn from its own generator."""
    gen = torch.Generator().manual_seed(seed)
    F = num_frames
    x = torch.tanh(torch.randn((F, unet.config.in_channels, lat_h, lat_w), generator=gen, dtype=torch.float32))
    h = unet.conv_in(x)
    y = unet.transformer_in(h, num_frames=F, return_dict=False)[0]
    return dict(transformer_in_probe_input=x.contiguous(), transformer_in_probe_conv_in=h.contiguous(),
                transformer_in_probe_output=y.contiguous())


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def temporal_ablation(pipe, case, exp):
    """final_latents with the temporal layers made identities (each kind alone, then all together)."""
    def ablated(kinds):
        unet = copy.deepcopy(pipe.unet)
        n = 0
        for name, m in unet.named_modules():
            if "temp_convs" in kinds and isinstance(m, TemporalConvLayer):
                m.conv4[-1].weight.zero_()
                m.conv4[-1].bias.zero_()  # output = identity + 0
                n += 1
            if isinstance(m, TransformerTemporalModel) and (
                    ("transformer_in" in kinds and name == "transformer_in")
                    or ("temp_attentions" in kinds and name != "transformer_in")):
                m.proj_out.weight.zero_()
                m.proj_out.bias.zero_()  # output = 0 + residual
                n += 1
        lat, _, _ = sample(unet, pipe.scheduler.config, exp["init_latents"], exp["negative_prompt_embeds"],
                           exp["prompt_embeds"], case)
        return rel(lat, exp["final_latents"]), n

    res = {}
    for kinds in (("temp_convs",), ("temp_attentions",), ("transformer_in",),
                  ("temp_convs", "temp_attentions", "transformer_in")):
        d, n = ablated(kinds)
        res["+".join(kinds)] = d
        print(f"   final_latents with {'+'.join(kinds)} made identities ({n} modules): max|diff| / max|final| = {d:.3f}")
    assert min(res.values()) > 0.01 and res["temp_convs+temp_attentions+transformer_in"] > 0.1, res
    return res


@torch.no_grad()
def frame_mixing(pipe, case, exp):
    """The UNet mixes frames: changing frame 0 of its input changes its output on the last frame."""
    unet = pipe.unet
    t = exp["timesteps"][case["grad_step_index"]]
    x = exp["grad_latents_in"].clone()
    emb = exp["prompt_embeds"]
    a = unet(x, t, encoder_hidden_states=emb).sample
    x[:, :, 0] += 1.0
    b = unet(x, t, encoder_hidden_states=emb).sample
    d = ((a - b)[:, :, -1].abs().max() / a[:, :, -1].abs().max()).item()
    print(f"   frame mixing: +1 on input frame 0 changes output frame {case['num_frames'] - 1} by {d:.3f} (rel.)")
    assert d > 1e-3, d


@torch.no_grad()
def check_forward_f64(pipe, case, exp):
    """Conditioning check: the same forward pass in float64 (differences = f32 rounding sensitivity)."""
    te = copy.deepcopy(pipe.text_encoder).double()
    unet = copy.deepcopy(pipe.unet).double()
    vae = copy.deepcopy(pipe.vae).double()
    pos = te(exp["prompt_input_ids"])[0]
    neg = te(exp["negative_input_ids"])[0]
    lat, _, rec = sample(unet, pipe.scheduler.config, exp["init_latents"].double(), neg, pos, case,
                         record_step=case["grad_step_index"])
    video = decode_video(vae, lat)
    probe = unet.transformer_in(unet.conv_in(exp["transformer_in_probe_input"].double()),
                                num_frames=case["num_frames"], return_dict=False)[0]
    r = dict(prompt_embeds=rel(exp["prompt_embeds"], pos), negative_prompt_embeds=rel(exp["negative_prompt_embeds"], neg),
             final_latents=rel(exp["final_latents"], lat), video=rel(exp["video"], video),
             eps_negative=rel(exp["eps_negative"], rec["u"]), eps_prompt=rel(exp["eps_prompt"], rec["c"]),
             transformer_in_probe_output=rel(exp["transformer_in_probe_output"], probe))
    print("   f32 vs f64 forward rel err: " + ", ".join(f"{k} {v:.1e}" for k, v in r.items()))
    assert max(r.values()) < 1e-5, r


def check_gradient_f64(pipe, case, exp):
    unet = copy.deepcopy(pipe.unet).double()
    vae = copy.deepcopy(pipe.vae).double()
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(case["num_inference_steps"])
    t = exp["timesteps"][case["grad_step_index"]]
    lat = exp["grad_latents_in"].double()
    pos = exp["prompt_embeds"].double()
    rw = exp["reward_weight"].double()

    def f(neg):
        return grad_step_loss(unet, vae, sched, lat, t, neg, pos, case["guidance_scale"], rw)[0]

    neg = exp["negative_prompt_embeds"].double().clone().requires_grad_(True)
    loss64 = f(neg)
    loss64.backward()
    g64 = neg.grad.detach()
    g32 = exp["grad_negative_prompt_embeds"].double()
    rel_ag = ((g32 - g64).abs().max() / g64.abs().max()).item()
    rel_loss = abs(loss64.item() - exp["loss"].item()) / max(abs(loss64.item()), 1e-30)
    flat = g64.abs().flatten()
    D = g64.shape[-1]
    idx = [int(flat.argmax()), int(torch.argsort(flat)[len(flat) // 2]), 5 * D + D // 2, flat.numel() - 1]
    h = 1e-5
    worst = 0.0
    lines = []
    with torch.no_grad():
        base = exp["negative_prompt_embeds"].double().clone()
        for i in idx:
            e = torch.zeros_like(base).flatten()
            e[i] = h
            e = e.view_as(base)
            fd = (f(base + e) - f(base - e)).item() / (2 * h)
            ag = g64.flatten()[i].item()
            worst = max(worst, abs(fd - ag) / g64.abs().max().item())
            lines.append(f"      entry {i:6d}: fd64 {fd:+.8e} autograd64 {ag:+.8e} f32 {g32.flatten()[i].item():+.8e}")
    print(f"   grad: max|g| {g32.abs().max().item():.4e}, rms {g32.pow(2).mean().sqrt().item():.4e}, loss "
          f"{exp['loss'].item():+.6e}")
    print(f"   grad check: |g32-g64|max/|g64|max = {rel_ag:.2e}; loss f32 vs f64 rel {rel_loss:.2e}; "
          f"finite-difference worst (rel. to max|g|) {worst:.2e}")
    print("\n".join(lines))
    assert rel_ag < 1e-3 and worst < 1e-5, (rel_ag, worst)


def check_pipeline_call(pipe, case, exp, what):
    """diffusers' own TextToVideoSDPipeline.__call__ from the same inputs vs the hand-written loop: one call with
    output_type "pt" (decode_latents, then VideoProcessor.postprocess_video -> [B,F,3,H,W] = (x / 2 + 0.5) clamped
    to [0, 1]); its final latents are taken from its own step callback after the last step."""
    seen = {}

    def cb(i, t, latents):
        seen[i] = latents.clone()

    with torch.no_grad():
        pt = pipe(prompt=case["prompt"], negative_prompt=case["negative_prompt"], num_frames=case["num_frames"],
                  height=case["height"], width=case["width"], num_inference_steps=case["num_inference_steps"],
                  guidance_scale=case["guidance_scale"], eta=0.0, latents=exp["init_latents"].clone(),
                  output_type="pt", callback=cb, callback_steps=1).frames
        dl = pipe.decode_latents(exp["final_latents"])
    lat = seen[case["num_inference_steps"] - 1]
    r_lat = rel(lat, exp["final_latents"])
    want = (exp["video"].permute(0, 2, 1, 3, 4) / 2 + 0.5).clamp(0, 1)
    assert pt.shape == want.shape, (pt.shape, want.shape)
    r_pt = rel(pt, want)
    r_dl = rel(dl, exp["video"])
    print(f"   {what} TextToVideoSDPipeline.__call__ vs hand loop: final_latents max|diff| "
          f"{(lat - exp['final_latents']).abs().max().item():.3e} (rel {r_lat:.2e}); output_type='pt' frames vs "
          f"postprocessed video rel {r_pt:.2e}; decode_latents(final_latents) vs video rel {r_dl:.2e}")
    assert r_lat < 1e-5 and r_pt < 1e-5 and r_dl < 1e-5, (r_lat, r_pt, r_dl)


# --------------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------------
def gen_case(name: str, spec: dict, vocab_dir: Path, out: Path) -> dict:
    print(f"== {name}")
    seed = spec["seed"]
    case = spec["case"]
    H, W, F = case["height"], case["width"], case["num_frames"]
    te = gp.build_text_encoder(spec["text"], seed + 1)
    unet = build_unet3d(spec["unet"], seed + 2)
    vae = gp.build_vae(spec["vae"], seed + 3)
    vsf = 2 ** (len(spec["vae"]["block_out_channels"]) - 1)
    assert H % 8 == 0 and W % 8 == 0, "TextToVideoSDPipeline.check_inputs wants multiples of 8"
    up = 2 ** (len(spec["unet"]["block_out_channels"]) - 1)
    assert (H // vsf) % up == 0 and (W // vsf) % up == 0, "keep the UNet's up-sampling sizes implicit"
    lat_shape = (1, 4, F, H // vsf, W // vsf)
    s_unet, s_vae = calibrate(unet, vae, te, lat_shape, seed + 4)
    print(f"   calibration: unet conv_out /{s_unet:.3f}, vae decoder conv_out /{s_vae:.3f}")
    if spec["f16"]:
        gp.round_to_f16(te, unet, vae)

    sched = DDIMScheduler(**spec["sched"])
    tok = gp.load_tokenizer(vocab_dir, spec["pad"])
    pipe = TextToVideoSDPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    assert dict(pipe.scheduler.config) == dict(DDIMScheduler(**spec["sched"]).config)
    assert pipe.vae_scale_factor == vsf

    exp = reference(pipe, case, seed + 5)
    exp.update(transformer_in_probe(unet, F, H // vsf, W // vsf, seed + 6))
    print(f"   std: final_latents {exp['final_latents'].std():.4f}, video {exp['video'].std():.4f}, eps_negative "
          f"{exp['eps_negative'].std():.4f}, eps_prompt {exp['eps_prompt'].std():.4f}, |eps_prompt - eps_negative| "
          f"max {(exp['eps_prompt'] - exp['eps_negative']).abs().max():.4f}")
    ablation = temporal_ablation(pipe, case, exp)
    frame_mixing(pipe, case, exp)
    check_forward_f64(pipe, case, exp)
    check_gradient_f64(pipe, case, exp)
    check_pipeline_call(pipe, case, exp, "in memory:")

    cdir = out / name
    if cdir.exists():
        shutil.rmtree(cdir)
    cdir.mkdir(parents=True)
    with open(cdir / "case.json", "w") as f:
        json.dump({"kind": "text2video", **case}, f, indent=2, ensure_ascii=True)
        f.write("\n")
    save_file(exp, str(cdir / "expected.safetensors"))
    pdir = cdir / "pipeline"
    if spec["f16"]:
        pipe.to(torch.float16)
    pipe.save_pretrained(str(pdir), safe_serialization=True)
    gp.fix_tokenizer_layout(pdir / "tokenizer", vocab_dir, spec)

    # ---- reload from disk and run diffusers' own __call__
    re_pipe = TextToVideoSDPipeline.from_pretrained(str(pdir), dtype=torch.float32)
    re_pipe.set_progress_bar_config(disable=True)
    assert type(re_pipe.scheduler).__name__ == "DDIMScheduler"
    assert type(re_pipe.unet).__name__ == "UNet3DConditionModel"
    rtok = re_pipe.tokenizer
    for text in gp.tokenizer_prompts():
        assert gp.ids77(rtok, text) == gp.ids77(pipe.tokenizer, text), ascii(text)
    for key, text in (("prompt_input_ids", case["prompt"]), ("negative_input_ids", case["negative_prompt"])):
        got = rtok(text, padding="max_length", max_length=rtok.model_max_length, truncation=True).input_ids
        assert got == exp[key][0].tolist(), (key, got)
    print(f"   reloaded tokenizer {type(rtok).__name__} pad {rtok.pad_token!r}={rtok.pad_token_id}: same ids on all "
          f"tokenizer prompts; prompt ids {exp['prompt_input_ids'][0, :16].tolist()}...")
    for m in ("unet", "text_encoder", "vae"):
        for (n1, p1), (n2, p2) in zip(getattr(pipe, m).named_parameters(), getattr(re_pipe, m).named_parameters()):
            assert n1 == n2 and torch.equal(p1.float(), p2), (m, n1)
    check_pipeline_call(re_pipe, case, exp, "reloaded:")
    with open(pdir / "unet" / "config.json") as f:
        ucfg = json.load(f)
    print(f"   unet/config.json: {json.dumps(ucfg, sort_keys=True)}")
    return {"name": name, "exp": exp, "size": gp.dir_size(cdir), "ablation": ablation, "files": {
        str(p.relative_to(cdir)): p.stat().st_size for p in sorted(cdir.rglob("*")) if p.is_file()}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bpe", default=os.environ.get(
        "RENEG_CLIP_BPE", str(REPO.parent / "shared/data/clip-tokenizer/bpe_simple_vocab_16e6.txt.gz")))
    ap.add_argument("--out", default=str(REPO / "tests/fixtures/parity"))
    ap.add_argument("--only", nargs="*", default=None)
    a = ap.parse_args()
    import diffusers
    import safetensors
    import transformers
    print(f"torch {torch.__version__}  diffusers {diffusers.__version__}  transformers {transformers.__version__}  "
          f"safetensors {safetensors.__version__}  numpy {np.__version__}")
    want = set(a.only) if a.only else set(CASES)
    unknown = want - set(CASES)
    if unknown:
        ap.error(f"unknown case(s) {sorted(unknown)}; known: {sorted(CASES)}")
    out = Path(a.out)
    with tempfile.TemporaryDirectory() as td:
        vocab_dir = Path(td)
        gp.write_vocab_files(Path(a.bpe), vocab_dir)
        results = [gen_case(n, s, vocab_dir, out) for n, s in CASES.items() if n in want]
    gp.summary(results)


if __name__ == "__main__":
    sys.exit(main())
