#!/usr/bin/env python3
"""Reward-model reference fixtures: tiny OpenCLIP / transformers-CLIP / LAION-aesthetic reward cases, the real
aesthetic head on fixed inputs, and the differentiable image-preprocessing reference.

Format of the reward cases: ../shared/docs/parity-fixtures.md ("Reward case" sections) -- followed exactly.
Reward models in ReNeg: ../shared/docs/RENEG.md.

Reference stack (pinned; a venv OUTSIDE the repo, never in CI), the one of tools/gen_parity.py plus torchvision/Pillow:

    python3 -m venv /work/pyref
    /work/pyref/bin/pip install torch==2.15.0 diffusers==0.42.1 transformers==5.23.0 safetensors==0.8.0 numpy \
        open-clip-torch==3.3.0 torchvision pillow          # here: torchvision 0.29.2, Pillow 13.0.0, ftfy, regex

Run (CPU only, 2 threads, about a minute):

    /work/pyref/bin/python tools/gen_reward_fixtures.py [--out tests/fixtures] [--only NAME ...]
        [--bpe PATH] [--aesthetic-head PATH]

    --out   fixture root (default <repo>/tests/fixtures)
    --only  some of: reward-openclip-gelu reward-openclip-quickgelu reward-hfclip reward-aesthetic aesthetic-head
            preprocess   (preprocess needs reward-openclip-gelu in the same run for its score-effect report)
    --bpe   CLIP BPE merges, open_clip format (default ../shared/data/clip-tokenizer/bpe_simple_vocab_16e6.txt.gz,
            byte-identical to the copy bundled in open_clip)
    --aesthetic-head  the real LAION aesthetic v2 head (default ../shared/data/aesthetic-v2/sac+logos+ava1-l14-linearMSE.pth)

What it writes (deterministic: fixed seeds, torch.use_deterministic_algorithms, 2 threads, f32 on CPU):

    <out>/parity/reward-openclip-gelu/        kind "openclip": open_clip.model.CLIP, quick_gelu false (nn.GELU, erf form,
        case.json                             as HPSv2's ViT-H-14), vision 32px / patch 8 / width 32 / 2 heads / 2 layers,
        reward/open_clip_config.json          text width 32 / 2 heads / 2 layers / vocab 49408, embed_dim 16;
        reward/open_clip_model.safetensors    state_dict, open_clip key names
        reward/open_clip_model.pt             the same state_dict as torch.save({"state_dict": sd}) (zip format), the
                                              layout of HPSv2's HPS_v2*_compressed.pt (hpsv2 does
                                              model.load_state_dict(torch.load(cp)["state_dict"]); open_clip's
                                              load_checkpoint accepts it too)
        expected.safetensors                  reward_text_ids [1,77] i64 (open_clip.get_tokenizer("ViT-H-14"), pad 0),
                                              reward_pixel_values [1,3,S,S], reward_image_embeds / reward_text_embeds
                                              [1,E] (L2-normalised), reward_score [1] = dot product (HPS before x100),
                                              grad_reward_pixel_values [1,3,S,S] = d reward_score / d pixel values
    <out>/parity/reward-openclip-quickgelu/   the same kind, quick_gelu true, 28px / patch 7 / width 48 / head_width 16
                                              (3 heads) / 3 layers, text width 16, embed_dim 24, a prompt over 77 tokens
    <out>/parity/reward-hfclip/               kind "hf-clip": transformers CLIPModel (gelu), saved with save_pretrained,
                                              tokenizer files (vocab.json + merges.txt layout, pad <|endoftext|>) in
                                              reward/; text eos_token_id 2 (legacy argmax pooling, as PickScore's
                                              ViT-H-14 config); logit_scale 4.6052; score = exp(logit_scale) * cosine
    <out>/parity/reward-aesthetic/            kind "aesthetic": CLIPVisionModelWithProjection (quick_gelu) in reward/clip/,
                                              reward/head.safetensors = tiny Linear chain 16-32-16-8-4-1 with the real
                                              head's key names layers.{0,2,4,6,7}; score = head(normalize(image_embeds))
    <out>/reward/aesthetic_head_expected.safetensors   inputs [4,768] (seeded, L2-normalised) -> outputs [4,1] of the
                                              REAL head (Linear/Dropout chain, no activations, eval mode)
    <out>/reward/aesthetic_head_expected.json key names/shapes/dtypes of the real head file + notes
    <out>/reward/preprocess.safetensors       differentiable preprocessing reference, cases i = 0..6 (see
    <out>/reward/preprocess.json              preprocess.json): input_i, resize_i (torchvision resize of the shorter side to
                                              S, bicubic, antialias=True, float tensor path), crop_i (center_crop S),
                                              norm_i (CLIP mean/std), pil_i (open_clip's real eval transform on the uint8 PIL
                                              image), R_i (seeded weights [1,3,S,S]), grad_norm_i = d sum(R_i*norm_i)/d input_i

Model weights: the default init is replaced by a seeded "O(1)" init (linear/conv N(0, 0.8^2/fan_in), q/k rows x2 so
attention is not uniform, random LayerNorm affines and biases so ignoring one is detected, embeddings N(0, 0.5^2)).
Pixel values: torch.rand image in [0,1] normalised with the CLIP mean/std (so about [-1.8, 2.1]).

Checks printed (and asserted): each case recomputed in float64 agrees with the f32 expected tensors within 1e-5
relative (max|a-b| / max|b|, gradients included); central finite differences in float64 agree with the float64
autograd pixel gradient; the saved files reload (open_clip load_checkpoint for both .safetensors and .pt,
CLIPModel/CLIPVisionModelWithProjection.from_pretrained, CLIPTokenizer.from_pretrained) and reproduce the tensors;
an independent float64 implementation of the antialiased bicubic resize (Pillow's algorithm) matches torch.
"""
from __future__ import annotations

import argparse
import collections
import copy
import hashlib
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
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

torch.set_num_threads(2)
torch.use_deterministic_algorithms(True)

import open_clip  # noqa: E402
import PIL  # noqa: E402
import safetensors  # noqa: E402
import torchvision  # noqa: E402
import torchvision.transforms.functional as TF  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torchvision.transforms import InterpolationMode  # noqa: E402
from transformers import (CLIPConfig, CLIPModel, CLIPTokenizer, CLIPVisionConfig,  # noqa: E402
                          CLIPVisionModelWithProjection)

REPO = Path(__file__).resolve().parents[1]
MAX_LEN = 77
EOT = gp.EOT
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TOL_F64 = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b| (b the float64 reference)."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300)).item()


def dir_files(d: Path) -> dict:
    return {str(p.relative_to(d)): p.stat().st_size for p in sorted(d.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------------
# Seeded O(1) init for open_clip and transformers CLIP modules
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def o1_init(model: nn.Module, seed: int, w_gain: float = 0.8, qk_gain: float = 2.0, emb_std: float = 0.5) -> None:
    g = torch.Generator().manual_seed(seed)

    def rn(t):
        return torch.randn(t.shape, generator=g, dtype=torch.float32)

    done = set()
    for mname, m in model.named_modules():
        pre = mname + "." if mname else ""
        if isinstance(m, nn.MultiheadAttention):  # open_clip: packed in_proj [3E, E] = q;k;v rows
            E = m.in_proj_weight.shape[1]
            m.in_proj_weight.copy_(rn(m.in_proj_weight) * (w_gain / math.sqrt(E)))
            m.in_proj_weight[: 2 * E].mul_(qk_gain)
            m.in_proj_bias.copy_(0.05 * rn(m.in_proj_bias))
            done |= {pre + "in_proj_weight", pre + "in_proj_bias"}
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            m.weight.copy_(rn(m.weight) * (w_gain / math.sqrt(m.weight[0].numel())))
            if mname.split(".")[-1] in ("q_proj", "k_proj"):
                m.weight.mul_(qk_gain)
            done.add(pre + "weight")
            if m.bias is not None:
                m.bias.copy_(0.05 * rn(m.bias))
                done.add(pre + "bias")
        elif isinstance(m, nn.LayerNorm):
            m.weight.copy_(1.0 + 0.1 * rn(m.weight))
            m.bias.copy_(0.1 * rn(m.bias))
            done |= {pre + "weight", pre + "bias"}
        elif isinstance(m, nn.Embedding):
            m.weight.copy_(emb_std * rn(m.weight))
            done.add(pre + "weight")
    for name, p in model.named_parameters():
        if name in done:
            continue
        leaf = name.split(".")[-1]
        if leaf in ("proj", "text_projection"):  # open_clip [in, out] matrices, used as x @ P
            p.copy_(rn(p) * (w_gain / math.sqrt(p.shape[0])))
        elif leaf in ("class_embedding", "positional_embedding"):
            p.copy_(emb_std * rn(p))
        elif leaf == "logit_scale":
            pass
        else:
            raise RuntimeError(f"o1_init: unhandled parameter {name}")


def seeded_pixels(S: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    img = torch.rand((1, 3, S, S), generator=g, dtype=torch.float32)
    return TF.normalize(img, CLIP_MEAN, CLIP_STD)


# --------------------------------------------------------------------------------------------------
# Generic reward case machinery: score_fn(model, pixels, ids) -> (image_embeds, text_embeds|None, score[1])
# --------------------------------------------------------------------------------------------------
def compute(model, score_fn, pixels, ids):
    x = pixels.clone().requires_grad_(True)
    ie, te, score = score_fn(model, x, ids)
    (gx,) = torch.autograd.grad(score.sum(), x)
    return ie.detach(), (te.detach() if te is not None else None), score.detach(), gx.detach()


def check_f64(model, score_fn, exp, ids, name):
    m64 = copy.deepcopy(model).double()
    ie, te, sc, gx = compute(m64, score_fn, exp["reward_pixel_values"].double(), ids)
    r = {"reward_image_embeds": rel(exp["reward_image_embeds"], ie), "reward_score": rel(exp["reward_score"], sc),
         "grad_reward_pixel_values": rel(exp["grad_reward_pixel_values"], gx)}
    if te is not None:
        r["reward_text_embeds"] = rel(exp["reward_text_embeds"], te)
    print(f"   f32 vs f64 rel err: " + ", ".join(f"{k} {v:.1e}" for k, v in r.items()))
    assert max(r.values()) < TOL_F64, (name, r)
    # finite differences (f64) on a few pixel entries
    flat = gx.abs().flatten()
    gen = torch.Generator().manual_seed(1234)
    idx = [int(flat.argmax()), int(torch.argsort(flat)[len(flat) // 2])] + \
        torch.randint(0, flat.numel(), (3,), generator=gen).tolist()
    h = 1e-6
    worst = 0.0
    base = exp["reward_pixel_values"].double()
    with torch.no_grad():
        for i in idx:
            e = torch.zeros_like(base).flatten()
            e[i] = h
            e = e.view_as(base)
            fd = (score_fn(m64, base + e, ids)[2] - score_fn(m64, base - e, ids)[2]).item() / (2 * h)
            worst = max(worst, abs(fd - gx.flatten()[i].item()) / flat.max().item())
    print(f"   finite differences (f64, h={h:g}, {len(idx)} entries): worst |fd - autograd| / max|g| = {worst:.1e}")
    assert worst < 1e-6, (name, worst)
    return r, worst


def describe(exp):
    for k, v in exp.items():
        if v.dtype == torch.int64:
            s = f"int64 [{v.min().item()}, {v.max().item()}]"
        else:
            s = (f"f32 [{v.min().item():+.4g}, {v.max().item():+.4g}]"
                 + (f" std {v.std().item():.4g}" if v.numel() > 1 else ""))
        print(f"   {k:26s} {str(list(v.shape)):14s} {s}")


def write_case(out: Path, name: str, case_json: dict, exp: dict) -> Path:
    cdir = out / "parity" / name
    if cdir.exists():
        shutil.rmtree(cdir)
    (cdir / "reward").mkdir(parents=True)
    with open(cdir / "case.json", "w") as f:
        json.dump(case_json, f, indent=2, ensure_ascii=True)
        f.write("\n")
    save_file({k: v.contiguous() for k, v in exp.items()}, str(cdir / "expected.safetensors"))
    return cdir


# --------------------------------------------------------------------------------------------------
# (a), (b): open_clip CLIP (HPSv2 layout)
# --------------------------------------------------------------------------------------------------
OPENCLIP_CASES = {
    "reward-openclip-gelu": dict(
        seed=101,
        cfg={"embed_dim": 16, "quick_gelu": False,
             "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16,
                            "mlp_ratio": 4.0},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}},
        prompt="A  Corgi wearing a tiny Wizard hat, digital art",
    ),
    "reward-openclip-quickgelu": dict(
        seed=202,
        cfg={"embed_dim": 24, "quick_gelu": True,
             "vision_cfg": {"image_size": 28, "patch_size": 7, "width": 48, "layers": 3, "head_width": 16,
                            "mlp_ratio": 4.0},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 2}},
        prompt=("an oil painting of a lighthouse on a rocky island during a thunderstorm, huge waves, lightning, "
                "dark clouds, a small boat fighting the sea, seagulls, dramatic chiaroscuro, impasto brush strokes, "
                "in the style of the old masters, museum quality, highly detailed, 4k, golden frame, "
                "THIS TAIL LIES PAST THE 77-TOKEN LIMIT and is cut off by the tokenizer"),
    ),
}


def build_openclip(cfg: dict, seed: int) -> open_clip.model.CLIP:
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"],
                                 quick_gelu=cfg["quick_gelu"]).eval()
    o1_init(model, seed)
    return model


def openclip_score(model, pixels, ids):
    ie = model.encode_image(pixels, normalize=True)
    te = model.encode_text(ids, normalize=True)
    return ie, te, (ie * te).sum(-1)


def gen_openclip(name: str, spec: dict, out: Path) -> dict:
    print(f"== {name}")
    cfg = spec["cfg"]
    model = build_openclip(cfg, spec["seed"])
    tok = open_clip.get_tokenizer("ViT-H-14")  # what HPSv2 uses: SimpleTokenizer, context 77, pad 0
    ids = tok([spec["prompt"]])
    assert ids.shape == (1, MAX_LEN) and ids.dtype == torch.int64
    n_untrunc = len(tok.encode(spec["prompt"])) + 2
    S = cfg["vision_cfg"]["image_size"]
    pixels = seeded_pixels(S, spec["seed"] + 7)
    ie, te, sc, gx = compute(model, openclip_score, pixels, ids)
    exp = {"reward_text_ids": ids, "reward_pixel_values": pixels, "reward_image_embeds": ie,
           "reward_text_embeds": te, "reward_score": sc, "grad_reward_pixel_values": gx}
    print(f"   prompt: {n_untrunc} tokens untruncated; score {sc.item():+.6f}; max|grad| {gx.abs().max().item():.3e}")
    r64, fd = check_f64(model, openclip_score, exp, ids, name)
    # the open_clip model's own forward agrees
    with torch.no_grad():
        o = model(pixels, ids)
        assert torch.allclose((o[0] * o[1]).sum(-1), sc, atol=1e-6)

    cdir = write_case(out, name, {"kind": "openclip", "prompt": spec["prompt"]}, exp)
    rdir = cdir / "reward"
    with open(rdir / "open_clip_config.json", "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(rdir / "open_clip_model.safetensors"))
    # OrderedDict (as model.state_dict() and real checkpoints pickle it), default zip serialization
    torch.save({"state_dict": collections.OrderedDict(sd)}, str(rdir / "open_clip_model.pt"))

    # ---- reload checks: json config -> fresh CLIP; open_clip's own checkpoint loader on both files; hpsv2's way
    with open(rdir / "open_clip_config.json") as f:
        cfg2 = json.load(f)
    for fname in ("open_clip_model.safetensors", "open_clip_model.pt"):
        m2 = open_clip.model.CLIP(embed_dim=cfg2["embed_dim"], vision_cfg=cfg2["vision_cfg"],
                                  text_cfg=cfg2["text_cfg"], quick_gelu=cfg2["quick_gelu"]).eval()
        inc = open_clip.load_checkpoint(m2, str(rdir / fname), strict=True)
        assert not inc.missing_keys and not inc.unexpected_keys, inc
        ie2, te2, sc2, gx2 = compute(m2, openclip_score, pixels, ids)
        assert torch.equal(ie2, ie) and torch.equal(te2, te) and torch.equal(sc2, sc) and torch.equal(gx2, gx), fname
    ck = torch.load(str(rdir / "open_clip_model.pt"), map_location="cpu", weights_only=True)
    m3 = build_openclip(cfg, 0)
    m3.load_state_dict(ck["state_dict"])  # strict, exactly as hpsv2/img_score.py does
    assert torch.equal(compute(m3, openclip_score, pixels, ids)[2], sc)
    print(f"   reload: open_clip.load_checkpoint(.safetensors / .pt) and hpsv2-style "
          f"load_state_dict(torch.load(pt)['state_dict']) reproduce every tensor bit-exactly")
    describe(exp)
    return {"name": name, "dir": cdir, "files": dir_files(cdir), "model": model, "ids": ids, "score": sc,
            "rel64": r64, "fd": fd, "n_tokens": n_untrunc, "S": S}


# --------------------------------------------------------------------------------------------------
# (c): transformers CLIPModel (PickScore layout)
# --------------------------------------------------------------------------------------------------
HF_PROMPT = "a bowl of ramen with a soft boiled egg, studio photo, 85mm"


def hfclip_score(model, pixels, ids):
    ie = model.get_image_features(pixel_values=pixels).pooler_output
    te = model.get_text_features(input_ids=ids).pooler_output
    ie = ie / ie.norm(dim=-1, keepdim=True)
    te = te / te.norm(dim=-1, keepdim=True)
    return ie, te, model.logit_scale.exp() * (ie * te).sum(-1)


def gen_hfclip(out: Path, vocab_dir: Path) -> dict:
    name, seed = "reward-hfclip", 303
    print(f"== {name}")
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
                         projection_dim=16, bos_token_id=0, eos_token_id=2, pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=2, num_channels=3, hidden_act="gelu", layer_norm_eps=1e-5,
                           projection_dim=16),
        projection_dim=16, logit_scale_init_value=4.6052)
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    o1_init(model, seed)
    with torch.no_grad():
        model.logit_scale.fill_(4.6052)
    tok = gp.load_tokenizer(vocab_dir, EOT)
    ids = torch.tensor([tok(HF_PROMPT, padding="max_length", max_length=MAX_LEN, truncation=True).input_ids])
    S = cfg.vision_config.image_size
    pixels = seeded_pixels(S, seed + 7)
    ie, te, sc, gx = compute(model, hfclip_score, pixels, ids)
    exp = {"reward_text_ids": ids, "reward_pixel_values": pixels, "reward_image_embeds": ie,
           "reward_text_embeds": te, "reward_score": sc, "grad_reward_pixel_values": gx}
    print(f"   score {sc.item():+.6f} (= {math.exp(4.6052):.4f} x cosine {(ie * te).sum().item():+.6f}); "
          f"max|grad| {gx.abs().max().item():.3e}")
    r64, fd = check_f64(model, hfclip_score, exp, ids, name)
    with torch.no_grad():  # CLIPModel.forward's own logits, with the padding attention mask PickScore passes
        o = model(input_ids=ids, pixel_values=pixels, attention_mask=(torch.arange(77) <= ids.argmax(-1)).long()[None])
        assert torch.allclose(o.logits_per_image[0], sc, rtol=1e-6, atol=1e-5), (o.logits_per_image, sc)

    cdir = write_case(out, name, {"kind": "hf-clip", "prompt": HF_PROMPT}, exp)
    rdir = cdir / "reward"
    model.save_pretrained(str(rdir), safe_serialization=True)
    tok.save_pretrained(str(rdir))
    gp.fix_tokenizer_layout(rdir, vocab_dir, {"tokenizer_layout": "vocab", "pad": EOT})
    # reload
    m2 = CLIPModel.from_pretrained(str(rdir), dtype=torch.float32).eval()
    t2 = CLIPTokenizer.from_pretrained(str(rdir))
    ids2 = torch.tensor([t2(HF_PROMPT, padding="max_length", max_length=MAX_LEN, truncation=True).input_ids])
    assert torch.equal(ids2, ids)
    r2 = compute(m2, hfclip_score, pixels, ids)
    assert all(torch.equal(a, b) for a, b in zip(r2, (ie, te, sc, gx)))
    print(f"   reload: CLIPModel/CLIPTokenizer.from_pretrained reproduce every tensor bit-exactly "
          f"(config text eos_token_id={m2.config.text_config.eos_token_id} -> argmax pooling)")
    describe(exp)
    return {"name": name, "dir": cdir, "files": dir_files(cdir), "rel64": r64, "fd": fd}


# --------------------------------------------------------------------------------------------------
# (d): LAION aesthetic predictor (CLIP vision + MLP head)
# --------------------------------------------------------------------------------------------------
def make_head(dims) -> nn.Sequential:
    """The real head's module chain: Linear, Dropout(0.2), Linear, Dropout(0.2), Linear, Dropout(0.1), Linear, Linear
    (improved-aesthetic-predictor's MLP; no activation functions). Keys layers.{0,2,4,6,7}."""
    d0, d1, d2, d3, d4 = dims
    return nn.Sequential(nn.Linear(d0, d1), nn.Dropout(0.2), nn.Linear(d1, d2), nn.Dropout(0.2), nn.Linear(d2, d3),
                         nn.Dropout(0.1), nn.Linear(d3, d4), nn.Linear(d4, 1))


class MLP(nn.Module):
    """improved-aesthetic-predictor's MLP module: its state_dict keys are layers.{0,2,4,6,7}.{weight,bias}."""

    def __init__(self, dims):
        super().__init__()
        self.layers = make_head(dims)

    def forward(self, x):
        return self.layers(x)


class Aesthetic(nn.Module):
    def __init__(self, clip, head):
        super().__init__()
        self.clip, self.head = clip, head


def aesthetic_score(model, pixels, ids):
    e = model.clip(pixel_values=pixels).image_embeds
    e = e / e.norm(dim=-1, keepdim=True)
    return e, None, model.head(e)[:, 0]


def gen_aesthetic(out: Path) -> dict:
    name, seed = "reward-aesthetic", 404
    print(f"== {name}")
    vcfg = CLIPVisionConfig(image_size=24, patch_size=6, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                            num_attention_heads=3, num_channels=3, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                            projection_dim=16)
    torch.manual_seed(seed)
    clip = CLIPVisionModelWithProjection(vcfg).eval()
    o1_init(clip, seed)
    head = MLP((16, 32, 16, 8, 4)).eval()
    o1_init(head, seed + 1, w_gain=1.3)
    model = Aesthetic(clip, head).eval()
    S = vcfg.image_size
    pixels = seeded_pixels(S, seed + 7)
    ie, _, sc, gx = compute(model, aesthetic_score, pixels, None)
    exp = {"reward_pixel_values": pixels, "reward_image_embeds": ie, "reward_score": sc,
           "grad_reward_pixel_values": gx}
    print(f"   score {sc.item():+.6f}; max|grad| {gx.abs().max().item():.3e}")
    r64, fd = check_f64(model, aesthetic_score, exp, None, name)
    cdir = write_case(out, name, {"kind": "aesthetic"}, exp)
    rdir = cdir / "reward"
    clip.save_pretrained(str(rdir / "clip"), safe_serialization=True)
    hsd = {k: v.detach().clone().contiguous() for k, v in head.state_dict().items()}
    assert sorted(hsd) == sorted(f"layers.{i}.{w}" for i in (0, 2, 4, 6, 7) for w in ("weight", "bias"))
    save_file(hsd, str(rdir / "head.safetensors"))
    c2 = CLIPVisionModelWithProjection.from_pretrained(str(rdir / "clip"), dtype=torch.float32).eval()
    h2 = MLP((16, 32, 16, 8, 4)).eval()
    h2.load_state_dict(load_file(str(rdir / "head.safetensors")))
    r2 = compute(Aesthetic(c2, h2).eval(), aesthetic_score, pixels, None)
    assert torch.equal(r2[0], ie) and torch.equal(r2[2], sc) and torch.equal(r2[3], gx)
    print("   reload: CLIPVisionModelWithProjection.from_pretrained + head.safetensors reproduce bit-exactly")
    describe(exp)
    return {"name": name, "dir": cdir, "files": dir_files(cdir), "rel64": r64, "fd": fd}


# --------------------------------------------------------------------------------------------------
# 2: the real aesthetic head on fixed inputs
# --------------------------------------------------------------------------------------------------
def gen_aesthetic_head(out: Path, head_path: Path) -> dict:
    print("== aesthetic-head (real weights)")
    sd = torch.load(str(head_path), map_location="cpu", weights_only=True)
    keys = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in sd.items()}
    head = MLP((768, 1024, 128, 64, 16)).eval()
    head.load_state_dict(sd)  # strict
    g = torch.Generator().manual_seed(505)
    x = torch.randn((4, 768), generator=g, dtype=torch.float32)
    x = x / x.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        y = head(x)
        y64 = copy.deepcopy(head).double()(x.double())
    r = rel(y, y64)
    print(f"   outputs {y[:, 0].tolist()}; f32 vs f64 rel err {r:.1e}")
    assert r < TOL_F64
    d = out / "reward"
    d.mkdir(parents=True, exist_ok=True)
    save_file({"inputs": x.contiguous(), "outputs": y.contiguous()}, str(d / "aesthetic_head_expected.safetensors"))
    meta = {
        "source": "../shared/data/aesthetic-v2/sac+logos+ava1-l14-linearMSE.pth (LAION improved-aesthetic-predictor, "
                  "Apache-2.0); a torch.save'd OrderedDict state dict (zip format), loaded with weights_only=True",
        "sha256": hashlib.sha256(head_path.read_bytes()).hexdigest(),
        "keys": keys,
        "architecture": "nn.Sequential(Linear(768,1024), Dropout(0.2), Linear(1024,128), Dropout(0.2), Linear(128,64), "
                        "Dropout(0.1), Linear(64,16), Linear(16,1)) -- NO activations; in eval mode the whole head is "
                        "one affine map 768 -> 1. y = W x + b per Linear (weight [out, in]).",
        "inputs": "inputs [4,768] f32: torch.randn with torch.Generator().manual_seed(505), each row L2-normalised "
                  "(the predictor is fed normalize(CLIP ViT-L/14 image embedding))",
        "outputs": "outputs [4,1] f32: head(inputs) in f32 (f64 recomputation agrees to %.1e relative)" % r,
        "versions": {"torch": torch.__version__},
    }
    with open(d / "aesthetic_head_expected.json", "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    return {"keys": keys, "outputs": y[:, 0].tolist()}


# --------------------------------------------------------------------------------------------------
# 3: differentiable preprocessing reference
# --------------------------------------------------------------------------------------------------
PRE_CASES = [  # (input shape [H, W], S, image seed or index of the case whose input is reused, note)
    ((40, 56), 32, 601, "landscape, downscale 40->32"),
    ((64, 48), 32, 602, "portrait, downscale 48->32"),
    ((300, 224), 32, 603, "portrait, strong downscale 224->32"),
    ((300, 224), 224, "2", "same input as case 2 at S=224: resize is the identity, crop only"),
    ((32, 32), 32, 604, "already SxS: resize and crop are identities"),
    ((36, 40), 32, 605, "crop offset (35-32)/2 = 1.5: torchvision round() -> 2, transformers' int() -> 1"),
    ((24, 20), 32, 606, "upscale 20->32 (antialias has no effect when upsampling)"),
]


def tensor_path(x: torch.Tensor, S: int):
    r = TF.resize(x, S, interpolation=InterpolationMode.BICUBIC, antialias=True)
    c = TF.center_crop(r, [S, S])
    n = TF.normalize(c, CLIP_MEAN, CLIP_STD)
    return r, c, n


def pil_of(x: torch.Tensor) -> "PIL.Image.Image":
    return TF.to_pil_image((x[0] * 255).round().to(torch.uint8))


def bicubic_aa_ref(x: np.ndarray, out_h: int, out_w: int, a: float = -0.5) -> np.ndarray:
    """Independent float64 implementation of Pillow's separable antialiased resample (bicubic, a = -0.5),
    the algorithm torch's interpolate(mode='bicubic', antialias=True, align_corners=False) implements."""
    def filt(t):
        t = abs(t)
        if t < 1.0:
            return ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0
        if t < 2.0:
            return (((t - 5.0) * t + 8.0) * t - 4.0) * a
        return 0.0

    def matrix(n_in, n_out):
        scale = n_in / n_out
        fs = max(scale, 1.0)
        support = 2.0 * fs
        m = np.zeros((n_out, n_in))
        for i in range(n_out):
            center = (i + 0.5) * scale
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), n_in)
            w = np.array([filt((j - center + 0.5) / fs) for j in range(lo, hi)])
            m[i, lo:hi] = w / w.sum()
        return m

    H, W = x.shape[-2:]
    return matrix(H, out_h) @ x @ matrix(W, out_w).T


def gen_preprocess(out: Path, oc_case: dict | None) -> dict:
    print("== preprocess")
    tensors, rows = {}, []
    inputs = {}
    for i, ((H, W), S, seed, note) in enumerate(PRE_CASES):
        if isinstance(seed, str):
            x = inputs[int(seed)]
        else:
            g = torch.Generator().manual_seed(seed)
            # a smooth-ish image in [0,1]: low-frequency pattern + noise (so resize is not just averaging noise)
            yy, xx = torch.meshgrid(torch.linspace(0, 1, H), torch.linspace(0, 1, W), indexing="ij")
            ph = torch.rand((3, 3), generator=g) * 6.28
            base = torch.stack([0.5 + 0.3 * torch.sin(6 * xx + ph[c, 0]) * torch.cos(4 * yy + ph[c, 1]) for c in range(3)])
            x = (base + 0.2 * (torch.rand((3, H, W), generator=g) - 0.5)).clamp(0, 1)[None].contiguous()
        inputs[i] = x
        xg = x.clone().requires_grad_(True)
        r, c, n = tensor_path(xg, S)
        gR = torch.Generator().manual_seed(700 + i)
        R = torch.randn((1, 3, S, S), generator=gR, dtype=torch.float32)
        (gx,) = torch.autograd.grad((R * n).sum(), xg)
        # float64 recomputation
        x64 = x.double().requires_grad_(True)
        r64, c64, n64 = tensor_path(x64, S)
        (gx64,) = torch.autograd.grad((R.double() * n64).sum(), x64)
        e_fwd, e_grad = rel(n, n64), rel(gx, gx64)
        assert e_fwd < TOL_F64 and e_grad < TOL_F64, (i, e_fwd, e_grad)
        # independent resize implementation (f64)
        ref = torch.from_numpy(np.stack([bicubic_aa_ref(x64[0, ch].detach().numpy(), *r.shape[-2:])
                                         for ch in range(3)]))[None]
        e_ref = (ref - r64.detach()).abs().max().item()
        assert e_ref < 1e-12, (i, e_ref)
        # the PIL (uint8) paths
        pil = pil_of(x)
        oc_t = open_clip.image_transform(S, is_train=False)  # Resize(S, BICUBIC) on PIL, CenterCrop, ToTensor, Normalize
        p = oc_t(pil)[None]
        hf = transformers.CLIPImageProcessor(size={"shortest_edge": S}, crop_size={"height": S, "width": S})
        p_hf = hf(images=pil, return_tensors="pt")["pixel_values"]
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
        hfp = CLIPImageProcessorPil(size={"shortest_edge": S}, crop_size={"height": S, "width": S})
        p_hfp = torch.as_tensor(np.asarray(hfp(images=pil, return_tensors="np")["pixel_values"]))
        xq = TF.pil_to_tensor(pil)[None].float() / 255  # the uint8-quantised input through the float tensor path
        nq = tensor_path(xq, S)[2]
        top, left = int(round((r.shape[-2] - S) / 2.0)), int(round((r.shape[-1] - S) / 2.0))
        row = {
            "i": i, "input_shape": [1, 3, H, W], "S": S, "note": note,
            "input": f"{'seeded image' if not isinstance(seed, str) else 'input of case ' + seed}, values in [0,1]",
            "resized_shape": list(r.shape), "crop_top_left": [top, left],
            "R_seed": 700 + i,
            "maxabs_pil_minus_norm": (p - n.detach()).abs().max().item(),
            "meanabs_pil_minus_norm": (p - n.detach()).abs().mean().item(),
            "maxabs_quantised_input_tensor_path_minus_norm": (nq - n.detach()).abs().max().item(),
            "maxabs_pil_minus_quantised_input_tensor_path": (p - nq).abs().max().item(),
            "maxabs_hf_CLIPImageProcessor_minus_norm": (p_hf - n.detach()).abs().max().item()
            if p_hf.shape == n.shape else f"shape {list(p_hf.shape)}",
            "maxabs_hf_CLIPImageProcessor_minus_pil": (p_hf - p).abs().max().item()
            if p_hf.shape == p.shape else f"shape {list(p_hf.shape)}",
            "maxabs_hf_CLIPImageProcessorPil_minus_pil": (p_hfp - p).abs().max().item()
            if p_hfp.shape == p.shape else f"shape {list(p_hfp.shape)}",
            "f32_vs_f64_rel": {"norm": e_fwd, "grad_norm": e_grad}, "independent_aa_bicubic_f64_maxabs": e_ref,
        }
        if oc_case is not None and S == oc_case["S"]:
            m, ids = oc_case["model"], oc_case["ids"]
            with torch.no_grad():
                s_t = openclip_score(m, n.detach(), ids)[2].item()
                s_p = openclip_score(m, p, ids)[2].item()
            row["reward-openclip-gelu_score"] = {"tensor_path": s_t, "pil_path": s_p, "diff": s_p - s_t}
        rows.append(row)
        tensors.update({f"input_{i}": x, f"resize_{i}": r.detach(), f"crop_{i}": c.detach(),
                        f"norm_{i}": n.detach(), f"pil_{i}": p.float(), f"R_{i}": R, f"grad_norm_{i}": gx})
        sc = row.get("reward-openclip-gelu_score")
        print(f"   case {i}: {[H, W]} -> resize {list(r.shape[-2:])} crop@{[top, left]} S={S}: "
              f"|pil-norm|max {row['maxabs_pil_minus_norm']:.4f} (quantised input via tensor path "
              f"{row['maxabs_quantised_input_tensor_path_minus_norm']:.4f}); hf torchvision proc "
              f"{row['maxabs_hf_CLIPImageProcessor_minus_norm'] if isinstance(row['maxabs_hf_CLIPImageProcessor_minus_norm'], str) else format(row['maxabs_hf_CLIPImageProcessor_minus_norm'], '.4f')}; "
              f"f64 rel {e_fwd:.0e}/{e_grad:.0e}"
              + (f"; score tensor {sc['tensor_path']:+.5f} pil {sc['pil_path']:+.5f} diff {sc['diff']:+.2e}" if sc else ""))
    d = out / "reward"
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().clone().contiguous() for k, v in tensors.items()}, str(d / "preprocess.safetensors"))
    meta = {
        "what": "differentiable CLIP preprocessing reference (float tensor path) vs the real uint8/PIL paths",
        "tensors": {
            "input_<i>": "[1,3,H,W] f32 image in [0,1]",
            "resize_<i>": "torchvision.transforms.functional.resize(input, S, BICUBIC, antialias=True): shorter side -> S, "
                          "longer side -> int(S * long / short) (truncated); = F.interpolate(mode='bicubic', "
                          "antialias=True, align_corners=False); Pillow's separable AA filter with a=-0.5, "
                          "support 2*max(scale,1), scale = in/out, taps at (j - (o+0.5)*scale + 0.5)/max(scale,1), "
                          "weights normalised per output, window [int(c-support+0.5), int(c+support+0.5)) clipped; "
                          "NOT clamped (float path can over/undershoot [0,1])",
            "crop_<i>": "torchvision center_crop(resize, [S,S]): top = int(round((h-S)/2)), left = int(round((w-S)/2)) "
                        "(Python round: half to even)",
            "norm_<i>": "(crop - mean[c]) / std[c], CLIP mean " + str(CLIP_MEAN) + " std " + str(CLIP_STD),
            "pil_<i>": "open_clip.image_transform(S, is_train=False) on ToPILImage((input*255).round().uint8): PIL "
                       "Resize(S, BICUBIC) (uint8, fixed-point, always antialiased, clamped and rounded per pass), "
                       "CenterCrop(S), ToTensor (/255), Normalize -- what HPSv2 / open_clip score with",
            "R_<i>": "[1,3,S,S] f32 torch.randn, torch.Generator().manual_seed(700+i)",
            "grad_norm_<i>": "d sum(R_i * norm_i) / d input_i  [1,3,H,W] (autograd through interpolate's AA bicubic backward)",
        },
        "cases": rows,
        "notes": [
            "transformers 5 CLIPImageProcessor is torchvision-backed: PIL -> uint8 tensor, tvF.resize(uint8, bicubic, "
            "antialias) (torch's uint8 AA kernel), center crop with top = int((h-S)/2) (floor, unlike torchvision's "
            "round-half-even: they differ when h-S = 3 mod 4, see case 5), then fused rescale+normalise. "
            "CLIPImageProcessorPil is the PIL path.",
            "open_clip's eval transform on a square target uses torchvision Resize(S) (shorter side) + CenterCrop(S).",
        ],
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__, "Pillow": PIL.__version__,
                     "open_clip": open_clip.__version__, "transformers": transformers.__version__},
    }
    with open(d / "preprocess.json", "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    return {"rows": rows}


# --------------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(REPO / "tests/fixtures"))
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--bpe", default=os.environ.get(
        "RENEG_CLIP_BPE", str(REPO.parent / "shared/data/clip-tokenizer/bpe_simple_vocab_16e6.txt.gz")))
    ap.add_argument("--aesthetic-head", default=str(
        REPO.parent / "shared/data/aesthetic-v2/sac+logos+ava1-l14-linearMSE.pth"))
    a = ap.parse_args()
    print(f"torch {torch.__version__}  transformers {transformers.__version__}  open_clip {open_clip.__version__}  "
          f"torchvision {torchvision.__version__}  Pillow {PIL.__version__}  safetensors {safetensors.__version__}")
    all_names = [*OPENCLIP_CASES, "reward-hfclip", "reward-aesthetic", "aesthetic-head", "preprocess"]
    want = set(a.only) if a.only else set(all_names)
    assert want <= set(all_names), want - set(all_names)
    out = Path(a.out)
    results = []
    oc_a = None
    with tempfile.TemporaryDirectory() as td:
        vocab_dir = Path(td)
        gp.write_vocab_files(Path(a.bpe), vocab_dir)
        for n, spec in OPENCLIP_CASES.items():
            if n in want:
                res = gen_openclip(n, spec, out)
                results.append(res)
                if n == "reward-openclip-gelu":
                    oc_a = res
        if "reward-hfclip" in want:
            results.append(gen_hfclip(out, vocab_dir))
        if "reward-aesthetic" in want:
            results.append(gen_aesthetic(out))
        if "aesthetic-head" in want:
            gen_aesthetic_head(out, Path(a.aesthetic_head))
        if "preprocess" in want:
            gen_preprocess(out, oc_a)
    print("\n== summary")
    for r in results:
        print(f"{r['name']}: {sum(r['files'].values()) / 1e6:.2f} MB")
        for f, s in r["files"].items():
            print(f"      {s:>10d}  {f}")
    for p in sorted((out / "reward").glob("*")) if (out / "reward").exists() else []:
        print(f"      {p.stat().st_size:>10d}  reward/{p.name}")


if __name__ == "__main__":
    sys.exit(main())
