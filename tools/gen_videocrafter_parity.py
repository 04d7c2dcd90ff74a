#!/usr/bin/env python3
"""Generate the VideoCrafter2 (lvdm) parity cases: VideoCrafter's own `lvdm` code, tiny random weights, CPU.

Format: ../shared/docs/parity-fixtures.md, "VideoCrafter case (lvdm layout, as VideoCrafter2 ships)"; background in
docs/notes/videocrafter2-lvdm.md. Never run in CI. It needs a VideoCrafter source tree (AILab-CVC/VideoCrafter,
extracted, e.g. from the bare mirror:
    mkdir -p /tmp/vc_src && git --git-dir=/work/.mirror/AILab-CVC+VideoCrafter/repo archive HEAD | tar -x -C /tmp/vc_src)
and a reference venv outside the repository with torch 2.15.0, numpy, safetensors, PyYAML plus VideoCrafter's
imports: einops, omegaconf, open_clip_torch==2.22.0 (VideoCrafter's pin: its text resblocks are sequence-first),
pytorch_lightning, torchvision, kornia, opencv-python-headless (utils/utils.py imports cv2), transformers.

Run (CPU only, about a minute on 2 cores):

    /work/pyref/bin/python tools/gen_videocrafter_parity.py --vc-src /tmp/vc_src --out tests/fixtures/parity
    [--only videocrafter2-tiny videocrafter2-tiny-f16] [--evil-out tests/fixtures/videocrafter/evil]

Nothing from VideoCrafter is copied into this repository: its `lvdm` package is imported from --vc-src. The only
patch is DDIMSampler.register_buffer, which moves every tensor to "cuda"; here it keeps them where they are.

The model is built as lvdm builds it: an OmegaConf config in the layout of configs/inference_t2v_512_v2.0.yaml
(tiny unet/first_stage/cond_stage params, a tiny open_clip text tower registered with open_clip.add_model_config)
through utils.utils.instantiate_from_config. Every parameter is then re-drawn from a seeded generator (nothing
zero-initialised; fan-in scaled so activations stay O(1); the SpatialTransformers' attn2.to_v, the only path
of the text context, damped by CTX_GAIN so guidance 12 does not blow the latents up); the UNet's `out.2` and the
VAE decoder's `conv_out` are rescaled so eps ~ unit std and the video is O(1). The schedule buffers and
scale_arr stay as lvdm computes them. The reference is computed from a model freshly instantiated from the written config.yaml and loaded
(strict) from the written model.ckpt, as scripts/evaluation/funcs.py:load_model_checkpoint does; for the f16 case
that means the f16-rounded state dict (buffers included) copied into the f32 model.

Per case (<out>/<name>/):
    case.json                      {"kind": "videocrafter", prompt, negative_prompt, guidance_scale,
                                    num_inference_steps, grad_step_index, height, width, num_frames, fps, ddim_eta}
    model/config.yaml              the lvdm inference config (model.target lvdm.models.ddpm3d.LatentDiffusion)
    model/model.ckpt               torch.save({"state_dict": sd}) (f16 case; the f32 case's is deleted once checked)
    model/model.safetensors        the same flat state dict (f32 case only)
    model/open_clip_config.json    the text tower's open_clip config, named by cond_stage_config.params.arch
    expected.safetensors           (f32 unless noted)
        prompt_input_ids, negative_input_ids   [1,77] i64   open_clip.tokenize
        prompt_embeds, negative_prompt_embeds  [1,77,D]     model.get_learned_conditioning
        init_latents                           [1,4,F,h,w]  x_T (seeded randn)
        timesteps                              [N'] i64     visiting order (DDIMSampler.ddim_timesteps reversed)
        final_latents                          [1,4,F,h,w]  DDIMSampler(model).sample(...) as funcs.batch_ddim_sampling
        video                                  [1,3,F,H,W]  model.decode_first_stage_2DAE(final_latents), raw
        grad_latents_in                        [1,4,F,h,w]  latents entering step grad_step_index
        x0_pred                                [1,4,F,h,w]  pred_x0 returned by p_sample_ddim at that step
        reward_weight                          [1,3,F,H,W]  fixed random
        loss                                   []           -(reward_weight * decode_first_stage_2DAE(x0_pred)).sum()
        grad_negative_prompt_embeds            [1,77,D]     d loss / d negative_prompt_embeds (latents in constant)
        extra (this project's): eps_prompt, eps_negative [1,4,F,h,w]: model.apply_model at the grad step per branch

Also writes the malicious-checkpoint fixtures (see tools/gen_evil_checkpoints.py) unless --no-evil.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(2)
torch.use_deterministic_algorithms(True)

REPO = Path(__file__).resolve().parent.parent
sys.dont_write_bytecode = True

CTX_GAIN = 0.3  # SpatialTransformer attn2.to_v damping, see redraw()
OPEN_CLIP_ARCH = "reneg-tiny-openclip-text"
OPEN_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}

CASES = {
    "videocrafter2-tiny": dict(
        seed=1234, f16=False, prompt="a red fox running through snow",
        negative_prompt="blurry, low quality, watermark", guidance_scale=12.0, num_inference_steps=6,
        grad_step_index=2, height=48, width=64, num_frames=5, fps=28, ddim_eta=0.0),
    "videocrafter2-tiny-f16": dict(
        seed=5678, f16=True, prompt="a lighthouse at dusk, waves", negative_prompt="", guidance_scale=12.0,
        num_inference_steps=4, grad_step_index=1, height=48, width=64, num_frames=5, fps=16, ddim_eta=0.0),
}


def lvdm_config(frames: int, lat_h: int, lat_w: int) -> dict:
    """configs/inference_t2v_512_v2.0.yaml with tiny sub-model params."""
    return {"model": {
        "target": "lvdm.models.ddpm3d.LatentDiffusion",
        "params": {
            "linear_start": 0.00085, "linear_end": 0.012, "num_timesteps_cond": 1, "timesteps": 1000,
            "first_stage_key": "video", "cond_stage_key": "caption", "cond_stage_trainable": False,
            "conditioning_key": "crossattn", "image_size": [lat_h, lat_w], "channels": 4, "scale_by_std": False,
            "scale_factor": 0.18215, "use_ema": False, "uncond_type": "empty_seq", "use_scale": True,
            "scale_b": 0.7,
            "unet_config": {
                "target": "lvdm.modules.networks.openaimodel3d.UNetModel",
                "params": {
                    "in_channels": 4, "out_channels": 4, "model_channels": 32, "attention_resolutions": [1],
                    "num_res_blocks": 1, "channel_mult": [1, 2], "num_head_channels": 16, "transformer_depth": 1,
                    "context_dim": 32, "use_linear": True, "use_checkpoint": False, "temporal_conv": True,
                    "temporal_attention": True, "temporal_selfatt_only": True, "use_relative_position": False,
                    "use_causal_attention": False, "temporal_length": frames, "addition_attention": True,
                    "fps_cond": True, "dropout": 0.0,
                }},
            "first_stage_config": {
                "target": "lvdm.models.autoencoder.AutoencoderKL",
                "params": {
                    "embed_dim": 4, "monitor": "val/rec_loss",
                    "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3,
                                 "out_ch": 3, "ch": 32, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1,
                                 "attn_resolutions": [], "dropout": 0.0},
                    "lossconfig": {"target": "torch.nn.Identity"},
                }},
            "cond_stage_config": {
                "target": "lvdm.modules.encoders.condition.FrozenOpenCLIPEmbedder",
                "params": {"freeze": True, "layer": "penultimate", "arch": OPEN_CLIP_ARCH},
            },
        }}}


def setup_lvdm(vc_src: Path):
    sys.path.insert(0, str(vc_src))
    import open_clip
    from lvdm.models.samplers.ddim import DDIMSampler

    # The one CPU patch: DDIMSampler.register_buffer moves every tensor to cuda.
    def register_buffer_cpu(self, name, attr):
        setattr(self, name, attr)
    DDIMSampler.register_buffer = register_buffer_cpu

    d = Path(tempfile.mkdtemp(prefix="reneg-openclip-"))
    import atexit
    atexit.register(shutil.rmtree, d, True)
    (d / f"{OPEN_CLIP_ARCH}.json").write_text(json.dumps(OPEN_CLIP_CFG, indent=2))
    open_clip.add_model_config(d)
    assert OPEN_CLIP_ARCH in open_clip.list_models()
    return open_clip, DDIMSampler


def build_model(cfg_path: Path):
    from omegaconf import OmegaConf
    from utils.utils import instantiate_from_config
    config = OmegaConf.load(str(cfg_path))
    model = instantiate_from_config(config.model)
    return model.eval()


def load_checkpoint_like_lvdm(model, ckpt: Path):
    """scripts/evaluation/funcs.py:load_model_checkpoint, the non-DeepSpeed branch (strict)."""
    state = torch.load(str(ckpt), map_location="cpu")
    sd = state["state_dict"] if "state_dict" in state else state
    model.load_state_dict(sd, strict=True)
    return model


@torch.no_grad()
def redraw(model, seed: int, w_gain: float = 0.7, qk_gain: float = 2.0, ctx_gain: float = CTX_GAIN) -> None:
    """Re-draw every parameter (not the buffers) from one seeded generator, in named_parameters order."""
    g = torch.Generator().manual_seed(seed)
    owner = {}
    for mname, m in model.named_modules():
        for pname, _ in m.named_parameters(recurse=False):
            owner[f"{mname}.{pname}" if mname else pname] = (mname, m)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name, p in model.named_parameters():
        mname, m = owner[name]
        leaf = name.rsplit(".", 1)[-1]
        rn = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if name.endswith("token_embedding.weight"):
            p.copy_(0.5 * rn)
        elif name.endswith("positional_embedding"):
            p.copy_(0.1 * rn)
        elif leaf == "logit_scale":
            continue  # scalar, unused by the text path; keep open_clip's log(1/0.07)
        elif isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            p.copy_(1.0 + 0.1 * rn if leaf == "weight" else 0.1 * rn)
        elif p.dim() >= 2:
            fan_in = p[0].numel() if leaf != "text_projection" else p.shape[0]
            p.copy_(rn * (w_gain / math.sqrt(fan_in)))
            if mname.split(".")[-1] in ("to_q", "to_k"):
                p.mul_(qk_gain)
            if leaf == "in_proj_weight":  # open_clip MHA: q, k rows get the same gain
                d = p.shape[1]
                p[: 2 * d].mul_(qk_gain)
        else:
            p.copy_(0.05 * rn)
    # The text context enters only through the SpatialTransformers' attn2; damp its value path so that
    # guidance 12 x (c - u) does not dominate eps (keeps the latents from growing large over the DDIM steps).
    from lvdm.modules.attention import SpatialTransformer
    for m in model.modules():
        if isinstance(m, SpatialTransformer):
            for blk in m.transformer_blocks:
                blk.attn2.to_v.weight.mul_(ctx_gain)
    for n, p in model.named_parameters():
        if n.endswith("logit_scale"):
            continue
        assert not torch.equal(p, before[n]), f"not re-drawn: {n}"
        assert float(p.abs().max()) > 0.0, n


@torch.no_grad()
def calibrate(model, lat_shape, fps, seed):
    """UNet out.2 rescaled so eps ~ unit std on random latents; VAE decoder conv_out so the video std ~ 0.5."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(lat_shape, generator=g)
    ids_emb = model.get_learned_conditioning(["calibration prompt"])
    stds = []
    for t in (50, 500, 950):
        e = model.apply_model(x, torch.full((1,), t, dtype=torch.long), {"c_crossattn": [ids_emb], "fps": fps})
        stds.append(float(e.std()))
    s = float(np.mean(stds))
    out = model.model.diffusion_model.out[2]
    out.weight.div_(s)
    out.bias.div_(s)
    vid = model.decode_first_stage_2DAE(x)
    s2 = float(vid.std()) / 0.5
    co = model.first_stage_model.decoder.conv_out
    co.weight.div_(s2)
    co.bias.div_(s2)
    return s, s2


def flat_state_dict(model, half: bool) -> dict:
    sd = {}
    for k, v in model.state_dict().items():
        v = v.detach().clone().contiguous()
        sd[k] = v.half() if half and v.is_floating_point() else v
    return sd


def decode_2dae_grad(model, z):
    """decode_first_stage_2DAE without its @torch.no_grad (same ops, autograd on)."""
    t = z.shape[2]
    z = 1. / model.scale_factor * z
    return torch.cat([model.first_stage_model.decode(z[:, :, i]).unsqueeze(2) for i in range(t)], dim=2)


def reference(model, DDIMSampler, open_clip, case, seed):
    F, H, W = case["num_frames"], case["height"], case["width"]
    h, w = H // 8, W // 8
    g = case["guidance_scale"]
    fps = torch.tensor([case["fps"]]).long()
    exp = {}
    exp["prompt_input_ids"] = open_clip.tokenize([case["prompt"]]).long()
    exp["negative_input_ids"] = open_clip.tokenize([case["negative_prompt"]]).long()
    with torch.no_grad():
        pe = model.get_learned_conditioning([case["prompt"]])
        ne = model.get_learned_conditioning([case["negative_prompt"]])
    exp["prompt_embeds"], exp["negative_prompt_embeds"] = pe.clone(), ne.clone()
    gen = torch.Generator().manual_seed(seed + 1)
    init = torch.randn((1, 4, F, h, w), generator=gen)
    reward = torch.randn((1, 3, F, H, W), generator=gen)
    exp["init_latents"] = init.clone()
    exp["reward_weight"] = reward.clone()

    cond = {"c_crossattn": [pe], "fps": fps}
    uc = {key: cond[key] for key in cond.keys()}
    uc.update({"c_crossattn": [ne]})

    sampler = DDIMSampler(model)
    steps = []
    orig_p = sampler.p_sample_ddim
    orig_apply = model.apply_model
    eps_log = []

    def apply_rec(x, t, c, **kw):
        out = orig_apply(x, t, c, **kw)
        eps_log.append(out.detach().clone())
        return out

    def p_rec(x, c, t, index, **kw):
        eps_log.clear()
        x_in = x.detach().clone()
        x_prev, pred_x0 = orig_p(x, c, t, index, **kw)
        steps.append(dict(x_in=x_in, t=int(t[0]), index=index, x_prev=x_prev.clone(), pred_x0=pred_x0.clone(),
                          e_c=eps_log[0], e_u=eps_log[1]))
        return x_prev, pred_x0

    def run_sample(record):
        if record:
            sampler.p_sample_ddim = p_rec
            model.apply_model = apply_rec
        try:
            samples, _ = sampler.sample(S=case["num_inference_steps"], conditioning=cond, batch_size=1,
                                        shape=[4, F, h, w], verbose=False,
                                        unconditional_guidance_scale=g, unconditional_conditioning=uc,
                                        eta=case["ddim_eta"], temporal_length=F,
                                        conditional_guidance_scale_temporal=None, x_T=init.clone(),
                                        clean_cond=True)
        finally:
            sampler.p_sample_ddim = orig_p
            model.apply_model = orig_apply
        return samples

    final = run_sample(True)
    final2 = run_sample(False)
    assert torch.equal(final, final2), "two sample() runs differ"
    taus = torch.tensor([s["t"] for s in steps], dtype=torch.long)
    assert torch.equal(taus, torch.from_numpy(np.flip(sampler.ddim_timesteps).copy()).long()), taus
    for a, b in zip(steps[:-1], steps[1:]):
        assert torch.equal(a["x_prev"], b["x_in"])
    assert torch.equal(steps[-1]["x_prev"], final)
    exp["timesteps"] = taus
    exp["final_latents"] = final.clone()
    with torch.no_grad():
        exp["video"] = model.decode_first_stage_2DAE(final).clone()

    # replay of the documented DDIM update from the recorded eps, with the model's buffers
    acp, sarr = model.alphas_cumprod.float(), model.scale_arr.float()
    x = init.clone()
    for i, s in enumerate(steps):
        e = s["e_u"] + g * (s["e_c"] - s["e_u"])
        t = s["t"]
        tp = steps[i + 1]["t"] if i + 1 < len(steps) else 0
        x0 = (x - torch.sqrt(1 - acp[t]) * e) / torch.sqrt(acp[t]) / sarr[t]
        x = torch.sqrt(acp[tp]) * sarr[tp] * x0 + torch.sqrt(1 - acp[tp]) * e
    replay_diff = float((x - final).abs().max())
    print(f"    replay of the documented update vs sample(): max |diff| {replay_diff:.3e} "
          f"(max |final| {float(final.abs().max()):.3f})")
    assert replay_diff < 1e-4 * max(1.0, float(final.abs().max())), replay_diff

    # gradient step
    k = case["grad_step_index"]
    st = steps[k]
    x_in = st["x_in"]
    exp["grad_latents_in"] = x_in.clone()
    exp["eps_prompt"], exp["eps_negative"] = st["e_c"].clone(), st["e_u"].clone()
    index = st["index"]
    ts = torch.full((1,), st["t"], dtype=torch.long)
    neg = ne.clone().requires_grad_(True)
    e_c = model.apply_model(x_in, ts, cond)
    e_u = model.apply_model(x_in, ts, {"c_crossattn": [neg], "fps": fps})
    assert torch.equal(e_c.detach(), st["e_c"]) and torch.equal(e_u.detach(), st["e_u"])
    e_t = e_u + g * (e_c - e_u)
    size = (1, 1, 1, 1, 1)
    a_t = torch.full(size, sampler.ddim_alphas[index])
    sqrt_one_minus_at = torch.full(size, sampler.ddim_sqrt_one_minus_alphas[index])
    scale_t = torch.full(size, sampler.ddim_scale_arr[index])
    pred_x0 = (x_in - sqrt_one_minus_at * e_t) / a_t.sqrt()
    pred_x0 = pred_x0 / scale_t
    d = float((pred_x0.detach() - st["pred_x0"]).abs().max())
    print(f"    grad-enabled x0_pred vs p_sample_ddim's pred_x0: max |diff| {d:.3e}")
    assert d < 1e-6, d
    vid_x0 = decode_2dae_grad(model, pred_x0)
    with torch.no_grad():
        vref = model.decode_first_stage_2DAE(st["pred_x0"])
    d2 = float((vid_x0.detach() - vref).abs().max())
    assert d2 < 1e-5, d2
    loss = -(reward * vid_x0).sum()
    loss.backward()
    assert math.isfinite(float(loss.detach()))
    grad = neg.grad.detach().clone()
    assert float(grad.abs().max()) > 0.0
    exp["x0_pred"] = st["pred_x0"].clone()
    exp["loss"] = loss.detach().clone().reshape(())
    exp["grad_negative_prompt_embeds"] = grad
    return exp


def gen_case(name, spec, DDIMSampler, open_clip, out: Path):
    from omegaconf import OmegaConf
    seed = spec["seed"]
    case = {k: v for k, v in spec.items() if k not in ("seed", "f16")}
    F, H, W = case["num_frames"], case["height"], case["width"]
    cdir = out / name
    if cdir.exists():
        shutil.rmtree(cdir)
    mdir = cdir / "model"
    mdir.mkdir(parents=True)
    cfg = OmegaConf.create(lvdm_config(F, H // 8, W // 8))
    OmegaConf.save(cfg, str(mdir / "config.yaml"))
    (mdir / "open_clip_config.json").write_text(json.dumps(OPEN_CLIP_CFG, indent=2) + "\n")

    torch.manual_seed(seed)
    model = build_model(mdir / "config.yaml")
    redraw(model, seed)
    fps = torch.tensor([case["fps"]]).long()
    s1, s2 = calibrate(model, (1, 4, F, H // 8, W // 8), fps, seed + 7)
    print(f"  {name}: calibration: UNet out / {s1:.4f}, VAE conv_out / {s2:.4f}")
    sd = flat_state_dict(model, half=spec["f16"])
    assert "scale_arr" in sd and sd["scale_arr"].shape == (1400,)
    torch.save({"state_dict": sd}, str(mdir / "model.ckpt"))
    if not spec["f16"]:
        from safetensors.torch import save_file
        save_file(sd, str(mdir / "model.safetensors"))
    del model

    # the reference runs on a model built from the written files, as lvdm loads it
    torch.manual_seed(0)
    ref = build_model(mdir / "config.yaml")
    load_checkpoint_like_lvdm(ref, mdir / "model.ckpt")
    for p in ref.parameters():
        p.requires_grad_(False)
    if not spec["f16"]:
        from safetensors.torch import load_file
        st = load_file(str(mdir / "model.safetensors"))
        rsd = ref.state_dict()
        assert set(st) == set(rsd) and all(torch.equal(st[k], rsd[k]) for k in st)
    else:
        assert all(v.dtype == torch.float16 for v in torch.load(str(mdir / "model.ckpt"))["state_dict"].values()
                   if v.is_floating_point())
        print(f"    f16 buffers in use: alphas_cumprod[751] {float(ref.alphas_cumprod[751]):.9f}, "
              f"scale_arr[251] {float(ref.scale_arr[251]):.9f}")

    if not spec["f16"]:
        # Each file alone is a complete model: the f32 case keeps only the safetensors (the f16
        # case tests model.ckpt), which halves the fixture.
        (mdir / "model.ckpt").unlink()

    exp = reference(ref, DDIMSampler, open_clip, case, seed)
    exp = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in exp.items()}
    from safetensors.torch import save_file
    save_file(exp, str(cdir / "expected.safetensors"))
    (cdir / "case.json").write_text(json.dumps({"kind": "videocrafter", **case}, indent=2) + "\n")
    print(f"    timesteps {exp['timesteps'].tolist()}  loss {float(exp['loss']):.6f}")
    for k in sorted(exp):
        v = exp[k]
        if v.is_floating_point():
            print(f"    {k:30s} {str(list(v.shape)):22s} max|x| {float(v.abs().max()):10.4f}  "
                  f"std {float(v.std()) if v.numel() > 1 else 0.0:9.4f}")
        else:
            print(f"    {k:30s} {str(list(v.shape)):22s} {v.dtype}")
    total = 0
    for p in sorted(cdir.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
            print(f"    {p.relative_to(out)}  {p.stat().st_size:,} B")
    print(f"    {name}: total {total / 1e6:.2f} MB")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vc-src", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=REPO / "tests/fixtures/parity")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--evil-out", type=Path, default=REPO / "tests/fixtures/videocrafter/evil")
    ap.add_argument("--no-evil", action="store_true")
    a = ap.parse_args()
    open_clip, DDIMSampler = setup_lvdm(a.vc_src.resolve())
    import importlib.metadata
    import omegaconf
    print(f"torch {torch.__version__}  open_clip {importlib.metadata.version('open_clip_torch')}  "
          f"omegaconf {omegaconf.__version__}  numpy {np.__version__}")
    a.out.mkdir(parents=True, exist_ok=True)
    for name, spec in CASES.items():
        if a.only and name not in a.only:
            continue
        gen_case(name, spec, DDIMSampler, open_clip, a.out)
    if not a.no_evil:
        import importlib.util
        spec = importlib.util.spec_from_file_location("gen_evil_checkpoints",
                                                      Path(__file__).resolve().parent / "gen_evil_checkpoints.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mod.write_all(a.evil_out)


if __name__ == "__main__":
    main()
