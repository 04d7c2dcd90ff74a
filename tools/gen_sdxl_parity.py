#!/usr/bin/env python3
"""Generate the SDXL parity cases (PyTorch reference) that reneg's Rust code is checked against.

Format: ../shared/docs/parity-fixtures.md, "SDXL pipeline case" and "SDXL facts a port must get right". Never run
in CI: it needs the pinned reference venv described in tools/gen_parity.py (torch 2.15.0, diffusers 0.42.1,
transformers 5.23.0, safetensors 0.8.0, numpy), outside the repository.

Run (CPU only; about four minutes on 2 cores):

    /work/pyref/bin/python tools/gen_sdxl_parity.py --out tests/fixtures/parity [--bpe PATH] [--only NAME ...]

    --bpe   CLIP BPE merges in open_clip format (default ../shared/data/clip-tokenizer/bpe_simple_vocab_16e6.txt.gz
            relative to the repository root, or $RENEG_CLIP_BPE)
    --out   folder that receives the case folders (default <repo>/tests/fixtures/parity)
    --only  restrict to some of: sdxl-tiny sdxl-tiny-zeros sdxl-tiny-empty sdxl-tiny-vpred (the last three need
            sdxl-tiny's pipeline/ on disk; its weights are checked against the model rebuilt here)

Reuses the generic helpers of tools/gen_parity.py beside it (imported by path, no bytecode written into the repo):
the HF tokenizer files built from the BPE file, the seeded O(1) weight init, the tiny CLIPTextModel / VAE / UNet
builders and the tokenizer folder layout fix-up.

One model serves all four cases (about 15 MB in all instead of 4 x 22 MB): sdxl-tiny/pipeline/ is the only full
pipeline folder, with both text encoders stored in float16 (their 49408-row token tables dominate); UNet and VAE f32.
sdxl-tiny-zeros/pipeline and sdxl-tiny-empty/pipeline are relative links -> ../sdxl-tiny/pipeline (same scheduler);
sdxl-tiny-vpred/pipeline/ holds its own model_index.json and scheduler/scheduler_config.json, and text_encoder,
text_encoder_2, tokenizer, tokenizer_2, unet, vae are relative links -> ../../sdxl-tiny/pipeline/<name> (the weights
are random: the same UNet serves as a v-prediction model). Every expected tensor is computed by diffusers from the
case's pipeline folder as loaded back from disk (StableDiffusionXLPipeline.from_pretrained, dtype float32, through
the links): in f32 from the f16-rounded text encoder weights.

What it writes, per case (deterministic: fixed seeds, torch.use_deterministic_algorithms, 2 threads, f32 on CPU):

    <out>/<case>/case.json    {"kind": "sdxl", prompt, negative_prompt (string or null), guidance_scale,
                               guidance_rescale, num_inference_steps, grad_step_index, height, width,
                               original_size, target_size, crops_coords_top_left}
    <out>/<case>/pipeline/    (as above: one real folder, links elsewhere)
                               StableDiffusionXLPipeline.save_pretrained(safe_serialization=True): model_index.json
                               (force_zeros_for_empty_prompt true), scheduler/ (EulerDiscreteScheduler or
                               DDIMScheduler), text_encoder/ (CLIPTextModel, f16), text_encoder_2/
                               (CLIPTextModelWithProjection, f16), tokenizer/, tokenizer_2/ (vocab.json + merges.txt, as
                               SDXL ships them; pad '<|endoftext|>' and '!'), unet/ (UNet2DConditionModel, "text_time"),
                               vae/ (AutoencoderKL, 4 levels = scale 8, scaling_factor 0.13025, force_upcast)
    <out>/<case>/expected.safetensors   every tensor of the "SDXL pipeline case" table, plus (not in the shared
                               format, for locating a mismatch):
        add_embedding_output   [2,T]  the UNet's aug_emb (output of unet.add_embedding, before it is added to the
                                      timestep embedding) at step grad_step_index, batch [negative, prompt];
                                      T = time_embed_dim = 4 x block_out_channels[0] = 64

The sampling loop is written out by hand with diffusers' own modules, as StableDiffusionXLPipeline.__call__ does it
(latents = init_latents * init_noise_sigma; set_begin_index(0); scale_model_input(cat([x, x]), t); one UNet call on
[negative, prompt]; CFG; rescale_noise_cfg if guidance_rescale > 0; scheduler.step, DDIM with eta 0). The gradient
step uses a deep copy of the sampling scheduler taken just before step grad_step_index, so pred_original_sample is
the scheduler's own x0 at that step (asserted bitwise equal to the x0 the sampling loop saw).

Cases (one tiny random-weight model, real 49408-token CLIP vocabulary; D1 = 32, D2 = 40, P = 24):
    sdxl-tiny        Euler as SDXL base ships it (epsilon, leading, steps_offset 1), real negative prompt,
                     40 x 56 px -> latents 5 x 7 (odd: every UNet upsampler interpolates to the skip's size)
    sdxl-tiny-zeros  negative_prompt null + force_zeros_for_empty_prompt: zero negative embeds / pooled (no
                     negative_input_ids written); Euler as sdxl-tiny (linked pipeline); 32 x 64 px
                     -> latents 4 x 8 (multiples of 4: no forwarded upsample size)
    sdxl-tiny-empty  negative_prompt "" (encoded like any prompt), Euler (linked pipeline); 56 x 40 px
                     -> latents 7 x 5
    sdxl-tiny-vpred  v_prediction + rescale_betas_zero_snr, DDIM trailing (eta 0), guidance_rescale 0.7, real negative
                     prompt, original_size (96, 80), crops_coords_top_left (8, 4), target_size (40, 56); 40 x 56 px

Weights: gen_parity's seeded O(1) init on every Linear / Conv2d / norm / embedding (nothing of diffusers' or
transformers' default init survives: asserted), then the UNet's conv_out is rescaled so the UNet output is ~unit std
on random inputs and the VAE decoder's conv_out so the image is O(1) (calibrated once, on sdxl-tiny's latent
size), then both text encoders' weights are rounded to float16 values.

Checks printed: max |x| per tensor; the stored dtypes (text encoders F16, UNet/VAE F32); the links resolve to the
shared folder; the reloaded pipeline's weights (f32) equal the in-memory f16-rounded model bitwise, its tokenizers
and scheduler config equal the in-memory ones; the reloaded pipeline's own __call__ (output_type "latent",
latents=init_latents) and the in-memory pipeline's reproduce final_latents bit for bit; pipe.encode_prompt equals the
embeddings rebuilt by hand from hidden_states[-2] / text_embeds; the scheduler's x0 and step equal the formulas of
parity-fixtures.md; the f32 forward against a float64 forward (formulas, not diffusers' f32-upcasting Euler step);
the f32 gradients against float64 autograd and float64 central finite differences on a few entries.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import shutil
import subprocess
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
import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel,
)
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

REPO = gp.REPO
MAX_LEN = gp.MAX_LEN
EOT = gp.EOT
torch.utils.deterministic.fill_uninitialized_memory = False  # every torch.empty buffer is overwritten anyway

# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------
# SDXL base's scheduler (stabilityai/stable-diffusion-xl-base-1.0, scheduler/scheduler_config.json), the keys
# EulerDiscreteScheduler accepts (the shipped file also has DDIM/PNDM leftovers: clip_sample, set_alpha_to_one,
# skip_prk_steps, sample_max_value, which Euler ignores).
SDXL_EULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", interpolation_type="linear", use_karras_sigmas=False, timestep_spacing="leading",
    steps_offset=1,
)
SDXL_DDIM = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon", timestep_spacing="leading",
)

TEXT1 = dict(hidden=32, intermediate=37, layers=3, heads=4, act="quick_gelu")
TEXT2 = dict(hidden=40, intermediate=56, layers=3, heads=5, act="gelu", projection_dim=24)
ADD_TIME_DIM = 8

# SDXL base's UNet layout, shrunk: first level without attention, attention_head_dim = heads per level,
# different transformer depths per level (mid block: the last), linear proj_in/proj_out, "text_time" embedding.
SDXL_TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    block_out_channels=(16, 32, 32), layers_per_block=2, transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(2, 2, 4), norm_num_groups=8, cross_attention_dim=TEXT1["hidden"] + TEXT2["hidden"],
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=ADD_TIME_DIM,
    projection_class_embeddings_input_dim=6 * ADD_TIME_DIM + TEXT2["projection_dim"],
    flip_sin_to_cos=True, freq_shift=0,
)
# 4 levels like SDXL's VAE (scale factor 8), small channels.
SDXL_TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8, scaling_factor=0.13025,
    force_upcast=True,
)

NEG = "blurry, low quality, watermark, deformed"

# One model for all four cases (built with sdxl-tiny's seeds; "seed" below seeds only a case's init_latents and
# reward_weight). pipeline: "full" = the one complete pipeline folder; "link" = pipeline -> ../sdxl-tiny/pipeline
# (same scheduler); "scheduler" = own model_index.json + scheduler/, components linked into sdxl-tiny's folder.
CASES = {
    "sdxl-tiny": dict(
        seed=9100, sched=("euler", SDXL_EULER), pipeline="full",
        case=dict(prompt="a red fox sitting in a snowy forest, golden hour, photo", negative_prompt=NEG,
                  guidance_scale=5.0, guidance_rescale=0.0, num_inference_steps=5, grad_step_index=2,
                  height=40, width=56, original_size=None, target_size=None, crops_coords_top_left=None),
    ),
    "sdxl-tiny-zeros": dict(
        seed=9200, sched=("euler", SDXL_EULER), pipeline="link",
        case=dict(prompt="an isometric pixel art city at night", negative_prompt=None,
                  guidance_scale=7.0, guidance_rescale=0.0, num_inference_steps=4, grad_step_index=2,
                  height=32, width=64, original_size=None, target_size=None, crops_coords_top_left=None),
    ),
    "sdxl-tiny-empty": dict(
        seed=9300, sched=("euler", SDXL_EULER), pipeline="link",
        case=dict(prompt="portrait of an old sailor, oil painting", negative_prompt="",
                  guidance_scale=6.0, guidance_rescale=0.0, num_inference_steps=4, grad_step_index=1,
                  height=56, width=40, original_size=None, target_size=None, crops_coords_top_left=None),
    ),
    "sdxl-tiny-vpred": dict(
        seed=9400, pipeline="scheduler",
        sched=("ddim", dict(SDXL_DDIM, prediction_type="v_prediction", timestep_spacing="trailing",
                            rescale_betas_zero_snr=True)),
        case=dict(prompt="a glass teapot on a wooden table, studio lighting", negative_prompt="grainy, overexposed",
                  guidance_scale=7.5, guidance_rescale=0.7, num_inference_steps=5, grad_step_index=2,
                  height=40, width=56, original_size=[96, 80], target_size=[40, 56], crops_coords_top_left=[8, 4]),
    ),
}


# --------------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------------
def text_config(c: dict) -> CLIPTextConfig:
    # bos 0 / eos 2 / pad 1 as SDXL's text_encoder and text_encoder_2 config.json (so pooling = argmax(input_ids))
    return CLIPTextConfig(
        vocab_size=49408, hidden_size=c["hidden"], intermediate_size=c["intermediate"],
        num_hidden_layers=c["layers"], num_attention_heads=c["heads"], max_position_embeddings=77,
        hidden_act=c["act"], layer_norm_eps=1e-5, projection_dim=c.get("projection_dim", c["hidden"]),
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )


@torch.no_grad()
def redraw(model: torch.nn.Module, seed: int) -> None:
    """gen_parity's o1_init, asserting that every parameter was re-drawn (nothing zero-initialised survives)."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gp.o1_init(model, seed)
    for n, p in model.named_parameters():
        assert not torch.equal(p, before[n]), f"not re-drawn: {n}"
        assert float(p.abs().max()) > 0.0 and (p.numel() == 1 or float(p.std()) > 0.0), n


def build_text_encoder(c: dict, seed: int, with_projection: bool):
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    te = cls(text_config(c)).eval()
    redraw(te, seed)
    return te


def build_unet(c: dict, seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**c).eval()
    redraw(unet, seed)
    return unet


def build_vae(c: dict, seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(**c).eval()
    redraw(vae, seed)
    return vae


@torch.no_grad()
def calibrate(unet, vae, te1, te2, lat_shape, sf, seed):
    """Rescale UNet conv_out so its output is ~unit std, and the VAE decoder's conv_out so images are O(1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(lat_shape, generator=g)
    ids = torch.randint(0, 49406, (1, MAX_LEN), generator=g)
    o1 = te1(ids, output_hidden_states=True)
    o2 = te2(ids, output_hidden_states=True)
    emb = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
    H, W = lat_shape[2] * 8, lat_shape[3] * 8
    cond = {"text_embeds": o2.text_embeds, "time_ids": torch.tensor([[H, W, 0, 0, H, W]], dtype=torch.float32)}
    stds = [unet(x, torch.tensor(t), encoder_hidden_states=emb, added_cond_kwargs=cond).sample.std().item()
            for t in (50, 500, 950)]
    s = float(np.mean(stds))
    unet.conv_out.weight.div_(s)
    unet.conv_out.bias.div_(s)
    img = vae.decode(x / sf).sample
    s2 = img.std().item() / 0.5
    vae.decoder.conv_out.weight.div_(s2)
    vae.decoder.conv_out.bias.div_(s2)
    return s, s2


# --------------------------------------------------------------------------------------------------
# Reference computation
# --------------------------------------------------------------------------------------------------
def size_args(case):
    H, W = case["height"], case["width"]
    orig = tuple(case["original_size"] or (H, W))
    crops = tuple(case["crops_coords_top_left"] or (0, 0))
    target = tuple(case["target_size"] or (H, W))
    return orig, crops, target


def unet_batch(unet, sched, x, t, neg, pos, negp, posp, neg_tid, tid):
    """One UNet call on the batch [negative, prompt], exactly as StableDiffusionXLPipeline.__call__."""
    inp = sched.scale_model_input(torch.cat([x] * 2), t)
    cond = {"text_embeds": torch.cat([negp, posp]), "time_ids": torch.cat([neg_tid, tid])}
    return unet(inp, t, encoder_hidden_states=torch.cat([neg, pos]), added_cond_kwargs=cond, return_dict=False)[0]


def guide(out, g, r):
    u, c = out.chunk(2)
    n = u + g * (c - u)
    if r > 0:
        n = rescale_noise_cfg(n, c, guidance_rescale=r)
    return n


def step_kwargs(kind):
    return dict(eta=0.0) if kind == "ddim" else {}


@torch.no_grad()
def manual_embeds(pipe, text):
    """Rebuild encode_prompt's output from the doc's facts (hidden_states[-2] of both, text_embeds of encoder 2)."""
    ids1 = pipe.tokenizer(text, padding="max_length", max_length=MAX_LEN, truncation=True,
                          return_tensors="pt").input_ids
    ids2 = pipe.tokenizer_2(text, padding="max_length", max_length=MAX_LEN, truncation=True,
                            return_tensors="pt").input_ids
    o1 = pipe.text_encoder(ids1, output_hidden_states=True)
    o2 = pipe.text_encoder_2(ids2, output_hidden_states=True)
    assert len(o1.hidden_states) == TEXT1["layers"] + 1
    emb = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
    # pooled by hand: final_layer_norm(last layer) at argmax(ids) (eos_token_id 2 in config), text_projection
    tm = pipe.text_encoder_2.text_model
    last = tm.final_layer_norm(o2.hidden_states[-1])
    pooled = pipe.text_encoder_2.text_projection(last[torch.arange(1), ids2.argmax(-1)])
    assert torch.allclose(pooled, o2.text_embeds, atol=1e-6, rtol=0), (pooled - o2.text_embeds).abs().max()
    return ids1.to(torch.int64), ids2.to(torch.int64), emb, o2.text_embeds


def make_scheduler(kind, cfg):
    return (EulerDiscreteScheduler if kind == "euler" else DDIMScheduler).from_config(cfg)


def reference(pipe, kind, case, seed):
    unet, vae = pipe.unet, pipe.vae
    sf = vae.config.scaling_factor
    g, r = case["guidance_scale"], case["guidance_rescale"]
    N, k = case["num_inference_steps"], case["grad_step_index"]
    H, W = case["height"], case["width"]
    vsf = pipe.vae_scale_factor
    C = unet.config.in_channels
    P = pipe.text_encoder_2.config.projection_dim
    orig, crops, target = size_args(case)
    out = {}
    with torch.no_grad():
        pos, neg, posp, negp = pipe.encode_prompt(
            prompt=case["prompt"], device=torch.device("cpu"), num_images_per_prompt=1,
            do_classifier_free_guidance=True, negative_prompt=case["negative_prompt"])
        pids, pids2, pos_m, posp_m = manual_embeds(pipe, case["prompt"])
        assert torch.equal(pos, pos_m) and torch.equal(posp, posp_m)
        if case["negative_prompt"] is None:
            assert pipe.config.force_zeros_for_empty_prompt
            assert float(neg.abs().max()) == 0.0 and float(negp.abs().max()) == 0.0
        else:
            nids, nids2, neg_m, negp_m = manual_embeds(pipe, case["negative_prompt"])
            assert torch.equal(neg, neg_m) and torch.equal(negp, negp_m)
            out.update(negative_input_ids=nids, negative_input_ids_2=nids2)
        tid = pipe._get_add_time_ids(orig, crops, target, dtype=torch.float32, text_encoder_projection_dim=P)
        assert tid.tolist() == [[float(v) for v in (*orig, *crops, *target)]]
        neg_tid = tid.clone()

        gen = torch.Generator().manual_seed(seed)
        init = torch.randn((1, C, H // vsf, W // vsf), generator=gen, dtype=torch.float32)
        reward = torch.randn((1, 3, H, W), generator=gen, dtype=torch.float32)

        sched = make_scheduler(kind, pipe.scheduler.config)
        sched.set_timesteps(N)
        timesteps = sched.timesteps.clone()
        latents = init * sched.init_noise_sigma
        if hasattr(sched, "set_begin_index"):  # as __call__: Euler has it, DDIM not
            sched.set_begin_index(0)
        for i, t in enumerate(timesteps):
            if i == k:
                lat_in = latents.clone()
                sched_k = copy.deepcopy(sched)
            noise = guide(unet_batch(unet, sched, latents, t, neg, pos, negp, posp, neg_tid, tid), g, r)
            st = sched.step(noise, t, latents, **step_kwargs(kind))
            if i == k:
                x0_loop = st.pred_original_sample.clone()
            latents = st.prev_sample
        final = latents
        image = vae.decode(final / sf).sample

    # gradient: only the guided step at grad_step_index carries the graph; leaves: negative embeds and pooled
    neg_l = neg.detach().clone().requires_grad_(True)
    negp_l = negp.detach().clone().requires_grad_(True)
    captured = {}
    hook = unet.add_embedding.register_forward_hook(lambda m, a, o: captured.__setitem__("aug", o.detach().clone()))
    try:
        s = copy.deepcopy(sched_k)
        t = timesteps[k]
        uo = unet_batch(unet, s, lat_in, t, neg_l, pos, negp_l, posp, neg_tid, tid)
        noise = guide(uo, g, r)
        x0 = s.step(noise, t, lat_in, **step_kwargs(kind)).pred_original_sample
    finally:
        hook.remove()
    loss = -(reward * vae.decode(x0 / sf).sample).sum()
    loss.backward()
    assert torch.equal(x0.detach(), x0_loop), (x0.detach() - x0_loop).abs().max()

    out.update(
        prompt_input_ids=pids, prompt_input_ids_2=pids2,
        prompt_embeds=pos, negative_prompt_embeds=neg,
        pooled_prompt_embeds=posp, negative_pooled_prompt_embeds=negp,
        add_time_ids=tid, negative_add_time_ids=neg_tid,
        init_latents=init,
        timesteps=timesteps.to(torch.float32 if kind == "euler" else torch.int64),
        final_latents=final, image=image, grad_latents_in=lat_in, unet_output=uo.detach(),
        x0_pred=x0.detach(), reward_weight=reward, loss=loss.detach().reshape([]),
        grad_negative_prompt_embeds=neg_l.grad.detach().clone(),
        grad_negative_pooled_prompt_embeds=negp_l.grad.detach().clone(),
        add_embedding_output=captured["aug"],
    )
    if kind == "euler":
        out["sigmas"] = sched.sigmas.clone().to(torch.float32)
    return {k_: v.detach().contiguous() for k_, v in out.items()}


# --------------------------------------------------------------------------------------------------
# Formulas of parity-fixtures.md (any dtype): used to cross-check diffusers in f32 and to run the f64 reference
# --------------------------------------------------------------------------------------------------
class Formula:
    def __init__(self, kind, sched_f32, N):
        self.kind = kind
        self.pred = sched_f32.config.prediction_type
        self.ts = sched_f32.timesteps
        self.ac = sched_f32.alphas_cumprod.double()
        self.N = N
        self.T = sched_f32.config.num_train_timesteps
        if kind == "euler":
            self.sig = sched_f32.sigmas.double()
        else:
            self.final_ac = float(sched_f32.final_alpha_cumprod)

    def scale_in(self, x, i):
        if self.kind == "euler":
            return x / torch.sqrt(self.sig[i] ** 2 + 1)
        return x

    def x0(self, out, x, i):
        if self.kind == "euler":
            s = self.sig[i]
            if self.pred == "epsilon":
                return x - s * out
            return -s / torch.sqrt(s**2 + 1) * out + x / (s**2 + 1)
        a = self.ac[int(self.ts[i])]
        if self.pred == "epsilon":
            return (x - torch.sqrt(1 - a) * out) / torch.sqrt(a)
        return torch.sqrt(a) * x - torch.sqrt(1 - a) * out

    def step(self, out, x, i):
        x0 = self.x0(out, x, i)
        if self.kind == "euler":
            s, sn = self.sig[i], self.sig[i + 1]
            return x + (x - x0) / s * (sn - s), x0
        t = int(self.ts[i])
        a = self.ac[t]
        tp = t - self.T // self.N
        ap = self.ac[tp] if tp >= 0 else torch.tensor(self.final_ac, dtype=torch.float64)
        eps = out if self.pred == "epsilon" else torch.sqrt(a) * out + torch.sqrt(1 - a) * x
        return torch.sqrt(ap) * x0 + torch.sqrt(1 - ap) * eps, x0


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def check_formulas_and_f64(pipe, kind, case, exp):
    """(1) diffusers' f32 step == the doc's formulas in f32 at every step; (2) f64 forward and gradient."""
    N, k = case["num_inference_steps"], case["grad_step_index"]
    g, r = case["guidance_scale"], case["guidance_rescale"]
    sched = make_scheduler(kind, pipe.scheduler.config)
    sched.set_timesteps(N)
    if kind == "euler":
        assert abs(float(sched.init_noise_sigma) - math.sqrt(float(sched.sigmas.max()) ** 2 + 1)) < 1e-5
        assert float(sched.sigmas[-1]) == 0.0 and len(sched.sigmas) == N + 1
    f = Formula(kind, sched, N)
    sf = pipe.vae.config.scaling_factor
    pos, neg = exp["prompt_embeds"], exp["negative_prompt_embeds"]
    posp, negp = exp["pooled_prompt_embeds"], exp["negative_pooled_prompt_embeds"]
    tid, ntid = exp["add_time_ids"], exp["negative_add_time_ids"]

    def unet_f(unet, x, i, neg_, negp_, dtype):
        t = f.ts[i]
        inp = f.scale_in(torch.cat([x] * 2), i).to(dtype)
        cond = {"text_embeds": torch.cat([negp_, posp.to(dtype)]), "time_ids": torch.cat([ntid, tid]).to(dtype)}
        return unet(inp, t, encoder_hidden_states=torch.cat([neg_, pos.to(dtype)]), added_cond_kwargs=cond).sample

    # (1) f32: formula step vs diffusers step along the stored trajectory
    worst = 0.0
    with torch.no_grad():
        x = exp["init_latents"] * sched.init_noise_sigma
        if hasattr(sched, "set_begin_index"):  # as __call__: Euler has it, DDIM not
            sched.set_begin_index(0)
        for i, t in enumerate(sched.timesteps):
            noise = guide(unet_batch(pipe.unet, sched, x, t, neg, pos, negp, posp, ntid, tid), g, r)
            st = sched.step(noise, t, x, **step_kwargs(kind))
            fx, fx0 = f.step(noise.double(), x.double(), i)
            worst = max(worst, rel(st.prev_sample, fx), rel(st.pred_original_sample, fx0))
            x = st.prev_sample
        assert torch.equal(x, exp["final_latents"])
    print(f"   diffusers f32 step vs doc formulas: worst rel {worst:.1e}")
    assert worst < 1e-5, worst

    # (2) f64 forward
    unet = copy.deepcopy(pipe.unet).double()
    vae = copy.deepcopy(pipe.vae).double()
    d = torch.float64
    with torch.no_grad():
        x = exp["init_latents"].double() * math.sqrt(float(f.sig[0]) ** 2 + 1) if kind == "euler" else \
            exp["init_latents"].double()
        for i in range(N):
            if i == k:
                lat_k = x.clone()
            x, _ = f.step(guide(unet_f(unet, x, i, neg.double(), negp.double(), d), g, r), x, i)
        img = vae.decode(x / sf).sample
    rf = dict(grad_latents_in=rel(exp["grad_latents_in"], lat_k), final_latents=rel(exp["final_latents"], x),
              image=rel(exp["image"], img))
    print("   f32 vs f64 forward rel err: " + ", ".join(f"{a} {b:.1e}" for a, b in rf.items()))
    assert max(rf.values()) < 1e-4, rf

    # (3) f64 gradient from the stored f32 grad_latents_in
    lat = exp["grad_latents_in"].double()
    rw = exp["reward_weight"].double()

    def loss_f(neg_, negp_):
        x0 = f.x0(guide(unet_f(unet, lat, k, neg_, negp_, d), g, r), lat, k)
        return -(rw * vae.decode(x0 / sf).sample).sum()

    n64 = neg.double().clone().requires_grad_(True)
    p64 = negp.double().clone().requires_grad_(True)
    l64 = loss_f(n64, p64)
    l64.backward()
    rg = dict(loss=rel(exp["loss"].reshape(1), l64.detach().reshape(1)),
              grad_negative_prompt_embeds=rel(exp["grad_negative_prompt_embeds"], n64.grad),
              grad_negative_pooled_prompt_embeds=rel(exp["grad_negative_pooled_prompt_embeds"], p64.grad))
    print("   f32 vs f64 autograd rel err: " + ", ".join(f"{a} {b:.1e}" for a, b in rg.items()))
    # the loss is a sum of terms of both signs (cancellation): its f32 rounding is judged against the 1e-4 tolerance
    assert rg["loss"] < 1e-4 and max(rg.values()) < 1e-3, rg

    # (4) f64 central finite differences on a few entries (the largest-|grad| ones and a random one)
    h = 1e-5
    worst = 0.0
    lines = []
    with torch.no_grad():
        for name, gref, which in (("emb", n64.grad, 0), ("pooled", p64.grad, 1)):
            flat = gref.flatten()
            idx = [int(flat.abs().argmax()), int(torch.randint(0, flat.numel(), (1,),
                                                               generator=torch.Generator().manual_seed(7)))]
            for j in idx:
                e = torch.zeros_like(flat)
                e[j] = h
                e = e.view_as(gref)
                args_p = [n64.detach(), p64.detach()]
                args_m = [n64.detach(), p64.detach()]
                args_p[which] = args_p[which] + e
                args_m[which] = args_m[which] - e
                fd = (loss_f(*args_p) - loss_f(*args_m)).item() / (2 * h)
                err = abs(fd - flat[j].item()) / flat.abs().max().item()
                worst = max(worst, err)
                lines.append(f"      {name} entry {j:5d}: fd64 {fd:+.8e} autograd64 {flat[j].item():+.8e}")
    print(f"   finite differences worst (rel. to max|g|) {worst:.1e}")
    print("\n".join(lines))
    assert worst < 1e-5, worst


# --------------------------------------------------------------------------------------------------
# Case generation
# --------------------------------------------------------------------------------------------------
SHARED = "sdxl-tiny"  # the case whose pipeline/ is the one full pipeline folder; every other case links to it
COMPONENTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae")


def call_pipeline(pipe, case, init):
    orig, crops, target = size_args(case)
    with torch.no_grad():
        return pipe(prompt=case["prompt"], negative_prompt=case["negative_prompt"], height=case["height"],
                    width=case["width"], num_inference_steps=case["num_inference_steps"],
                    guidance_scale=case["guidance_scale"], guidance_rescale=case["guidance_rescale"],
                    original_size=orig, crops_coords_top_left=crops, target_size=target,
                    latents=init.clone(), output_type="latent").images


def build_shared_model(vocab_dir: Path) -> dict:
    """The one tiny SDXL model of all cases (seeds and calibration from SHARED's spec); the text encoders' weights
    are rounded to float16 values (kept in f32 in memory), as they are stored."""
    print(f"== shared model (seeds and calibration of {SHARED})")
    spec = CASES[SHARED]
    seed = spec["seed"]
    H, W = spec["case"]["height"], spec["case"]["width"]
    te1 = build_text_encoder(TEXT1, seed + 1, with_projection=False)
    te2 = build_text_encoder(TEXT2, seed + 2, with_projection=True)
    unet = build_unet(SDXL_TINY_UNET, seed + 3)
    vae = build_vae(SDXL_TINY_VAE, seed + 4)
    vsf = 2 ** (len(SDXL_TINY_VAE["block_out_channels"]) - 1)
    s_unet, s_vae = calibrate(unet, vae, te1, te2, (1, 4, H // vsf, W // vsf), SDXL_TINY_VAE["scaling_factor"],
                              seed + 5)
    print(f"   calibration: unet conv_out /{s_unet:.3f}, vae decoder conv_out /{s_vae:.3f}")
    gp.round_to_f16(te1, te2)
    for te in (te1, te2):
        for n, p in te.named_parameters():
            assert p.dtype == torch.float32 and torch.equal(p, p.half().float()), n
    print("   text encoders rounded to float16 values (stored f16); UNet and VAE f32")
    return dict(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=gp.load_tokenizer(vocab_dir, EOT),
                tokenizer_2=gp.load_tokenizer(vocab_dir, "!"), unet=unet)


def memory_pipeline(model: dict, kind: str, sched_cfg: dict) -> StableDiffusionXLPipeline:
    sched = (EulerDiscreteScheduler if kind == "euler" else DDIMScheduler)(**sched_cfg)
    pipe = StableDiffusionXLPipeline(scheduler=sched, force_zeros_for_empty_prompt=True, add_watermarker=False,
                                     **model)
    pipe.set_progress_bar_config(disable=True)
    assert dict(pipe.scheduler.config) == dict(type(sched)(**sched_cfg).config)
    return pipe


def safetensors_dtypes(path: Path) -> set:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def write_pipeline(layout: str, pipe_mem, vocab_dir: Path, cdir: Path) -> None:
    """full: the one complete pipeline folder (text encoders f16). link: pipeline -> ../SHARED/pipeline.
    scheduler: own model_index.json + scheduler/, every component a link into ../../SHARED/pipeline."""
    pdir = cdir / "pipeline"
    shared = cdir.parent / SHARED / "pipeline"
    if layout == "full":
        assert cdir.name == SHARED
        half = {k: copy.deepcopy(getattr(pipe_mem, k)).to(torch.float16) for k in ("text_encoder", "text_encoder_2")}
        save = StableDiffusionXLPipeline(vae=pipe_mem.vae, tokenizer=pipe_mem.tokenizer,
                                         tokenizer_2=pipe_mem.tokenizer_2, unet=pipe_mem.unet,
                                         scheduler=pipe_mem.scheduler, force_zeros_for_empty_prompt=True,
                                         add_watermarker=False, **half)
        save.save_pretrained(str(pdir), safe_serialization=True)
        for sub, pad in (("tokenizer", EOT), ("tokenizer_2", "!")):
            gp.fix_tokenizer_layout(pdir / sub, vocab_dir, dict(tokenizer_layout="vocab", pad=pad))
        for sub, fname, dt in (("text_encoder", "model.safetensors", {"F16"}),
                               ("text_encoder_2", "model.safetensors", {"F16"}),
                               ("unet", "diffusion_pytorch_model.safetensors", {"F32"}),
                               ("vae", "diffusion_pytorch_model.safetensors", {"F32"})):
            got = safetensors_dtypes(pdir / sub / fname)
            assert got == dt, (sub, got)
        print("   pipeline/: full folder; text_encoder(_2) model.safetensors F16, unet and vae F32")
    elif layout == "link":
        assert shared.is_dir() and not shared.is_symlink(), f"{shared} missing: generate {SHARED} first"
        os.symlink(os.path.join("..", SHARED, "pipeline"), pdir)
        assert pdir.resolve() == shared.resolve()
        print(f"   pipeline -> {os.readlink(pdir)}")
    else:
        assert layout == "scheduler", layout
        assert shared.is_dir() and not shared.is_symlink(), f"{shared} missing: generate {SHARED} first"
        pdir.mkdir()
        with tempfile.TemporaryDirectory() as td:  # exactly the files save_pretrained writes for these two
            pipe_mem.save_pretrained(td, safe_serialization=True)
            assert sorted(os.listdir(Path(td) / "scheduler")) == ["scheduler_config.json"]
            shutil.copy(Path(td) / "model_index.json", pdir / "model_index.json")
            (pdir / "scheduler").mkdir()
            shutil.copy(Path(td) / "scheduler" / "scheduler_config.json", pdir / "scheduler" / "scheduler_config.json")
        for c in COMPONENTS:
            os.symlink(os.path.join("..", "..", SHARED, "pipeline", c), pdir / c)
            assert (pdir / c).resolve() == (shared / c).resolve()
        with open(pdir / "model_index.json") as f:
            mi = json.load(f)
        with open(shared / "model_index.json") as f:
            ms = json.load(f)
        assert {k: v for k, v in mi.items() if k != "scheduler"} == {k: v for k, v in ms.items() if k != "scheduler"}
        print(f"   pipeline/: own model_index.json (scheduler {mi['scheduler']}) + scheduler/; "
              + ", ".join(f"{c} -> {os.readlink(pdir / c)}" for c in COMPONENTS))


def gen_case(name: str, spec: dict, model: dict, vocab_dir: Path, out: Path) -> dict:
    print(f"== {name}")
    seed = spec["seed"]
    case = dict(spec["case"])
    kind, sched_cfg = spec["sched"]
    H, W = case["height"], case["width"]
    assert H % 8 == 0 and W % 8 == 0
    vsf = 2 ** (len(SDXL_TINY_VAE["block_out_channels"]) - 1)
    lat_shape = (1, 4, H // vsf, W // vsf)
    up = 2 ** (len(SDXL_TINY_UNET["block_out_channels"]) - 1)
    print(f"   latents {lat_shape[2]}x{lat_shape[3]}; forwarded upsample size: "
          f"{any(s % up for s in lat_shape[2:])}")
    if spec["pipeline"] == "link":
        assert spec["sched"] == CASES[SHARED]["sched"], "a linked pipeline has the shared scheduler"
    pipe_mem = memory_pipeline(model, kind, sched_cfg)
    assert pipe_mem.vae_scale_factor == vsf

    cdir = out / name
    if cdir.is_symlink():
        cdir.unlink()
    elif cdir.exists():
        shutil.rmtree(cdir)  # does not follow links inside (pipeline -> ../sdxl-tiny/pipeline is removed as a link)
    cdir.mkdir(parents=True)
    write_pipeline(spec["pipeline"], pipe_mem, vocab_dir, cdir)
    pdir = cdir / "pipeline"

    # ---- load the folder back from disk (through the links), in f32: every expected tensor is computed from it
    re_pipe = StableDiffusionXLPipeline.from_pretrained(str(pdir), dtype=torch.float32, add_watermarker=False)
    re_pipe.set_progress_bar_config(disable=True)
    assert type(re_pipe.scheduler).__name__ == type(pipe_mem.scheduler).__name__

    def public(cfg):
        return {k: v for k, v in dict(cfg).items() if not k.startswith("_")}
    assert public(re_pipe.scheduler.config) == public(pipe_mem.scheduler.config), \
        (public(re_pipe.scheduler.config), public(pipe_mem.scheduler.config))
    assert re_pipe.config.force_zeros_for_empty_prompt is True
    for tk, pad_id in ((re_pipe.tokenizer, 49407), (re_pipe.tokenizer_2, 0)):
        assert tk.pad_token_id == pad_id and tk.model_max_length == MAX_LEN, (tk.pad_token, tk.model_max_length)
    for text in gp.tokenizer_prompts():
        assert gp.ids77(re_pipe.tokenizer, text) == gp.ids77(pipe_mem.tokenizer, text), ascii(text)
        assert gp.ids77(re_pipe.tokenizer_2, text) == gp.ids77(pipe_mem.tokenizer_2, text), ascii(text)
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        sd_mem, sd_disk = getattr(pipe_mem, comp).state_dict(), getattr(re_pipe, comp).state_dict()
        assert list(sd_mem) == list(sd_disk), comp
        for n in sd_mem:
            assert sd_disk[n].dtype == torch.float32 and torch.equal(sd_mem[n], sd_disk[n]), (comp, n)
    print("   reloaded: scheduler config, tokenizers, and all weights (f32, text encoders from f16) equal the "
          "in-memory model")

    exp = reference(re_pipe, kind, case, seed + 6)
    keys = [("prompt_input_ids", "tokenizer", case["prompt"]), ("prompt_input_ids_2", "tokenizer_2", case["prompt"])]
    if case["negative_prompt"] is not None:
        keys += [("negative_input_ids", "tokenizer", case["negative_prompt"]),
                 ("negative_input_ids_2", "tokenizer_2", case["negative_prompt"])]
    else:
        assert "negative_input_ids" not in exp and "negative_input_ids_2" not in exp
    for key, tk, text in keys:
        assert gp.ids77(getattr(pipe_mem, tk), text) == exp[key][0].tolist(), key
    check_formulas_and_f64(re_pipe, kind, case, exp)
    # diffusers' own __call__, on the reloaded pipeline and on the in-memory one (same f32 values): bit for bit
    for label, p in (("reloaded", re_pipe), ("in memory", pipe_mem)):
        lat = call_pipeline(p, case, exp["init_latents"])
        r = rel(lat, exp["final_latents"])
        print(f"   StableDiffusionXLPipeline.__call__ ({label}) final_latents rel err {r:.2e}"
              f"{' (bitwise equal)' if torch.equal(lat, exp['final_latents']) else ''}")
        assert torch.equal(lat, exp["final_latents"]), (label, r)

    case_json = dict(kind="sdxl", prompt=case["prompt"], negative_prompt=case["negative_prompt"],
                     guidance_scale=case["guidance_scale"], guidance_rescale=case["guidance_rescale"],
                     num_inference_steps=case["num_inference_steps"], grad_step_index=case["grad_step_index"],
                     height=H, width=W)
    orig, crops, target = size_args(case)
    case_json.update(original_size=list(orig), target_size=list(target), crops_coords_top_left=list(crops))
    with open(cdir / "case.json", "w") as f:
        json.dump(case_json, f, indent=2, ensure_ascii=True)
        f.write("\n")
    save_file(exp, str(cdir / "expected.safetensors"))
    rows = listing(cdir)
    return {"name": name, "exp": exp, "size": sum(s for _, s, _ in rows), "rows": rows, "dir": cdir}


def listing(cdir: Path) -> list:
    """(path relative to cdir, size, link target or None) for every file and link, not following links."""
    rows = []
    for root, dirs, files in os.walk(cdir, followlinks=False):
        for n in dirs + files:
            p = Path(root) / n
            if p.is_symlink():
                rows.append((str(p.relative_to(cdir)), p.lstat().st_size, os.readlink(p)))
            elif p.is_file():
                rows.append((str(p.relative_to(cdir)), p.stat().st_size, None))
    return sorted(rows)


def summary(results, out: Path):
    print("\n== summary")
    for r in results:
        print(f"{r['name']}: {r['size'] / 1e6:.2f} MB (links counted as links)")
        for f, s, target in r["rows"]:
            print(f"      {s:>10d}  {f}" + (f" -> {target}" if target else ""))
        for k, v in r["exp"].items():
            if v.dtype == torch.int64:
                rng = f"int64 [{v.min().item()}, {v.max().item()}]"
            else:
                sd = v.float().std().item() if v.numel() > 1 else 0.0
                rng = f"f32 max|x| {v.abs().max().item():.4g}  std {sd:.4g}"
            print(f"   {k:36s} {str(list(v.shape)):16s} {rng}")
        e = r["exp"]
        for gname in ("grad_negative_prompt_embeds", "grad_negative_pooled_prompt_embeds"):
            assert float(e[gname].abs().max()) > 0.0, gname
        for k, v in e.items():
            if v.dtype != torch.int64 and k not in ("negative_prompt_embeds", "negative_pooled_prompt_embeds"):
                assert torch.isfinite(v).all() and float(v.abs().max()) > 1e-6, k
    dirs = [str(out / n) for n in CASES if (out / n).exists()]
    total = sum(s for d in dirs for _, s, _ in listing(Path(d)))
    print(f"all SDXL cases on disk: {total / 1e6:.2f} MB in files (links as links); du -shc:")
    sys.stdout.flush()
    subprocess.run(["du", "-shc", *dirs], check=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bpe", default=os.environ.get(
        "RENEG_CLIP_BPE", str(REPO.parent / "shared/data/clip-tokenizer/bpe_simple_vocab_16e6.txt.gz")))
    ap.add_argument("--out", default=str(REPO / "tests/fixtures/parity"))
    ap.add_argument("--only", nargs="*", default=None)
    a = ap.parse_args()
    print(f"torch {torch.__version__}  diffusers {diffusers.__version__}  transformers {transformers.__version__}  "
          f"numpy {np.__version__}")
    want = set(a.only) if a.only else set(CASES)
    unknown = want - set(CASES)
    assert not unknown, f"unknown case(s): {sorted(unknown)}"
    out = Path(a.out)
    assert list(CASES)[0] == SHARED and CASES[SHARED]["pipeline"] == "full"
    if SHARED not in want:
        # the linked cases use the shared folder as it is on disk; gen_case checks its weights equal this model
        assert (out / SHARED / "pipeline").is_dir(), f"{out / SHARED / 'pipeline'} missing: generate {SHARED} too"
    with tempfile.TemporaryDirectory() as td:
        vocab_dir = Path(td)
        gp.write_vocab_files(Path(a.bpe), vocab_dir)
        model = build_shared_model(vocab_dir)
        results = [gen_case(n, s, model, vocab_dir, out) for n, s in CASES.items() if n in want]
    summary(results, out)


if __name__ == "__main__":
    sys.exit(main())
