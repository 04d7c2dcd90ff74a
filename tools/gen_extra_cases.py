#!/usr/bin/env python3
"""Extra stress pipeline cases in the parity-fixture format (/work/shared/docs/parity-fixtures.md).

Reuses the helpers of tools/gen_parity.py beside it (imported by path; nothing in the repo is modified and no
bytecode is written there). Writes <out>/<case>/{case.json, pipeline/, expected.safetensors}, with all standard
tensors plus the extra vae_encoder_{input,mean,logvar} tensors that gen_parity.py also writes.

    /work/pyref/bin/python tools/gen_extra_cases.py [--out /tmp/reneg-extra-cases] [--only NAME ...]
    RENEG_PARITY_DIRS=/tmp/reneg-extra-cases cargo test --release --test parity -- --nocapture

The cases (about 70 MB) are not committed; regenerate and run them after changing model code.

Conventions on top of gen_parity.py (same as it does for steps_offset):
  * StableDiffusionPipeline.__init__ rewrites scheduler steps_offset != 1 -> 1 and clip_sample True -> False.
    These cases keep the configured scheduler (re-registered after __init__), so scheduler_config.json on disk is
    the truth and the expected tensors follow it (sched-clip-sample relies on this: clip_sample stays true).
  * guidance_scale <= 1 still uses eps = u + g (c - u) with both branches (the pipeline's own __call__ skips
    guidance when g <= 1; the reload check then uses the project's reference loop instead of __call__).
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

import torch  # noqa: E402  (gen_parity already set threads=2 and deterministic algorithms)
from diffusers import DDIMScheduler, StableDiffusionPipeline  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

EOT = gp.EOT
SD_SCHED = gp.SD_SCHED
OUT_DEFAULT = Path(os.environ.get("RENEG_EXTRA_CASES", "/tmp/reneg-extra-cases"))


def vae2(ch=(16, 32), groups=8, **kw):
    n = len(ch)
    d = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
             down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
             block_out_channels=tuple(ch), layers_per_block=1, norm_num_groups=groups, scaling_factor=0.18215)
    d.update(kw)
    return d


def unet2(ch=(16, 32), groups=8, cad=16, **kw):
    d = dict(sample_size=16, in_channels=4, out_channels=4,
             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
             block_out_channels=tuple(ch), layers_per_block=1, attention_head_dim=8, norm_num_groups=groups,
             cross_attention_dim=cad, use_linear_projection=False)
    d.update(kw)
    return d


def text(hidden=16, intermediate=29, layers=2, heads=2, act="quick_gelu", ln_eps=1e-5):
    return dict(hidden=hidden, intermediate=intermediate, layers=layers, heads=heads, act=act, ln_eps=ln_eps)


CASES = {
    # 1. Downsample2D with padding=0 (F.pad (0,1,0,1) then stride-2 conv, no conv padding), mid-block
    #    output_scale_factor sqrt(2)-ish, GroupNorm eps 1e-6 in the UNet; non-square latents 4x6 -> 2x3 at level 1
    "unet-dspad0": dict(
        seed=4100, text=text(hidden=16, act="quick_gelu"),
        unet=unet2(ch=(32, 48), groups=16, downsample_padding=0, mid_block_scale_factor=1.414, norm_eps=1e-6),
        vae=vae2(), sched=dict(SD_SCHED, prediction_type="epsilon", timestep_spacing="leading"),
        pad="!", tokenizer_layout="vocab", dtype=None,
        case=dict(prompt="a lighthouse at night! stormy sea", negative_prompt="", guidance_scale=6.0,
                  num_inference_steps=4, grad_step_index=1, height=32, width=48)),
    # 2. two transformer blocks per Transformer2DModel, per-level layers_per_block [1, 2] (up blocks get [3, 2]),
    #    attention at both levels, linear proj, text width 24 = cross_attention_dim, per-level head dims
    "unet-tlayers2": dict(
        seed=4200, text=text(hidden=24, intermediate=40, heads=3, act="gelu"),
        unet=unet2(ch=(16, 32), groups=8, cad=24,
                   down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                   layers_per_block=[1, 2], transformer_layers_per_block=2, attention_head_dim=[4, 8],
                   use_linear_projection=True),
        vae=vae2(), sched=dict(SD_SCHED, prediction_type="epsilon", timestep_spacing="leading"),
        pad=EOT, tokenizer_layout="json", dtype=None,
        case=dict(prompt="two robots playing chess in a park", negative_prompt="blurry", guidance_scale=7.5,
                  num_inference_steps=3, grad_step_index=2, height=32, width=32)),
    # 3. prediction_type "sample" with clip_sample (range 1.5): x0 is clamped, pred_epsilon uses the UNclamped x0;
    #    set_alpha_to_one True (last leading step lands below 0)
    "sched-clip-sample": dict(
        seed=4300, text=text(hidden=16, heads=4, act="gelu"),
        unet=unet2(), vae=vae2(),
        sched=dict(SD_SCHED, prediction_type="sample", timestep_spacing="leading", clip_sample=True,
                   clip_sample_range=1.5, set_alpha_to_one=True),
        pad="!", tokenizer_layout="json", dtype=None,
        case=dict(prompt="a bowl of ramen, studio photo!!", negative_prompt="low quality!", guidance_scale=1.5,
                  num_inference_steps=5, grad_step_index=2, height=32, width=32)),
    # 4. zero-terminal-SNR betas (alphas_cumprod[999] == 0), cosine schedule, v-prediction, trailing spacing;
    #    the gradient is taken at the very first step t=999 where x0 = -v exactly
    "sched-zsnr-cos": dict(
        seed=4410, text=text(hidden=16, act="quick_gelu"),
        unet=unet2(upcast_attention=True, use_linear_projection=True), vae=vae2(),
        sched=dict(SD_SCHED, beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True,
                   prediction_type="v_prediction", timestep_spacing="trailing"),
        pad=EOT, tokenizer_layout="vocab", dtype=None,
        case=dict(prompt="a foggy forest road at dawn", negative_prompt="", guidance_scale=5.0,
                  num_inference_steps=4, grad_step_index=0, height=32, width=32)),
    # 5. VAE: 2 resnets per level (3 per decoder level), no mid-block attention, no quant_conv / post_quant_conv;
    #    24x24 px -> 12x12 latents -> 6x6 in the UNet
    "vae-lpb2-noquant": dict(
        seed=4500, text=text(hidden=16, heads=4, act="quick_gelu"),
        unet=unet2(), vae=vae2(layers_per_block=2, mid_block_add_attention=False, use_quant_conv=False,
                               use_post_quant_conv=False),
        sched=dict(SD_SCHED, prediction_type="epsilon", timestep_spacing="leading"),
        pad="!", tokenizer_layout="vocab", dtype=None,
        case=dict(prompt="pixel art of a castle!", negative_prompt="", guidance_scale=7.0,
                  num_inference_steps=3, grad_step_index=1, height=24, width=24)),
    # 6a. text encoder gelu_new (tanh approx.) + layer_norm_eps 1e-6; guidance 1.0 (gradient is exactly zero)
    "te-gelunew-g1": dict(
        seed=4600, text=text(hidden=16, act="gelu_new", ln_eps=1e-6),
        unet=unet2(), vae=vae2(), sched=dict(SD_SCHED, prediction_type="epsilon", timestep_spacing="leading"),
        pad=EOT, tokenizer_layout="json", dtype=None,
        case=dict(prompt="a watercolor fox", negative_prompt="ugly, deformed", guidance_scale=1.0,
                  num_inference_steps=3, grad_step_index=1, height=32, width=32)),
    # 6b. gelu_pytorch_tanh + layer_norm_eps 1e-6; guidance 0.5 with eps = u + 0.5 (c - u) (both branches)
    "te-tanh-g05": dict(
        seed=4650, text=text(hidden=16, act="gelu_pytorch_tanh", ln_eps=1e-6),
        unet=unet2(), vae=vae2(), sched=dict(SD_SCHED, prediction_type="v_prediction", timestep_spacing="trailing"),
        pad="!", tokenizer_layout="vocab", dtype=None,
        case=dict(prompt="an origami crane on a desk", negative_prompt="dark!!", guidance_scale=0.5,
                  num_inference_steps=3, grad_step_index=1, height=32, width=32)),
    # 7. every weight stored as bfloat16 on disk (expected computed in f32 from the bf16-rounded weights);
    #    SD2-like UNet otherwise
    "bf16-weights": dict(
        seed=4720, text=text(hidden=24, intermediate=36, heads=3, act="gelu"),
        unet=unet2(ch=(32, 64), groups=16, cad=24, attention_head_dim=[2, 4], use_linear_projection=True,
                   upcast_attention=True),
        vae=vae2(ch=(16, 32), groups=8),
        sched=dict(SD_SCHED, prediction_type="v_prediction", timestep_spacing="trailing"),
        pad="!", tokenizer_layout="json", dtype="bf16",
        case=dict(prompt="a cozy cabin in the snow!!", negative_prompt="blurry, low quality", guidance_scale=5.0,
                  num_inference_steps=4, grad_step_index=2, height=32, width=32)),
    # 8. text_encoder/model.safetensors in the transformers-4 key layout: every key prefixed "text_model." plus the
    #    int64 [1,77] buffer text_model.embeddings.position_ids (as SD checkpoints on the hub have)
    "te-v4-keys": dict(
        seed=4800, text=text(hidden=16, act="quick_gelu"),
        unet=unet2(), vae=vae2(), sched=dict(SD_SCHED, prediction_type="epsilon", timestep_spacing="leading"),
        pad=EOT, tokenizer_layout="vocab", dtype=None, te_v4_keys=True,
        case=dict(prompt="a vintage car on route 66", negative_prompt="", guidance_scale=7.5,
                  num_inference_steps=3, grad_step_index=1, height=32, width=32)),
    # 9. SD1.5's real block pattern at tiny width: 4-level UNet (CrossAttn x3 + Down), layers_per_block 2,
    #    attention_head_dim 8 (int), and the real 4-level VAE with 2 resnets per level: 64x64 px -> 8x8 latents
    #    -> 1x1 at the UNet's innermost level
    "sd15-4level": dict(
        seed=4900, text=text(hidden=16, act="quick_gelu"),
        unet=dict(sample_size=8, in_channels=4, out_channels=4,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                  block_out_channels=(16, 16, 32, 32), layers_per_block=2, attention_head_dim=8,
                  norm_num_groups=8, cross_attention_dim=16, use_linear_projection=False),
        vae=vae2(ch=(16, 16, 32, 32), groups=8, layers_per_block=2, sample_size=64),
        sched=dict(SD_SCHED, prediction_type="epsilon", timestep_spacing="leading"),
        pad=EOT, tokenizer_layout="json", dtype=None,
        case=dict(prompt="a portrait of an old sailor, oil on canvas", negative_prompt="", guidance_scale=7.5,
                  num_inference_steps=3, grad_step_index=1, height=64, width=64)),
}


def build_text_encoder(c: dict, seed: int) -> CLIPTextModel:
    """gen_parity.build_text_encoder, with layer_norm_eps configurable."""
    cfg = CLIPTextConfig(
        vocab_size=49408, hidden_size=c["hidden"], intermediate_size=c["intermediate"],
        num_hidden_layers=c["layers"], num_attention_heads=c["heads"], max_position_embeddings=77,
        hidden_act=c["act"], layer_norm_eps=c["ln_eps"], projection_dim=c["hidden"],
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )
    torch.manual_seed(seed)
    te = CLIPTextModel(cfg).eval()
    gp.o1_init(te, seed)
    return te


@torch.no_grad()
def round_to(dtype, *models):
    for m in models:
        for p in m.parameters():
            p.copy_(p.to(dtype).float())


def rel(a, b):
    b = b.double()
    d = (a.double() - b).abs().max().item()
    m = b.abs().max().item()
    return d / m if m > 0 else d


def check_gradient_f64(pipe, case, exp):
    """gen_parity.check_gradient_f64, also valid when the gradient is identically zero (guidance 1)."""
    g = case["guidance_scale"]
    if g != 1.0:
        return gp.check_gradient_f64(pipe, case, exp)
    g32 = exp["grad_negative_prompt_embeds"]
    assert torch.count_nonzero(g32) == 0, "guidance 1: d(u + 1*(c-u))/du == 0 exactly in autograd"
    unet = copy.deepcopy(pipe.unet).double()
    vae = copy.deepcopy(pipe.vae).double()
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(case["num_inference_steps"])
    t = exp["timesteps"][case["grad_step_index"]]
    args = (exp["grad_latents_in"].double(), t)
    pos, rw = exp["prompt_embeds"].double(), exp["reward_weight"].double()

    def f(neg):
        return gp.grad_step_loss(unet, vae, sched, *args, neg, pos, g, rw, vae.config.scaling_factor)[0]

    with torch.no_grad():
        base = exp["negative_prompt_embeds"].double()
        loss64 = f(base).item()
        worst = 0.0
        for i in (0, 5 * 77 // 2, base.numel() - 1):
            e = torch.zeros_like(base).flatten()
            e[i] = 1e-3
            worst = max(worst, abs((f(base + e.view_as(base)) - f(base - e.view_as(base))).item()) / 2e-3)
    rl = abs(loss64 - exp["loss"].item()) / abs(loss64)
    print(f"   grad check (g=1): f32 grad all zero; loss f32 vs f64 rel {rl:.2e}; |fd64| max {worst:.2e} "
          f"(|loss| {abs(loss64):.2e})")
    assert rl < 1e-5 and worst < 1e-9 * max(1.0, abs(loss64)), (rl, worst)


def to_v4_text_encoder_keys(path: Path) -> None:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    sd = load_file(str(path))
    assert not any(k.startswith("text_model.") for k in sd), "expected the transformers-5 (unprefixed) layout"
    new = {"text_model." + k: v for k, v in sd.items()}
    new["text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.int64)[None]
    save_file(new, str(path), metadata=meta or {"format": "pt"})


def gen_case(name: str, spec: dict, vocab_dir: Path, out: Path) -> dict:
    print(f"== {name}")
    seed, case = spec["seed"], spec["case"]
    te = build_text_encoder(spec["text"], seed + 1)
    unet = gp.build_unet(spec["unet"], seed + 2)
    vae = gp.build_vae(spec["vae"], seed + 3)
    vsf = 2 ** (len(spec["vae"]["block_out_channels"]) - 1)
    lat_shape = (1, 4, case["height"] // vsf, case["width"] // vsf)
    s_unet, s_vae = gp.calibrate(unet, vae, te, lat_shape, spec["vae"]["scaling_factor"], seed + 4)
    print(f"   calibration: unet conv_out /{s_unet:.3f}, vae decoder conv_out /{s_vae:.3f}")
    dtype = {None: None, "f16": torch.float16, "bf16": torch.bfloat16}[spec["dtype"]]
    if dtype is not None:
        round_to(dtype, te, unet, vae)
    for k, v in spec["unet"].items():  # diffusers must have taken every kwarg as given
        got = unet.config[k]
        assert (list(got) if isinstance(got, (list, tuple)) else got) == (list(v) if isinstance(v, (list, tuple)) else v), (k, got, v)
    for k, v in spec["vae"].items():
        got = vae.config[k]
        assert (list(got) if isinstance(got, (list, tuple)) else got) == (list(v) if isinstance(v, (list, tuple)) else v), (k, got, v)
    assert te.config.hidden_act == spec["text"]["act"] and te.config.layer_norm_eps == spec["text"]["ln_eps"]

    sched = DDIMScheduler(**spec["sched"])
    tok = gp.load_tokenizer(vocab_dir, spec["pad"])
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    want_cfg = dict(DDIMScheduler(**spec["sched"]).config)
    if dict(pipe.scheduler.config) != want_cfg:
        changed = {k: (want_cfg[k], pipe.scheduler.config[k]) for k in want_cfg if want_cfg[k] != pipe.scheduler.config[k]}
        pipe.register_modules(scheduler=DDIMScheduler(**spec["sched"]))
        print(f"   scheduler: StableDiffusionPipeline.__init__ rewrote {changed} (configured, rewritten); "
              f"re-registered the configured scheduler")
    assert dict(pipe.scheduler.config) == want_cfg

    exp = gp.reference(pipe, case, seed + 5)
    exp.update(gp.vae_encoder_reference(pipe.vae, case, seed + 6))
    with torch.no_grad():  # loss = sum of +- terms: refuse seeds where it cancels badly (ill-conditioned in f32)
        dec = pipe.vae.decode(exp["x0_pred"] / pipe.vae.config.scaling_factor).sample
        cancel = ((exp["reward_weight"] * dec).abs().sum() / exp["loss"].abs()).item()
    print(f"   loss {exp['loss'].item():+.4f}; sum|terms| / |loss| = {cancel:.0f} (sqrt(#terms) = {dec.numel() ** 0.5:.0f})")
    assert cancel < 150, "loss cancels too much for an f32 parity check: pick another seed"
    gp.check_forward_f64(pipe, case, exp)
    check_gradient_f64(pipe, case, exp)
    if spec["sched"].get("clip_sample"):
        r = spec["sched"]["clip_sample_range"]
        frac = (exp["x0_pred"].abs() >= r).float().mean().item()
        print(f"   clip_sample: {100 * frac:.1f}% of x0_pred at +-{r} at the grad step")
        assert frac > 0.01, "clip must actually bite"

    cdir = out / name
    if cdir.exists():
        shutil.rmtree(cdir)
    cdir.mkdir(parents=True)
    with open(cdir / "case.json", "w") as f:
        json.dump(case, f, indent=2, ensure_ascii=True)
        f.write("\n")
    save_file(exp, str(cdir / "expected.safetensors"))
    pdir = cdir / "pipeline"
    if dtype is not None:
        pipe.to(dtype)
    pipe.save_pretrained(str(pdir), safe_serialization=True)
    if dtype is not None:
        pipe.to(torch.float32)
    gp.fix_tokenizer_layout(pdir / "tokenizer", vocab_dir, spec)
    te_file = pdir / "text_encoder" / "model.safetensors"
    if spec.get("te_v4_keys"):
        to_v4_text_encoder_keys(te_file)
    with safe_open(str(te_file), "pt") as f:
        keys = list(f.keys())
        print(f"   text_encoder keys: {len(keys)}, e.g. {keys[0]!r}; dtypes "
              f"{sorted({str(f.get_tensor(k).dtype) for k in keys})}")
    if dtype is not None:
        for sub, fn in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model")):
            sd = load_file(str(pdir / sub / f"{fn}.safetensors"))
            assert {v.dtype for v in sd.values()} == {dtype}, (sub, {v.dtype for v in sd.values()})

    # ---- reload from disk
    re_pipe = StableDiffusionPipeline.from_pretrained(str(pdir), dtype=torch.float32)
    re_pipe.set_progress_bar_config(disable=True)
    disk_sched = DDIMScheduler.from_pretrained(str(pdir / "scheduler"))
    def public(c):
        return {k: v for k, v in dict(c).items() if not k.startswith("_")}

    assert public(disk_sched.config) == public(want_cfg), "scheduler_config.json must hold the configured values"
    if public(re_pipe.scheduler.config) != public(want_cfg):
        print("   reload: from_pretrained's __init__ rewrote the scheduler again; using scheduler_config.json as is")
    re_pipe.register_modules(scheduler=disk_sched)
    if spec.get("te_v4_keys"):
        te2, info = CLIPTextModel.from_pretrained(str(pdir / "text_encoder"), output_loading_info=True)
        print(f"   transformers {gp.transformers.__version__} CLIPTextModel.from_pretrained on the v4-layout file: "
              f"missing {sorted(info['missing_keys'])} unexpected {sorted(info['unexpected_keys'])}")
        assert not info["missing_keys"] and not info["mismatched_keys"]
        for (k1, p1), (k2, p2) in zip(pipe.text_encoder.state_dict().items(), te2.state_dict().items()):
            assert k1 == k2 and torch.equal(p1, p2), k1
    rtok = re_pipe.tokenizer
    for t in gp.tokenizer_prompts():
        assert gp.ids77(rtok, t) == gp.ids77(pipe.tokenizer, t), ascii(t)
    n_untrunc = len(rtok(case["prompt"]).input_ids)
    assert n_untrunc <= gp.MAX_LEN
    print(f"   reloaded tokenizer {type(rtok).__name__} pad {rtok.pad_token!r}={rtok.pad_token_id}: "
          f"same ids on all {len(gp.tokenizer_prompts())} tokenizer prompts; files "
          f"{sorted(p.name for p in (pdir / 'tokenizer').iterdir())}")
    for mem, disk in ((pipe.unet, re_pipe.unet), (pipe.text_encoder, re_pipe.text_encoder), (pipe.vae, re_pipe.vae)):
        sm, sd_ = mem.state_dict(), disk.state_dict()
        assert sm.keys() == sd_.keys()
        for k in sm:
            assert sd_[k].dtype == sm[k].dtype and torch.equal(sm[k], sd_[k]), k
    # the project's reference loop on the reloaded pipeline reproduces every expected tensor
    exp2 = gp.reference(re_pipe, case, seed + 5)
    exp2.update(gp.vae_encoder_reference(re_pipe.vae, case, seed + 6))
    assert exp2.keys() == exp.keys()
    worst = max(rel(exp2[k], exp[k]) for k in exp)
    print(f"   reload + reference(): max rel diff over all {len(exp)} tensors {worst:.1e}")
    assert worst < 1e-6, {k: rel(exp2[k], exp[k]) for k in exp}
    if case["guidance_scale"] >= 1.0:
        with torch.no_grad():
            lat = re_pipe(prompt=case["prompt"], negative_prompt=case["negative_prompt"], height=case["height"],
                          width=case["width"], num_inference_steps=case["num_inference_steps"],
                          guidance_scale=case["guidance_scale"], eta=0.0, latents=exp["init_latents"].clone(),
                          output_type="latent").images
        r = rel(lat, exp["final_latents"])
        note = " (g=1: __call__ runs the conditional branch only)" if case["guidance_scale"] == 1.0 else ""
        print(f"   reload + StableDiffusionPipeline.__call__ final_latents rel err {r:.2e}{note}")
        assert r < 1e-4, r
    else:
        print("   StableDiffusionPipeline.__call__ skipped: it does no guidance for g <= 1, the format does")
    with torch.no_grad():
        dist = re_pipe.vae.encode(exp["vae_encoder_input"]).latent_dist
    r = max(rel(dist.mean, exp["vae_encoder_mean"]), rel(dist.logvar, exp["vae_encoder_logvar"]))
    print(f"   reload + AutoencoderKL.encode mean/logvar rel err {r:.2e}")
    assert r < 1e-5
    return {"name": name, "exp": exp, "size": gp.dir_size(cdir), "dir": cdir, "files": {
        str(p.relative_to(cdir)): p.stat().st_size for p in sorted(cdir.rglob("*")) if p.is_file()}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bpe", default=os.environ.get(
        "RENEG_CLIP_BPE", str(gp.REPO.parent / "shared/data/clip-tokenizer/bpe_simple_vocab_16e6.txt.gz")))
    ap.add_argument("--out", default=str(OUT_DEFAULT))
    ap.add_argument("--only", nargs="*", default=None)
    a = ap.parse_args()
    print(f"torch {torch.__version__}  diffusers {gp.diffusers.__version__}  transformers "
          f"{gp.transformers.__version__}  safetensors {gp.safetensors.__version__}; helpers from {_GP_PATH}")
    want = set(a.only) if a.only else set(CASES)
    unknown = want - set(CASES)
    assert not unknown, unknown
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as td:
        vocab_dir = Path(td)
        gp.write_vocab_files(Path(a.bpe), vocab_dir)
        results = [gen_case(n, s, vocab_dir, out) for n, s in CASES.items() if n in want]
    gp.summary(results)
    total = sum(gp.dir_size(p) for p in out.iterdir() if p.is_dir())
    print(f"\ntotal {out}: {total / 1e6:.1f} MB")


if __name__ == "__main__":
    sys.exit(main())
