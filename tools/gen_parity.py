#!/usr/bin/env python3
"""Generate the PyTorch reference fixtures that reneg's Rust code is checked against.

Format: ../shared/docs/parity-fixtures.md (pipeline cases) -- this script follows it exactly.

Reference stack (pinned; never installed in CI, only on a developer machine, in a venv OUTSIDE the repo):

    python3 -m venv /work/pyref
    /work/pyref/bin/pip install torch==2.15.0 diffusers==0.42.1 transformers==5.23.0 \
        safetensors==0.8.0 numpy
    /work/pyref/bin/pip install open-clip-torch==3.3.0      # optional: tokenizer cross-check only

Run (from anywhere; CPU only, ~2-4 minutes on 2 cores):

    /work/pyref/bin/python tools/gen_parity.py [--bpe PATH] [--out tests/fixtures] [--only NAME ...]

    --bpe   CLIP BPE merges in open_clip format (default ../shared/data/clip-tokenizer/bpe_simple_vocab_16e6.txt.gz
            relative to the repository root, or $RENEG_CLIP_BPE)
    --out   fixture root (default <repo>/tests/fixtures)
    --only  restrict to some of: tokenizer sd15-tiny sd2-tiny sd-variant

What it writes (all deterministic: fixed seeds, torch.use_deterministic_algorithms, 2 threads, f32 on CPU):

    <out>/tokenizer/clip_ids.json        list of {"text", "ids_eot_pad": [77], "ids_bang_pad": [77]} from
                                          transformers' CLIPTokenizer(text, padding="max_length", max_length=77,
                                          truncation=True), pad '<|endoftext|>' (SD1.x) and pad '!' (SD2.x)
    <out>/tokenizer/clip_ids.meta.json   versions + notes, incl. where open_clip's SimpleTokenizer disagrees
    <out>/parity/<case>/case.json        prompt, negative_prompt, guidance_scale, num_inference_steps,
                                          grad_step_index, height, width
    <out>/parity/<case>/pipeline/        StableDiffusionPipeline.save_pretrained(safe_serialization=True)
    <out>/parity/<case>/expected.safetensors   every tensor listed in parity-fixtures.md, plus the extra tensors below

Extra tensors beyond the fixture format (in each case's expected.safetensors; for the VAE encoder's parity):
    vae_encoder_input    [1,3,H,W] f32   tanh(randn) from its own torch.Generator seeded with case seed + 6 (drawn
                                          after, and independently of, every other tensor, so those are unchanged);
                                          values in (-1, 1)
    vae_encoder_mean     [1,C,h,w] f32   vae.encode(vae_encoder_input).latent_dist.mean    (diffusers'
    vae_encoder_logvar   [1,C,h,w] f32   vae.encode(vae_encoder_input).latent_dist.logvar   DiagonalGaussianDistribution:
                                          quant_conv output split in two along channels, logvar clamped to [-30, 20]);
                                          both unscaled (not multiplied by scaling_factor); for sd2-tiny computed in
                                          f32 from the f16-rounded weights, as every other expected tensor

Cases (tiny random-weight models, real 49408-token CLIP vocabulary; text hidden size D = 32 / 48 / 16):
    sd15-tiny   SD1.5-like: epsilon, "leading" spacing, steps_offset 1, int attention_head_dim, conv proj_in/out,
                quick_gelu text encoder, tokenizer as vocab.json + merges.txt (no tokenizer.json), pad <|endoftext|>,
                negative prompt "" (null text), 32x32 px, 5 steps, guidance 7.5
    sd2-tiny    SD2-like: v_prediction, "trailing" spacing, per-level attention_head_dim list, linear proj_in/out,
                upcast_attention, gelu text encoder, tokenizer.json layout with pad '!' (the prompt has '!!', which
                that tokenizer splits), weights stored in float16 (expected tensors computed in f32 from the
                f16-rounded weights), non-square 32x48 px, 4 steps, guidance 5
    sd-variant  3 UNet levels (16, 32, 48), layers_per_block 2, norm_num_groups 8, flip_sin_to_cos False / freq_shift 1,
                "linear" betas, set_alpha_to_one, "linspace" spacing, steps_offset 0, 3-level VAE,
                scaling_factor 0.13025, a prompt truncated at 77 tokens, 3 steps, grad_step_index 0, guidance 3

Weights: default init is replaced by a seeded "O(1)" init (conv/linear N(0, 0.49/fan_in), random norm affines and
biases so ignoring any of them is detected, q/k projections x2 so attention is not uniform), then the UNet's and
the VAE decoder's conv_out are rescaled so eps ~ N(0,1)-sized and the image is O(1).

Checks printed: the saved pipeline reloads with StableDiffusionPipeline.from_pretrained and its own __call__
reproduces final_latents; the reloaded tokenizer reproduces the ids; the f32 reference gradient agrees with a
float64 autograd gradient and with float64 central finite differences on a few entries.
"""
from __future__ import annotations

import argparse
import copy
import gzip
import json
import math
import os
import shutil
import sys
import tempfile
import unicodedata
import warnings
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch

torch.set_num_threads(2)
torch.use_deterministic_algorithms(True)

import diffusers  # noqa: E402
import safetensors  # noqa: E402
import transformers  # noqa: E402
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg  # noqa: E402
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", category=FutureWarning)
transformers.logging.disable_progress_bar()
diffusers.utils.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()

REPO = Path(__file__).resolve().parents[1]
MAX_LEN = 77
EOT, SOT = "<|endoftext|>", "<|startoftext|>"

RENEG_NEGATIVE = (
    "distorted, ugly, blurry, low resolution, low quality, bad, deformed, disgusting, Overexposed, "
    "Simple background, Plain background, Grainy, Underexposed, too dark, too bright, too low contrast, "
    "too high contrast, Broken, Macabre, artifacts, oversaturated"
)


# --------------------------------------------------------------------------------------------------
# Tokenizer files (HF layout, as openai/clip-vit-large-patch14 ships them) from open_clip's BPE file
# --------------------------------------------------------------------------------------------------
def bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_vocab_files(bpe_path: Path, out_dir: Path) -> None:
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    assert len(merges) == 48894 and all(len(m) == 2 for m in merges)
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += [SOT, EOT]
    assert len(vocab) == 49408 and len(set(vocab)) == 49408
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "vocab.json", "w", encoding="utf-8") as f:
        json.dump({v: i for i, v in enumerate(vocab)}, f, ensure_ascii=False)
    with open(out_dir / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")


def load_tokenizer(vocab_dir: Path, pad: str) -> CLIPTokenizer:
    tok = CLIPTokenizer(vocab=str(vocab_dir / "vocab.json"), merges=str(vocab_dir / "merges.txt"), pad_token=pad,
                        model_max_length=MAX_LEN)
    assert len(tok) == 49408, len(tok)
    return tok


def ids77(tok: CLIPTokenizer, text: str) -> list[int]:
    ids = tok(text, padding="max_length", max_length=MAX_LEN, truncation=True).input_ids
    assert len(ids) == MAX_LEN
    return [int(i) for i in ids]


def tokenizer_prompts() -> list[str]:
    nfc = unicodedata.normalize("NFC", "café")
    nfd = unicodedata.normalize("NFD", "café")
    assert nfc != nfd
    long_prompt = (
        "a highly detailed digital painting of an ancient castle on a cliff above a stormy sea at sunset, "
        "dramatic lighting, volumetric clouds, crashing waves, seagulls, intricate stone masonry, ivy covered walls, "
        "glowing windows, a lone knight on horseback riding up the winding road, banners fluttering in the wind, "
        "trending on artstation, by greg rutkowski and alphonse mucha, 8k, ultra realistic, sharp focus"
    )
    return [
        "a photo of a cat",
        "A Photo Of A CAT",
        "a red cube on a wooden table, photo",
        "Hello, world!!!",
        "What?!?! No way... really???",
        "--- *** ### $$$ %%% ^^^ &&& ~~~ ``` |||",
        "it's a dog's life",
        "don't won't can't isn't",
        "they're here; we've been; I'm fine; you'll see; he'd go",
        "IT'S DON'T THEY'RE WE'VE I'M YOU'LL HE'D",
        "THE CAT'S HAT AND JOHN'S CAR'S WHEEL",
        "rock 'n' roll ''quoted'' 'single' 'sup 'dd",
        "1234 apples and 3.14 pies",
        "the 1st, 2nd, 3rd and 42nd",
        "1,000,000 dollars on 2024-01-31 at 12:30pm",
        "h2o co2 mp3 4k 8k uhd",
        "   leading spaces",
        "trailing spaces   ",
        "multiple     spaces   between    words",
        "tabs\tand\tnewlines\nhere\r\nand\n\nthere",
        "\t\n  mixed \u00a0 nbsp and\u2003em space and next\u0085line",
        "café crème brûlée",
        "naïve façade résumé",
        "Ünïcödé ÀÉÎÕÜ",
        nfc,
        nfd,
        unicodedata.normalize("NFC", "Ångström"),
        unicodedata.normalize("NFD", "Ångström"),
        unicodedata.normalize("NFD", "한국어"),
        "Ω ohm sign and Ω omega",
        "ΟΔΟΣ ΣΟΦΙΑΣ ελληνικά",
        "İstanbul STRASSE ẞ straße",
        "日本語のテキスト",
        "中文提示词：一只猫坐在桌子上",
        "한국어 문장",
        "Привет, мир! Кошка на столе",
        "مرحبا بالعالم",
        "שלום עולם",
        "ภาษาไทย",
        "नमस्ते दुनिया",
        "emoji 😀 🎨🖌️",
        "family 👨‍👩‍👧‍👦 and 🏳️‍🌈 flag",
        "👍🏽 👋🏿 thumbs",
        "🙂",
        "© 2024 ACME™ — price €5, 20°C, ½ cup, ±3, µm, ∞",
        "E=mc² x₂ ∑∫√",
        "full-width ＡＢＣ１２３ and ligature ﬁ ﬂ",
        "Tom &amp; Jerry &lt;3 &quot;quoted&quot; &#39;x&#39; &amp;amp;",
        "<b>bold</b> <i>html</i> tags",
        long_prompt,
        "",
        "   ",
        "\n\t",
        "<|startoftext|>a cat<|endoftext|>",
        "before <|endoftext|> after",
        "<|endoftext|><|endoftext|>",
        "<|STARTOFTEXT|> uppercase special",
        "well-known state-of-the-art high-resolution",
        "https://example.com/path?query=1&x=y#frag",
        "email me at someone@example.org",
        RENEG_NEGATIVE,
        "blurry, low quality",
        "masterpiece, best quality, (extremely detailed:1.2), [cat|dog], {a,b}",
        "snake_case_words and camelCaseWords",
        "zero\u200bwidth space",
        "control \u007f char",
        "x",
        "!",
        "!!!",
        "hello! world!",
        "a" * 60,
        "supercalifragilisticexpialidocious",
        " ".join(["cat"] * 75),
        " ".join(["cat"] * 76),
    ]


def gen_tokenizer_fixtures(vocab_dir: Path, bpe_path: Path, out: Path) -> None:
    tok_eot = load_tokenizer(vocab_dir, EOT)
    tok_bang = load_tokenizer(vocab_dir, "!")
    assert tok_eot.pad_token_id == 49407 and tok_bang.pad_token_id == 0
    known = ids77(tok_eot, "a photo of a cat")
    assert known[:7] == [49406, 320, 1125, 539, 320, 2368, 49407] and known[7:] == [49407] * 70, known[:10]
    assert ids77(tok_bang, "a photo of a cat")[7:] == [0] * 70
    prompts = tokenizer_prompts()
    rows = [{"text": t, "ids_eot_pad": ids77(tok_eot, t), "ids_bang_pad": ids77(tok_bang, t)} for t in prompts]

    # Cross-check against open_clip's SimpleTokenizer (ftfy + html.unescape + whitespace_clean; pads with 0).
    differ = []
    try:
        import open_clip
        from open_clip.tokenizer import SimpleTokenizer

        oc = SimpleTokenizer(bpe_path=str(bpe_path), context_length=MAX_LEN)
        oc_ver = open_clip.__version__
        for r in rows:
            o = [int(i) for i in oc([r["text"]])[0].tolist()]
            n = max(i for i, v in enumerate(o) if v != 0) + 1  # open_clip pads with 0: map its padding to EOT
            o_eot = o[:n] + [49407] * (MAX_LEN - n)
            if o_eot != r["ids_eot_pad"]:
                differ.append({"text": r["text"], "open_clip_ids": o})
    except ImportError:
        oc_ver = None

    d = out / "tokenizer"
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "clip_ids.json", "w", encoding="ascii") as f:
        f.write("[\n" + ",\n".join(json.dumps(r, ensure_ascii=True) for r in rows) + "\n]\n")
    meta = {
        "generator": "tools/gen_parity.py",
        "transformers": transformers.__version__,
        "tokenizers": __import__("tokenizers").__version__,
        "tokenizer_class": type(tok_eot).__name__ + " (tokenizers backend, no ftfy, no html unescape)",
        "call": 'CLIPTokenizer(text, padding="max_length", max_length=77, truncation=True)',
        "vocab": "HF vocab.json/merges.txt built from bpe_simple_vocab_16e6.txt.gz (48894 merges, 49408 tokens)",
        "ids_eot_pad": "pad_token '<|endoftext|>' (49407), as SD1.x",
        "ids_bang_pad": "pad_token '!' (0), as SD2.x; note '!' then is a special added token, so '!!' splits",
        "count": len(rows),
        "notes": [
            "normalizer: NFC, then every \\s+ run (incl. U+00A0, U+2003, U+0085) -> ' ', then per-char lowercase "
            "(no Greek final sigma); pre-tokenizer: CLIP regex split, then ByteLevel (GPT-2 regex, no prefix space)",
            "literal '<|startoftext|>' / '<|endoftext|>' in the text become the special ids 49406 / 49407 "
            "(case-sensitive: '<|STARTOFTEXT|>' is ordinary text)",
            "truncation keeps SOT and EOT: a truncated prompt is SOT + 75 tokens + EOT",
            "pad '!' (SD2): '!' is registered as a special added token, so every '!' in the text is split out "
            "before BPE and becomes id 0 ('!' without '</w>'); with pad '<|endoftext|>' '!!!' is one token '!!!</w>'",
            "no ftfy and no html.unescape (open_clip / the v4 slow tokenizer do both): '&amp;' stays 3 tokens, "
            "full-width letters and ligatures are not folded, U+0085 is whitespace, U+007F is kept as a byte",
        ],
        "open_clip": oc_ver,
        "open_clip_differs_from_ids_eot_pad": differ,
        "open_clip_comparison": "open_clip SimpleTokenizer(bpe, 77) output with its 0-padding mapped to 49407",
    }
    with open(d / "clip_ids.meta.json", "w", encoding="ascii") as f:
        json.dump(meta, f, ensure_ascii=True, indent=1)
        f.write("\n")
    print(f"tokenizer: {len(rows)} prompts written; open_clip {oc_ver} differs on {len(differ)}")
    for x in differ:
        print("   open_clip differs:", ascii(x["text"][:60]))


# --------------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def o1_init(model: torch.nn.Module, seed: int, w_gain: float = 0.7, qk_gain: float = 2.0, emb_std: float = 0.5) -> None:
    """w_gain < 1 keeps the random nets contractive (f32 rounding is not amplified across DDIM steps);
    qk_gain > 1 makes attention non-uniform."""
    g = torch.Generator().manual_seed(seed)

    def rn(t):
        return torch.randn(t.shape, generator=g, dtype=torch.float32)

    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
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


def build_text_encoder(c: dict, seed: int) -> CLIPTextModel:
    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=c["hidden"],
        intermediate_size=c["intermediate"],
        num_hidden_layers=c["layers"],
        num_attention_heads=c["heads"],
        max_position_embeddings=77,
        hidden_act=c["act"],
        layer_norm_eps=1e-5,
        projection_dim=c["hidden"],
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    te = CLIPTextModel(cfg).eval()
    o1_init(te, seed)
    return te


def build_unet(c: dict, seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**c).eval()
    o1_init(unet, seed)
    return unet


def build_vae(c: dict, seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(**c).eval()
    o1_init(vae, seed)
    return vae


@torch.no_grad()
def calibrate(unet, vae, te, lat_shape, sf, seed):
    """Rescale UNet conv_out so guided-branch outputs are ~unit std, and VAE decoder conv_out so images are O(1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(lat_shape, generator=g)
    ids = torch.randint(0, 49406, (1, MAX_LEN), generator=g)
    emb = te(ids)[0]
    stds = [unet(x, torch.tensor(t), encoder_hidden_states=emb).sample.std().item() for t in (50, 500, 950)]
    s = float(np.mean(stds))
    unet.conv_out.weight.div_(s)
    unet.conv_out.bias.div_(s)
    img = vae.decode(x / sf).sample
    s2 = img.std().item() / 0.5
    vae.decoder.conv_out.weight.div_(s2)
    vae.decoder.conv_out.bias.div_(s2)
    return s, s2


@torch.no_grad()
def round_to_f16(*models):
    for m in models:
        for p in m.parameters():
            p.copy_(p.half().float())


# --------------------------------------------------------------------------------------------------
# Reference computation (diffusers' own modules, the same calls as StableDiffusionPipeline.__call__)
# --------------------------------------------------------------------------------------------------
def guided_eps(unet, latents, t, neg, pos, g, r=0.0):
    inp = torch.cat([latents] * 2)
    noise = unet(inp, t, encoder_hidden_states=torch.cat([neg, pos]), return_dict=False)[0]
    u, c = noise.chunk(2)
    out = u + g * (c - u)
    if r > 0:
        # StableDiffusionPipeline.__call__'s guidance_rescale, after guidance, before the step.
        out = rescale_noise_cfg(out, c, guidance_rescale=r)
    return out


def grad_step_loss(unet, vae, sched, latents_in, t, neg, pos, g, reward, sf, r=0.0):
    eps = guided_eps(unet, latents_in, t, neg, pos, g, r)
    x0 = sched.step(eps, t, latents_in, eta=0.0).pred_original_sample
    dec = vae.decode(x0 / sf).sample
    return -(reward * dec).sum(), x0


def reference(pipe, case, seed):
    tok, te, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
    sf = vae.config.scaling_factor
    g = case["guidance_scale"]
    r = case.get("guidance_rescale", 0.0)
    N, k = case["num_inference_steps"], case["grad_step_index"]
    H, W = case["height"], case["width"]
    vsf = 2 ** (len(vae.config.block_out_channels) - 1)
    C = unet.config.in_channels
    out = {}
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

        sched = DDIMScheduler.from_config(pipe.scheduler.config)
        sched.set_timesteps(N)
        assert float(sched.init_noise_sigma) == 1.0
        timesteps = sched.timesteps.clone()
        latents = init.clone()
        for i, t in enumerate(timesteps):
            if i == k:
                lat_in = latents.clone()
            inp_eps = guided_eps(unet, sched.scale_model_input(latents, t), t, neg, pos, g, r)
            st = sched.step(inp_eps, t, latents, eta=0.0)
            if i == k:
                x0_loop = st.pred_original_sample.clone()
            latents = st.prev_sample
        final = latents
        image = vae.decode(final / sf).sample

    # gradient: only the guided step at grad_step_index carries the graph
    neg_p = neg.detach().clone().requires_grad_(True)
    sched_g = DDIMScheduler.from_config(pipe.scheduler.config)
    sched_g.set_timesteps(N)
    loss, x0 = grad_step_loss(unet, vae, sched_g, lat_in.detach(), timesteps[k], neg_p, pos.detach(), g, reward, sf, r)
    loss.backward()
    grad = neg_p.grad.detach().clone()
    assert torch.equal(x0.detach(), x0_loop), (x0.detach() - x0_loop).abs().max()

    out.update(
        prompt_input_ids=pids.to(torch.int64), negative_input_ids=nids.to(torch.int64),
        prompt_embeds=pos, negative_prompt_embeds=neg, init_latents=init,
        timesteps=timesteps.to(torch.int64), final_latents=final, image=image,
        grad_latents_in=lat_in, x0_pred=x0.detach(), reward_weight=reward,
        loss=loss.detach().reshape([]), grad_negative_prompt_embeds=grad,
    )
    return {k_: v.detach().contiguous() for k_, v in out.items()}


@torch.no_grad()
def vae_encoder_reference(vae, case, seed):
    """Extra tensors (not in parity-fixtures.md): the VAE encoder on a fixed image in (-1, 1), drawn from its own
    generator so that no other tensor's RNG stream changes."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.tanh(torch.randn((1, 3, case["height"], case["width"]), generator=gen, dtype=torch.float32))
    dist = vae.encode(x).latent_dist
    out = dict(vae_encoder_input=x, vae_encoder_mean=dist.mean, vae_encoder_logvar=dist.logvar)
    return {k_: v.detach().contiguous() for k_, v in out.items()}


@torch.no_grad()
def check_forward_f64(pipe, case, exp):
    """Conditioning check: the same forward pass in float64 (differences = f32 rounding sensitivity)."""
    te = copy.deepcopy(pipe.text_encoder).double()
    unet = copy.deepcopy(pipe.unet).double()
    vae = copy.deepcopy(pipe.vae).double()
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(case["num_inference_steps"])
    pos = te(exp["prompt_input_ids"])[0]
    neg = te(exp["negative_input_ids"])[0]
    lat = exp["init_latents"].double()
    for t in sched.timesteps:
        eps = guided_eps(unet, lat, t, neg, pos, case["guidance_scale"], case.get("guidance_rescale", 0.0))
        lat = sched.step(eps, t, lat, eta=0.0).prev_sample
    image = vae.decode(lat / vae.config.scaling_factor).sample
    enc = vae.encode(exp["vae_encoder_input"].double()).latent_dist

    def rel(a, b):
        return ((a.double() - b).abs().max() / b.abs().max()).item()

    r = dict(prompt_embeds=rel(exp["prompt_embeds"], pos), negative_prompt_embeds=rel(exp["negative_prompt_embeds"], neg),
             final_latents=rel(exp["final_latents"], lat), image=rel(exp["image"], image),
             vae_encoder_mean=rel(exp["vae_encoder_mean"], enc.mean),
             vae_encoder_logvar=rel(exp["vae_encoder_logvar"], enc.logvar))
    print("   f32 vs f64 forward rel err: " + ", ".join(f"{k} {v:.1e}" for k, v in r.items()))
    assert max(r.values()) < 1e-5, r


def check_gradient_f64(pipe, case, exp):
    unet = copy.deepcopy(pipe.unet).double()
    vae = copy.deepcopy(pipe.vae).double()
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(case["num_inference_steps"])
    t = exp["timesteps"][case["grad_step_index"]]
    sf = vae.config.scaling_factor
    lat = exp["grad_latents_in"].double()
    pos = exp["prompt_embeds"].double()
    rw = exp["reward_weight"].double()
    g = case["guidance_scale"]
    r = case.get("guidance_rescale", 0.0)

    def f(neg):
        return grad_step_loss(unet, vae, sched, lat, t, neg, pos, g, rw, sf, r)[0]

    neg = exp["negative_prompt_embeds"].double().clone().requires_grad_(True)
    loss64 = f(neg)
    loss64.backward()
    g64 = neg.grad.detach()
    g32 = exp["grad_negative_prompt_embeds"].double()
    rel_ag = ((g32 - g64).abs().max() / g64.abs().max()).item()
    rel_loss = abs(loss64.item() - exp["loss"].item()) / max(abs(loss64.item()), 1e-30)
    flat = g64.abs().flatten()
    idx = [int(flat.argmax()), int(torch.argsort(flat)[len(flat) // 2]), 5 * 77 // 2, flat.numel() - 1]
    h = 1e-5
    worst = 0.0
    fd_lines = []
    with torch.no_grad():
        base = exp["negative_prompt_embeds"].double().clone()
        for i in idx:
            e = torch.zeros_like(base).flatten()
            e[i] = h
            e = e.view_as(base)
            fd = (f(base + e) - f(base - e)).item() / (2 * h)
            ag = g64.flatten()[i].item()
            err = abs(fd - ag) / g64.abs().max().item()
            worst = max(worst, err)
            fd_lines.append(f"      entry {i:6d}: fd64 {fd:+.8e} autograd64 {ag:+.8e} f32 {g32.flatten()[i].item():+.8e}")
    print(f"   grad check: |g32-g64|max/|g64|max = {rel_ag:.2e}; loss f32 vs f64 rel {rel_loss:.2e}; "
          f"finite-difference worst (rel. to max|g|) {worst:.2e}")
    print("\n".join(fd_lines))
    assert rel_ag < 1e-3 and worst < 1e-5, (rel_ag, worst)


# --------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------
SD_SCHED = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1,
)

# The sd15-tiny UNet and VAE (also the guidance-rescale case's).
SD15_TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8, norm_num_groups=32,
    cross_attention_dim=32, use_linear_projection=False,
)
SD15_TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32, scaling_factor=0.18215,
)

CASES = {
    # Zero terminal SNR, v-prediction, trailing spacing (Lin et al.) with their guidance_rescale, as
    # the miniature world ships its scheduler: the rescale's stds carry the gradient.
    "sd-rescale-tiny": dict(
        seed=4400,
        text=dict(hidden=32, intermediate=37, layers=2, heads=4, act="quick_gelu"),
        unet=SD15_TINY_UNET,
        vae=SD15_TINY_VAE,
        sched=dict(SD_SCHED, prediction_type="v_prediction", timestep_spacing="trailing",
                   rescale_betas_zero_snr=True),
        pad=EOT, tokenizer_layout="vocab", f16=False,
        case=dict(prompt="a green bottle on a shelf", negative_prompt="blurry, noisy", guidance_scale=7.5,
                  guidance_rescale=0.7, num_inference_steps=5, grad_step_index=2, height=32, width=48),
    ),
    "sd15-tiny": dict(
        seed=1500,
        text=dict(hidden=32, intermediate=37, layers=3, heads=4, act="quick_gelu"),
        unet=SD15_TINY_UNET,
        vae=SD15_TINY_VAE,
        sched=dict(SD_SCHED, prediction_type="epsilon", timestep_spacing="leading"),
        pad=EOT, tokenizer_layout="vocab", f16=False,
        case=dict(prompt="a red cube on a wooden table, photo", negative_prompt="", guidance_scale=7.5,
                  num_inference_steps=5, grad_step_index=3, height=32, width=32),
    ),
    "sd2-tiny": dict(
        seed=2100,
        text=dict(hidden=48, intermediate=72, layers=3, heads=3, act="gelu"),
        unet=dict(
            sample_size=16, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=[2, 4], norm_num_groups=16,
            cross_attention_dim=48, use_linear_projection=True, upcast_attention=True,
        ),
        vae=dict(
            in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16, scaling_factor=0.18215,
        ),
        sched=dict(SD_SCHED, prediction_type="v_prediction", timestep_spacing="trailing"),
        pad="!", tokenizer_layout="json", f16=True,
        case=dict(prompt="an astronaut riding a horse on the moon!! oil painting", negative_prompt="blurry, low quality",
                  guidance_scale=5.0, num_inference_steps=4, grad_step_index=2, height=32, width=48),
    ),
    "sd-variant": dict(
        seed=3300,
        text=dict(hidden=16, intermediate=50, layers=2, heads=2, act="gelu"),
        unet=dict(
            sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(16, 32, 48), layers_per_block=2, transformer_layers_per_block=1,
            attention_head_dim=4, norm_num_groups=8, cross_attention_dim=16, use_linear_projection=False,
            flip_sin_to_cos=False, freq_shift=1,
        ),
        vae=dict(
            in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, scaling_factor=0.13025,
        ),
        sched=dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                   clip_sample=False, set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon",
                   timestep_spacing="linspace"),
        pad=EOT, tokenizer_layout="json", f16=False,
        case=dict(
            prompt=("a breathtaking panoramic landscape of snow capped mountains reflected in a crystal clear alpine "
                    "lake at dawn, pine forests, wildflowers in the foreground, soft golden light, mist rising from "
                    "the water, a small wooden cabin with smoke from the chimney, a deer drinking at the shore, "
                    "hyperrealistic, award winning photograph, 35mm, f/8, long exposure, national geographic, "
                    "THIS TAIL IS CUT OFF: it lies past the 77-token limit and must not change anything"),
            negative_prompt="lowres, bad anatomy, watermark",
            guidance_scale=3.0, num_inference_steps=3, grad_step_index=0, height=32, width=32),
    ),
}


def fix_tokenizer_layout(tok_dir: Path, vocab_dir: Path, spec: dict) -> None:
    files = sorted(p.name for p in tok_dir.iterdir())
    if spec["tokenizer_layout"] == "vocab":
        # SD1.5 repo layout: vocab.json + merges.txt + tokenizer_config.json + special_tokens_map.json
        (tok_dir / "tokenizer.json").unlink(missing_ok=True)
        shutil.copy(vocab_dir / "vocab.json", tok_dir / "vocab.json")
        shutil.copy(vocab_dir / "merges.txt", tok_dir / "merges.txt")
        if not (tok_dir / "special_tokens_map.json").exists():
            # AddedToken-dict form as in the SD1.5 repo, but normalized=False (the SD1.5 repo says true): with
            # true, transformers 5 also matches '<|STARTOFTEXT|>' (lower-cased first) as the special token, so
            # this folder would disagree with tokenizer.json layouts and with clip_ids.json on such text.
            def added(s):
                return {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
            stm = {"bos_token": added(SOT), "eos_token": added(EOT), "pad_token": spec["pad"], "unk_token": added(EOT)}
            with open(tok_dir / "special_tokens_map.json", "w") as f:
                json.dump(stm, f, indent=2)
                f.write("\n")
    else:
        # tokenizer.json as transformers writes it is pretty-printed (3.6 MB); rewrite the same JSON compactly
        tj = tok_dir / "tokenizer.json"
        with open(tj, encoding="utf-8") as f:
            data = json.load(f)
        with open(tj, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, separators=(",", ":"))
    print(f"   tokenizer files: save_pretrained wrote {files}; now {sorted(p.name for p in tok_dir.iterdir())}")


def dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def gen_case(name: str, spec: dict, vocab_dir: Path, out: Path) -> dict:
    print(f"== {name}")
    seed = spec["seed"]
    case = spec["case"]
    te = build_text_encoder(spec["text"], seed + 1)
    unet = build_unet(spec["unet"], seed + 2)
    vae = build_vae(spec["vae"], seed + 3)
    vsf = 2 ** (len(spec["vae"]["block_out_channels"]) - 1)
    lat_shape = (1, 4, case["height"] // vsf, case["width"] // vsf)
    s_unet, s_vae = calibrate(unet, vae, te, lat_shape, spec["vae"]["scaling_factor"], seed + 4)
    print(f"   calibration: unet conv_out /{s_unet:.3f}, vae decoder conv_out /{s_vae:.3f}")
    if spec["f16"]:
        round_to_f16(te, unet, vae)
    sched = DDIMScheduler(**spec["sched"])
    tok = load_tokenizer(vocab_dir, spec["pad"])
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if pipe.scheduler.config.steps_offset != spec["sched"]["steps_offset"]:
        # StableDiffusionPipeline.__init__ rewrites steps_offset != 1 to 1 (and clip_sample to False), in memory and
        # so in the saved config. Keep the configured value; it must not matter for this case's spacing.
        assert spec["sched"]["timestep_spacing"] != "leading"
        ts = [DDIMScheduler(**dict(spec["sched"], steps_offset=o)) for o in (0, 1)]
        [x.set_timesteps(case["num_inference_steps"]) for x in ts]
        assert torch.equal(ts[0].timesteps, ts[1].timesteps)
        pipe.register_modules(scheduler=DDIMScheduler(**spec["sched"]))
        print(f"   scheduler: kept steps_offset={pipe.scheduler.config.steps_offset} (pipeline __init__ forces 1; "
              f"irrelevant for {spec['sched']['timestep_spacing']!r} spacing)")
    assert dict(pipe.scheduler.config) == dict(DDIMScheduler(**spec["sched"]).config)

    exp = reference(pipe, case, seed + 5)
    exp.update(vae_encoder_reference(pipe.vae, case, seed + 6))  # extra tensors; separate generator
    check_forward_f64(pipe, case, exp)
    check_gradient_f64(pipe, case, exp)

    cdir = out / "parity" / name
    if cdir.exists():
        shutil.rmtree(cdir)
    cdir.mkdir(parents=True)
    with open(cdir / "case.json", "w") as f:
        json.dump(case, f, indent=2, ensure_ascii=True)
        f.write("\n")
    save_file(exp, str(cdir / "expected.safetensors"))
    pdir = cdir / "pipeline"
    if spec["f16"]:
        pipe.to(torch.float16)
    pipe.save_pretrained(str(pdir), safe_serialization=True)
    fix_tokenizer_layout(pdir / "tokenizer", vocab_dir, spec)

    # ---- sanity: reload from disk and run diffusers' own __call__
    re_pipe = StableDiffusionPipeline.from_pretrained(str(pdir), dtype=torch.float32)
    re_pipe.set_progress_bar_config(disable=True)
    assert type(re_pipe.scheduler).__name__ == "DDIMScheduler"
    rtok = re_pipe.tokenizer
    for text in tokenizer_prompts():
        assert ids77(rtok, text) == ids77(pipe.tokenizer, text), ascii(text)
    n_untrunc = len(rtok(case["prompt"]).input_ids)
    assert (n_untrunc > MAX_LEN) == (name == "sd-variant"), n_untrunc
    print(f"   reloaded tokenizer {type(rtok).__name__} pad {rtok.pad_token!r}={rtok.pad_token_id} max_len "
          f"{rtok.model_max_length}: same ids on all tokenizer prompts; prompt is {n_untrunc} tokens untruncated")
    for key, text in (("prompt_input_ids", case["prompt"]), ("negative_input_ids", case["negative_prompt"])):
        got = rtok(text, padding="max_length", max_length=rtok.model_max_length, truncation=True).input_ids
        assert got == exp[key][0].tolist(), (key, got)
    for p_mem, p_disk in zip(list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters()),
                             list(re_pipe.unet.parameters()) + list(re_pipe.text_encoder.parameters())):
        assert torch.equal(p_mem.float(), p_disk)
    with torch.no_grad():
        lat = re_pipe(prompt=case["prompt"], negative_prompt=case["negative_prompt"], height=case["height"],
                      width=case["width"], num_inference_steps=case["num_inference_steps"],
                      guidance_scale=case["guidance_scale"], guidance_rescale=case.get("guidance_rescale", 0.0),
                      eta=0.0, latents=exp["init_latents"].clone(),
                      output_type="latent").images
    rel = ((lat - exp["final_latents"]).abs().max() / exp["final_latents"].abs().max()).item()
    print(f"   reload + StableDiffusionPipeline.__call__ final_latents rel err {rel:.2e}")
    assert rel < 1e-4, rel
    with torch.no_grad():
        re_dist = re_pipe.vae.encode(exp["vae_encoder_input"]).latent_dist
    rel_enc = max(((a - exp[k_]).abs().max() / exp[k_].abs().max()).item()
                  for k_, a in (("vae_encoder_mean", re_dist.mean), ("vae_encoder_logvar", re_dist.logvar)))
    print(f"   reload + AutoencoderKL.encode mean/logvar rel err {rel_enc:.2e}")
    assert rel_enc < 1e-5, rel_enc
    return {"name": name, "exp": exp, "size": dir_size(cdir), "dir": cdir, "files": {
        str(p.relative_to(cdir)): p.stat().st_size for p in sorted(cdir.rglob("*")) if p.is_file()}}


def summary(results):
    print("\n== summary")
    for r in results:
        print(f"{r['name']}: {r['size'] / 1e6:.2f} MB")
        for f, s in r["files"].items():
            print(f"      {s:>10d}  {f}")
        for k, v in r["exp"].items():
            if v.dtype == torch.int64:
                rng = f"int64 [{v.min().item()}, {v.max().item()}]"
            else:
                rng = f"f32 [{v.min().item():+.4g}, {v.max().item():+.4g}] std {v.float().std().item() if v.numel() > 1 else 0:.4g}"
            print(f"   {k:30s} {str(list(v.shape)):16s} {rng}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bpe", default=os.environ.get(
        "RENEG_CLIP_BPE", str(REPO.parent / "shared/data/clip-tokenizer/bpe_simple_vocab_16e6.txt.gz")))
    ap.add_argument("--out", default=str(REPO / "tests/fixtures"))
    ap.add_argument("--only", nargs="*", default=None)
    a = ap.parse_args()
    print(f"torch {torch.__version__}  diffusers {diffusers.__version__}  transformers {transformers.__version__}  "
          f"safetensors {safetensors.__version__}  numpy {np.__version__}")
    want = set(a.only) if a.only else {"tokenizer", *CASES}
    out = Path(a.out)
    with tempfile.TemporaryDirectory() as td:
        vocab_dir = Path(td)
        write_vocab_files(Path(a.bpe), vocab_dir)
        if "tokenizer" in want:
            gen_tokenizer_fixtures(vocab_dir, Path(a.bpe), out)
        results = [gen_case(n, s, vocab_dir, out) for n, s in CASES.items() if n in want]
    summary(results)


if __name__ == "__main__":
    sys.exit(main())
