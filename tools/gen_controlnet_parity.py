#!/usr/bin/env python3
"""Generate the ControlNet parity cases (PyTorch reference) that reneg's Rust code is checked against.

Format: ../shared/docs/parity-fixtures.md, "ControlNet case" (on top of its "Pipeline case"); the choices that
document leaves open are written down in docs/parity-controlnet.md. Never run in CI: it needs the pinned
reference venv described in tools/gen_parity.py (torch 2.15.0, diffusers 0.42.1, transformers 5.23.0,
safetensors 0.8.0, numpy, Pillow), outside the repository.

Run (CPU only, about a minute on 2 cores):

    /work/pyref/bin/python tools/gen_controlnet_parity.py [--bpe PATH] [--out tests/fixtures/parity] [--only NAME ...]

    --bpe   CLIP BPE merges in open_clip format (default ../shared/data/clip-tokenizer/bpe_simple_vocab_16e6.txt.gz
            relative to the repository root, or $RENEG_CLIP_BPE)
    --out   folder that receives the case folders (default <repo>/tests/fixtures/parity)
    --only  restrict to some of: controlnet-sd15-tiny controlnet-sd2-tiny

Reuses the generic helpers of tools/gen_parity.py beside it (imported by path, no bytecode written into the repo):
the HF tokenizer files built from the BPE file, the seeded "O(1)" weight init, the tiny text encoder / UNet / VAE
builders, the UNet/VAE output calibration, the f16 rounding and the tokenizer folder layout fix-up. Everything
ControlNet-specific (model, control image, sampling loop, gradient, checks) is here.

What it writes, per case (deterministic: fixed seeds, torch.use_deterministic_algorithms, 2 threads, f32 on CPU;
a rerun gives identical bytes):

    <out>/<case>/case.json       {"kind": "controlnet", prompt, negative_prompt, guidance_scale, num_inference_steps,
                                  grad_step_index, height, width, controlnet_conditioning_scale, guess_mode: false}
    <out>/<case>/control.png     the conditioning image, 8-bit RGB, exactly height x width (a few flat-coloured shapes
                                  and lines on a dark background, colours and positions seeded)
    <out>/<case>/pipeline/       StableDiffusionControlNetPipeline.save_pretrained(safe_serialization=True):
                                  model_index.json, scheduler/, text_encoder/, tokenizer/, unet/, vae/, controlnet/
    <out>/<case>/expected.safetensors
        every tensor of the pipeline case, computed WITH the ControlNet in the loop, plus
        control_image             [1,3,H,W]   control.png / 255 (what the pipeline's control_image_processor gives)
        controlnet_mid_residual   [2,C,h',w'] ControlNet's mid residual x conditioning_scale at step grad_step_index,
                                              batch [negative, prompt]
        extra (not in the shared format; for locating a mismatch):
        controlnet_down_residual_<i>  [2,C_i,h_i,w_i]  the i-th down residual x conditioning_scale at that same step
                                              (i = 0 .. len(controlnet_down_blocks) - 1, in the UNet's skip order)

The sampling loop is written out by hand with diffusers' own modules, as StableDiffusionControlNetPipeline.__call__
does it with guess_mode off: latent_model_input = cat([latents] * 2), embeddings cat([negative, prompt]),
controlnet(latent_model_input, t, encoder_hidden_states=embeddings, controlnet_cond=cat([control_image] * 2),
conditioning_scale=scale, guess_mode=False) -> (down residuals, mid residual), unet(..., down_block_additional_residuals,
mid_block_additional_residual), eps = u + g (c - u), DDIM step with eta 0.

Weights: every module gets gen_parity's seeded O(1) init. The ControlNet is ControlNetModel.from_unet(unet,
load_weights_from_unet=False) (so its UNet-side config is the UNet's), then ALL its parameters are re-drawn with
its own seed -- including the zero convolutions (controlnet_down_blocks, controlnet_mid_block,
controlnet_cond_embedding.conv_out), which diffusers initialises to 0 and which would make every residual 0 --
and finally its residual convolutions are rescaled so each residual (at scale 1) is about half the size of the
UNet activation it is added to, on random inputs.

Checks printed: the in-memory pipeline's own __call__ and the pipeline reloaded from disk (from_pretrained, image
given as control.png) reproduce final_latents; final_latents with vs without the ControlNet (so the ControlNet
visibly matters); the f32 forward against a float64 forward; the f32 gradient against a float64 autograd gradient
and float64 central finite differences on a few entries.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
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
from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

REPO = gp.REPO
EOT = gp.EOT
SD_SCHED = gp.SD_SCHED

# --------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------
CASES = {
    # SD1.x-like (as sd15-tiny): epsilon, "leading" spacing, steps_offset 1, int attention_head_dim, conv
    # proj_in/out, quick_gelu text encoder, vocab.json + merges.txt with pad <|endoftext|>, f32 weights.
    # Smaller than sd15-tiny (text width 8, channels (16, 32)) to keep the folder small (the text encoder's
    # 49408-row token embedding and the tokenizer files are most of it). One resnet per level:
    # 4 down residuals (conv_in, level 0 resnet, level 0 downsampler, level 1 resnet) + the mid residual.
    "controlnet-sd15-tiny": dict(
        seed=5100,
        text=dict(hidden=8, intermediate=19, layers=2, heads=2, act="quick_gelu"),
        unet=dict(
            sample_size=16, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=4, norm_num_groups=8,
            cross_attention_dim=8, use_linear_projection=False,
        ),
        vae=dict(
            in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, scaling_factor=0.18215,
        ),
        # 2 entries = 1 stride-2 conv = the 2-level VAE's downsampling (x2)
        cond_channels=(8, 16),
        sched=dict(SD_SCHED, prediction_type="epsilon", timestep_spacing="leading"),
        pad=EOT, tokenizer_layout="vocab", f16=False,
        case=dict(prompt="a small house with a red door, line drawing", negative_prompt="", guidance_scale=7.5,
                  num_inference_steps=4, grad_step_index=2, height=32, width=48,
                  controlnet_conditioning_scale=0.7, guess_mode=False),
    ),
    # SD2-like (as sd2-tiny): v_prediction, "trailing" spacing, per-level attention_head_dim list, linear
    # proj_in/out, upcast_attention, gelu text encoder, tokenizer.json with pad '!' (the prompt has '!!'),
    # weights stored in float16 (expected tensors computed in f32 from the f16-rounded weights). Two resnets per
    # level: 6 down residuals (conv_in, 2 resnets + downsampler at level 0, 2 resnets at level 1) + mid.
    # Tall non-square 40 x 24 px -> 20 x 12 latents -> 10 x 6 at level 1.
    "controlnet-sd2-tiny": dict(
        seed=5200,
        text=dict(hidden=16, intermediate=40, layers=2, heads=4, act="gelu"),
        unet=dict(
            sample_size=16, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(16, 32), layers_per_block=2, attention_head_dim=[2, 4], norm_num_groups=8,
            cross_attention_dim=16, use_linear_projection=True, upcast_attention=True,
        ),
        vae=dict(
            in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, scaling_factor=0.18215,
        ),
        cond_channels=(8, 16),
        sched=dict(SD_SCHED, prediction_type="v_prediction", timestep_spacing="trailing"),
        pad="!", tokenizer_layout="json", f16=True,
        case=dict(prompt="a cat sitting on a wooden chair!! watercolor", negative_prompt="blurry, low quality",
                  guidance_scale=5.0, num_inference_steps=4, grad_step_index=1, height=40, width=24,
                  controlnet_conditioning_scale=1.3, guess_mode=False),
    ),
}


# --------------------------------------------------------------------------------------------------
# Control image
# --------------------------------------------------------------------------------------------------
def make_control_png(path: Path, height: int, width: int, seed: int) -> None:
    """A few flat shapes and lines (seeded colours and positions) on a dark background, uint8 RGB."""
    rng = np.random.default_rng(seed)
    img = np.zeros((height, width, 3), dtype=np.uint8)
    img[:] = rng.integers(0, 40, size=3, dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    # filled rectangle
    y0, x0 = int(rng.integers(0, height // 3)), int(rng.integers(0, width // 3))
    y1, x1 = y0 + int(rng.integers(height // 4, height // 2)), x0 + int(rng.integers(width // 4, width // 2))
    img[y0:y1, x0:x1] = rng.integers(60, 256, size=3, dtype=np.uint8)
    # filled disc
    cy, cx = int(rng.integers(height // 3, height)), int(rng.integers(width // 3, width))
    r = min(height, width) / 4.0
    img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = rng.integers(60, 256, size=3, dtype=np.uint8)
    # a white diagonal line (about 2 px wide) and a one-pixel horizontal line of a seeded colour
    img[np.abs((yy * width) / height - xx) < 1.0] = 255
    img[height // 2, :] = rng.integers(100, 256, size=3, dtype=np.uint8)
    # a few seeded 2x2 random-colour blocks (high-frequency content)
    for _ in range(6):
        by, bx = int(rng.integers(0, height - 2)), int(rng.integers(0, width - 2))
        img[by:by + 2, bx:bx + 2] = rng.integers(0, 256, size=3, dtype=np.uint8)
    Image.fromarray(img, mode="RGB").save(path, format="PNG", optimize=False, compress_level=9)


def load_control_image(path: Path) -> torch.Tensor:
    """control.png -> [1,3,H,W] f32 in [0, 1], RGB (what VaeImageProcessor(do_normalize=False) gives)."""
    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


# --------------------------------------------------------------------------------------------------
# ControlNet model
# --------------------------------------------------------------------------------------------------
def residual_convs(cn: ControlNetModel):
    return list(cn.controlnet_down_blocks) + [cn.controlnet_mid_block]


@torch.no_grad()
def build_controlnet(unet, cond_channels, seed: int) -> ControlNetModel:
    torch.manual_seed(seed)
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(cond_channels),
                                   load_weights_from_unet=False).eval()
    # the zero convolutions really are zero before the re-init
    assert all(float(p.abs().max()) == 0.0 for m in residual_convs(cn) for p in m.parameters())
    assert float(cn.controlnet_cond_embedding.conv_out.weight.abs().max()) == 0.0
    gp.o1_init(cn, seed)
    for n, p in cn.named_parameters():
        assert float(p.abs().max()) > 0.0 and (p.numel() == 1 or float(p.std()) > 0.0), n
    return cn


def unet_skips(unet, x, t, emb):
    """The UNet's own down-block skip features and mid-block output (what the residuals are added to)."""
    rec = {}
    hooks = []
    for i, blk in enumerate(unet.down_blocks):
        hooks.append(blk.register_forward_hook(lambda m, a, o, i=i: rec.__setitem__(("down", i), o[1])))
    hooks.append(unet.mid_block.register_forward_hook(lambda m, a, o: rec.__setitem__("mid", o)))
    hooks.append(unet.conv_in.register_forward_hook(lambda m, a, o: rec.__setitem__("conv_in", o)))
    try:
        unet(x, t, encoder_hidden_states=emb)
    finally:
        for h in hooks:
            h.remove()
    skips = [rec["conv_in"]]
    for i in range(len(unet.down_blocks)):
        skips += list(rec[("down", i)])
    return skips, rec["mid"]


@torch.no_grad()
def calibrate_controlnet(cn, unet, te, lat_shape, control, seed, ratio=0.5):
    """Rescale each residual conv so its residual (scale 1) has ~ratio x the std of the UNet feature it is added to."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(lat_shape, generator=g)
    ids = torch.randint(0, 49406, (1, gp.MAX_LEN), generator=g)
    emb = te(ids)[0]
    ts = (50, 500, 950)
    res_std = None
    skip_std = None
    for t in ts:
        t = torch.tensor(t)
        down, mid = cn(x, t, encoder_hidden_states=emb, controlnet_cond=control, conditioning_scale=1.0,
                       guess_mode=False, return_dict=False)
        skips, umid = unet_skips(unet, x, t, emb)
        assert len(skips) == len(down) and all(a.shape == b.shape for a, b in zip(skips, down))
        r = np.array([d.std().item() for d in list(down) + [mid]]) / len(ts)
        s = np.array([d.std().item() for d in skips + [umid]]) / len(ts)
        res_std = r if res_std is None else res_std + r
        skip_std = s if skip_std is None else skip_std + s
    factors = ratio * skip_std / res_std
    for conv, f in zip(residual_convs(cn), factors):
        conv.weight.mul_(float(f))
        conv.bias.mul_(float(f))
    return factors


# --------------------------------------------------------------------------------------------------
# Reference computation (the same calls as StableDiffusionControlNetPipeline.__call__, guess mode off)
# --------------------------------------------------------------------------------------------------
def guided_eps_cn(unet, cn, latents, t, neg, pos, g, control, scale):
    """One classifier-free-guided prediction with ControlNet residuals; cn None = plain UNet (the comparison run).
    Returns (eps, down residuals, mid residual)."""
    inp = torch.cat([latents] * 2)
    emb = torch.cat([neg, pos])
    down = mid = None
    if cn is not None:
        down, mid = cn(inp, t, encoder_hidden_states=emb, controlnet_cond=torch.cat([control] * 2),
                       conditioning_scale=scale, guess_mode=False, return_dict=False)
    noise = unet(inp, t, encoder_hidden_states=emb, down_block_additional_residuals=down,
                 mid_block_additional_residual=mid, return_dict=False)[0]
    u, c = noise.chunk(2)
    return u + g * (c - u), down, mid


def grad_step_loss_cn(unet, cn, vae, sched, latents_in, t, neg, pos, g, control, scale, reward, sf):
    eps, _, _ = guided_eps_cn(unet, cn, latents_in, t, neg, pos, g, control, scale)
    x0 = sched.step(eps, t, latents_in, eta=0.0).pred_original_sample
    dec = vae.decode(x0 / sf).sample
    return -(reward * dec).sum(), x0


def sample(unet, cn, sched_config, init, neg, pos, case, control, record_step=None):
    sched = DDIMScheduler.from_config(sched_config)
    sched.set_timesteps(case["num_inference_steps"])
    assert float(sched.init_noise_sigma) == 1.0
    rec = {}
    latents = init.clone()
    for i, t in enumerate(sched.timesteps):
        eps, down, mid = guided_eps_cn(unet, cn, sched.scale_model_input(latents, t), t, neg, pos,
                                       case["guidance_scale"], control, case["controlnet_conditioning_scale"])
        st = sched.step(eps, t, latents, eta=0.0)
        if i == record_step:
            rec = dict(lat_in=latents.clone(), x0=st.pred_original_sample.clone(), down=[d.clone() for d in down],
                       mid=mid.clone())
        latents = st.prev_sample
    return latents, sched.timesteps.clone(), rec


def reference(pipe, case, control, seed):
    tok, te, unet, cn, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.controlnet, pipe.vae
    sf = vae.config.scaling_factor
    N, k = case["num_inference_steps"], case["grad_step_index"]
    H, W = case["height"], case["width"]
    vsf = 2 ** (len(vae.config.block_out_channels) - 1)
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
        init = torch.randn((1, C, H // vsf, W // vsf), generator=gen, dtype=torch.float32)
        reward = torch.randn((1, 3, H, W), generator=gen, dtype=torch.float32)
        final, timesteps, rec = sample(unet, cn, pipe.scheduler.config, init, neg, pos, case, control, record_step=k)
        image = vae.decode(final / sf).sample
        final_plain, _, _ = sample(unet, None, pipe.scheduler.config, init, neg, pos, case, control)

    # gradient: only the guided step at grad_step_index carries the graph (through ControlNet and UNet)
    neg_p = neg.detach().clone().requires_grad_(True)
    sched_g = DDIMScheduler.from_config(pipe.scheduler.config)
    sched_g.set_timesteps(N)
    loss, x0 = grad_step_loss_cn(unet, cn, vae, sched_g, rec["lat_in"].detach(), timesteps[k], neg_p, pos.detach(),
                                 case["guidance_scale"], control, case["controlnet_conditioning_scale"], reward, sf)
    loss.backward()
    grad = neg_p.grad.detach().clone()
    assert torch.equal(x0.detach(), rec["x0"]), (x0.detach() - rec["x0"]).abs().max()

    out = dict(
        prompt_input_ids=pids.to(torch.int64), negative_input_ids=nids.to(torch.int64),
        prompt_embeds=pos, negative_prompt_embeds=neg, init_latents=init,
        timesteps=timesteps.to(torch.int64), final_latents=final, image=image,
        grad_latents_in=rec["lat_in"], x0_pred=x0.detach(), reward_weight=reward,
        loss=loss.detach().reshape([]), grad_negative_prompt_embeds=grad,
        control_image=control, controlnet_mid_residual=rec["mid"],
    )
    for i, d in enumerate(rec["down"]):
        out[f"controlnet_down_residual_{i}"] = d
    out = {k_: v.detach().contiguous() for k_, v in out.items()}
    return out, final_plain


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@torch.no_grad()
def check_forward_f64(pipe, case, exp):
    """Conditioning check: the same forward pass in float64 (differences = f32 rounding sensitivity)."""
    te = copy.deepcopy(pipe.text_encoder).double()
    unet = copy.deepcopy(pipe.unet).double()
    cn = copy.deepcopy(pipe.controlnet).double()
    vae = copy.deepcopy(pipe.vae).double()
    pos = te(exp["prompt_input_ids"])[0]
    neg = te(exp["negative_input_ids"])[0]
    lat, _, rec = sample(unet, cn, pipe.scheduler.config, exp["init_latents"].double(), neg, pos, case,
                         exp["control_image"].double(), record_step=case["grad_step_index"])
    image = vae.decode(lat / vae.config.scaling_factor).sample
    r = dict(prompt_embeds=rel(exp["prompt_embeds"], pos), negative_prompt_embeds=rel(exp["negative_prompt_embeds"], neg),
             final_latents=rel(exp["final_latents"], lat), image=rel(exp["image"], image),
             controlnet_mid_residual=rel(exp["controlnet_mid_residual"], rec["mid"]),
             down_residuals=max(rel(exp[f"controlnet_down_residual_{i}"], d) for i, d in enumerate(rec["down"])))
    print("   f32 vs f64 forward rel err: " + ", ".join(f"{k} {v:.1e}" for k, v in r.items()))
    assert max(r.values()) < 1e-5, r


def check_gradient_f64(pipe, case, exp):
    unet = copy.deepcopy(pipe.unet).double()
    cn = copy.deepcopy(pipe.controlnet).double()
    vae = copy.deepcopy(pipe.vae).double()
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(case["num_inference_steps"])
    t = exp["timesteps"][case["grad_step_index"]]
    sf = vae.config.scaling_factor
    lat = exp["grad_latents_in"].double()
    pos = exp["prompt_embeds"].double()
    rw = exp["reward_weight"].double()
    ctl = exp["control_image"].double()

    def f(neg):
        return grad_step_loss_cn(unet, cn, vae, sched, lat, t, neg, pos, case["guidance_scale"], ctl,
                                 case["controlnet_conditioning_scale"], rw, sf)[0]

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


def gradient_without_controlnet_path(pipe, case, exp):
    """How much of the gradient flows through the ControlNet: the same gradient with the residuals detached."""
    unet, cn, vae = pipe.unet, pipe.controlnet, pipe.vae
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(case["num_inference_steps"])
    t = exp["timesteps"][case["grad_step_index"]]
    lat = exp["grad_latents_in"]
    neg = exp["negative_prompt_embeds"].clone().requires_grad_(True)
    inp = torch.cat([lat] * 2)
    emb = torch.cat([neg, exp["prompt_embeds"]])
    down, mid = cn(inp, t, encoder_hidden_states=emb, controlnet_cond=torch.cat([exp["control_image"]] * 2),
                   conditioning_scale=case["controlnet_conditioning_scale"], guess_mode=False, return_dict=False)
    noise = unet(inp, t, encoder_hidden_states=emb, down_block_additional_residuals=[d.detach() for d in down],
                 mid_block_additional_residual=mid.detach(), return_dict=False)[0]
    u, c = noise.chunk(2)
    eps = u + case["guidance_scale"] * (c - u)
    x0 = sched.step(eps, t, lat, eta=0.0).pred_original_sample
    loss = -(exp["reward_weight"] * vae.decode(x0 / vae.config.scaling_factor).sample).sum()
    loss.backward()
    g = exp["grad_negative_prompt_embeds"]
    d = rel(neg.grad, g)
    print(f"   gradient with the ControlNet path detached differs by {d:.2e} (rel. to max|g|): the ControlNet's "
          f"cross-attention carries that part")
    assert d > 1e-3, d


# --------------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------------
def gen_case(name: str, spec: dict, vocab_dir: Path, out: Path) -> dict:
    print(f"== {name}")
    seed = spec["seed"]
    case = spec["case"]
    H, W = case["height"], case["width"]
    te = gp.build_text_encoder(spec["text"], seed + 1)
    unet = gp.build_unet(spec["unet"], seed + 2)
    vae = gp.build_vae(spec["vae"], seed + 3)
    nlev = len(spec["vae"]["block_out_channels"])
    vsf = 2 ** (nlev - 1)
    assert len(spec["cond_channels"]) - 1 == nlev - 1, "conditioning embedding must downsample as the VAE"
    assert H % 8 == 0 and W % 8 == 0, "StableDiffusionControlNetPipeline.check_inputs wants multiples of 8"
    lat_shape = (1, 4, H // vsf, W // vsf)
    s_unet, s_vae = gp.calibrate(unet, vae, te, lat_shape, spec["vae"]["scaling_factor"], seed + 4)
    print(f"   calibration: unet conv_out /{s_unet:.3f}, vae decoder conv_out /{s_vae:.3f}")

    cdir = out / name
    if cdir.exists():
        shutil.rmtree(cdir)
    cdir.mkdir(parents=True)
    make_control_png(cdir / "control.png", H, W, seed + 7)
    control = load_control_image(cdir / "control.png")
    assert control.shape == (1, 3, H, W)

    cn = build_controlnet(unet, spec["cond_channels"], seed + 8)
    factors = calibrate_controlnet(cn, unet, te, lat_shape, control, seed + 9)
    print(f"   controlnet residual convs rescaled by {np.array2string(factors, precision=3)}")
    if spec["f16"]:
        gp.round_to_f16(te, unet, vae, cn)

    sched = DDIMScheduler(**spec["sched"])
    tok = gp.load_tokenizer(vocab_dir, spec["pad"])
    pipe = StableDiffusionControlNetPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, controlnet=cn,
                                             scheduler=sched, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert dict(pipe.scheduler.config) == dict(DDIMScheduler(**spec["sched"]).config)
    # the pipeline's own preprocessing of the control image is exactly png / 255
    pp = pipe.control_image_processor.preprocess(Image.open(cdir / "control.png"), height=H, width=W)
    assert torch.equal(pp.float(), control), (pp.float() - control).abs().max()

    exp, final_plain = reference(pipe, case, control, seed + 5)
    d_cn = rel(final_plain, exp["final_latents"])
    print(f"   final_latents with vs without ControlNet: max|diff| {(final_plain - exp['final_latents']).abs().max():.4f}"
          f", rel. to max|with| {d_cn:.3f}; std with {exp['final_latents'].std():.4f}, without {final_plain.std():.4f}")
    assert d_cn > 0.05, d_cn
    downs = [exp[f"controlnet_down_residual_{i}"] for i in range(len(cn.controlnet_down_blocks))]
    print("   residual std at grad step (after scale): down " +
          " ".join(f"{d.std().item():.3f}{list(d.shape[1:])}" for d in downs) +
          f", mid {exp['controlnet_mid_residual'].std().item():.3f}{list(exp['controlnet_mid_residual'].shape[1:])}")
    check_forward_f64(pipe, case, exp)
    check_gradient_f64(pipe, case, exp)
    gradient_without_controlnet_path(pipe, case, exp)

    # the real pipeline's __call__, in memory, from the same inputs
    with torch.no_grad():
        lat = pipe(prompt=case["prompt"], negative_prompt=case["negative_prompt"], image=Image.open(cdir / "control.png"),
                   height=H, width=W, num_inference_steps=case["num_inference_steps"],
                   guidance_scale=case["guidance_scale"], eta=0.0, latents=exp["init_latents"].clone(),
                   controlnet_conditioning_scale=case["controlnet_conditioning_scale"], guess_mode=False,
                   output_type="latent").images
    print(f"   StableDiffusionControlNetPipeline.__call__ (in memory) vs hand loop: final_latents max|diff| "
          f"{(lat - exp['final_latents']).abs().max().item():.3e}, rel {rel(lat, exp['final_latents']):.2e}")
    assert rel(lat, exp["final_latents"]) < 1e-5

    with open(cdir / "case.json", "w") as f:
        json.dump({"kind": "controlnet", **case}, f, indent=2, ensure_ascii=True)
        f.write("\n")
    save_file(exp, str(cdir / "expected.safetensors"))
    pdir = cdir / "pipeline"
    if spec["f16"]:
        pipe.to(torch.float16)
    pipe.save_pretrained(str(pdir), safe_serialization=True)
    gp.fix_tokenizer_layout(pdir / "tokenizer", vocab_dir, spec)

    # ---- reload from disk and run diffusers' own __call__ on control.png
    re_pipe = StableDiffusionControlNetPipeline.from_pretrained(str(pdir), dtype=torch.float32)
    re_pipe.set_progress_bar_config(disable=True)
    assert type(re_pipe.scheduler).__name__ == "DDIMScheduler"
    assert type(re_pipe.controlnet).__name__ == "ControlNetModel"
    rtok = re_pipe.tokenizer
    for key, text in (("prompt_input_ids", case["prompt"]), ("negative_input_ids", case["negative_prompt"])):
        got = rtok(text, padding="max_length", max_length=rtok.model_max_length, truncation=True).input_ids
        assert got == exp[key][0].tolist(), (key, got)
    mods = ("unet", "text_encoder", "controlnet", "vae")
    for m in mods:
        for (n1, p1), (n2, p2) in zip(getattr(pipe, m).named_parameters(), getattr(re_pipe, m).named_parameters()):
            assert n1 == n2 and torch.equal(p1.float(), p2), (m, n1)
    with torch.no_grad():
        lat = re_pipe(prompt=case["prompt"], negative_prompt=case["negative_prompt"],
                      image=Image.open(cdir / "control.png"), height=H, width=W,
                      num_inference_steps=case["num_inference_steps"], guidance_scale=case["guidance_scale"], eta=0.0,
                      latents=exp["init_latents"].clone(),
                      controlnet_conditioning_scale=case["controlnet_conditioning_scale"], guess_mode=False,
                      output_type="latent").images
    print(f"   reload + StableDiffusionControlNetPipeline.__call__ vs hand loop: final_latents max|diff| "
          f"{(lat - exp['final_latents']).abs().max().item():.3e}, rel {rel(lat, exp['final_latents']):.2e}")
    assert rel(lat, exp["final_latents"]) < 1e-5
    with open(pdir / "controlnet" / "config.json") as f:
        cfg = json.load(f)
    print(f"   controlnet/config.json keys: {sorted(k for k in cfg if not k.startswith('_'))}")
    return {"name": name, "exp": exp, "size": gp.dir_size(cdir), "files": {
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
          f"safetensors {safetensors.__version__}  numpy {np.__version__}  Pillow {Image.__version__}")
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
