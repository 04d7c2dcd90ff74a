#!/usr/bin/env python3
"""Generate the PixArt-alpha parity cases (PyTorch reference) that reneg's Rust code is checked against.

Format: ../shared/docs/parity-fixtures.md, "PixArt-α case" and "PixArt-α facts a port must get right". Never run in
CI: it needs the pinned reference venv described in tools/gen_parity.py (torch 2.15.0, diffusers 0.42.1,
transformers 5.23.0, safetensors 0.8.0, numpy), outside the repository, plus the tokenizer libraries (PyPI):

    /work/pyref/bin/pip install sentencepiece==0.2.3 protobuf==7.36.2   # tokenizers 0.23.3 comes with transformers

Run (CPU only; about half a minute on 2 cores):

    /work/pyref/bin/python tools/gen_pixart_parity.py [--out DIR] [--tokenizer-out DIR] [--only NAME ...]

    --out            folder that receives the case folders (default <repo>/tests/fixtures/parity)
    --tokenizer-out  the T5 tokenizer fixture (default <repo>/tests/fixtures/t5_tokenizer)
    --only           restrict to some of: pixart-tiny pixart-tiny-empty pixart-tiny-ddim pixart-tiny-1024 t5_tokenizer
                     (the three last cases need pixart-tiny's pipeline/ on disk; their links are checked
                     byte-for-byte against what their own save_pretrained writes)
    needs ../shared/data/PartiPrompts.tsv (relative to the repository root): the tokenizer's training text

Reuses the generic helpers of tools/gen_parity.py beside it (imported by path, no bytecode written into the repo):
the seeded O(1) weight init and the thread / determinism settings.

What it writes (deterministic: fixed seeds, torch.use_deterministic_algorithms, 2 threads, f32 on CPU; sentencepiece
trained single-threaded on a fixed corpus with a fixed seed, twice per run, asserted identical):

    <out>/<case>/case.json    {"kind": "pixart", prompt, negative_prompt, guidance_scale, num_inference_steps,
                               grad_step_index, height, width, max_sequence_length (120), clean_caption (false),
                               use_resolution_binning (false), scheduler (the class in scheduler_config.json)}
    <out>/<case>/pipeline/    PixArtAlphaPipeline.save_pretrained(safe_serialization=True), all weights f32:
        model_index.json
        scheduler/scheduler_config.json   DPMSolverMultistepScheduler, or DDIMScheduler (pixart-tiny-ddim)
        text_encoder/{config.json, model.safetensors}   T5EncoderModel; the token table is stored once, as
                                          `shared.weight` (transformers 5 ties encoder.embed_tokens to it and
                                          writes only the tie's source; asserted)
        tokenizer/  spiece.model, tokenizer_config.json, special_tokens_map.json (PixArt's layout, transformers 4
                    style, written by this script) and tokenizer.json (written by transformers' save_pretrained,
                    re-serialised compactly; its truncation and padding are null, asserted)
        transformer/{config.json, diffusion_pytorch_model.safetensors}   PixArtTransformer2DModel
        vae/{config.json, diffusion_pytorch_model.safetensors}           AutoencoderKL
    <out>/<case>/expected.safetensors   every tensor of the "PixArt-α case" table, plus (not in the shared format,
                               for locating a mismatch):
        adaln_embedded_timestep    [2,D]    the transformer's 1D conditioning e at step grad_step_index
                                            (AdaLayerNormSingle's second output: timestep embedding, plus the
                                            resolution / aspect embeddings in pixart-tiny-1024), batch [neg, prompt]
        caption_projection_output  [2,L,D]  caption_projection(T5 embeddings) at that step, batch [neg, prompt]
        sigmas                     [N+1]    DPM cases only: scheduler.sigmas = sqrt((1 - acp) / acp) at the
                                            timesteps, then 0
    <tokenizer-out>/               spiece.model, tokenizer.json, tokenizer_config.json, special_tokens_map.json
                                   (byte copies of pixart-tiny/pipeline/tokenizer/'s, asserted), and
        cases.json                 [{"text", "ids", "ids_padded_to_L", "attention_mask"}] for 19 texts, L = 120:
                                   ids = tokenizer(text).input_ids (pieces + </s>, no padding, no truncation);
                                   ids_padded_to_L / attention_mask = tokenizer(text, padding="max_length",
                                   max_length=120, truncation=True) (at most 119 pieces, </s>, then <pad> = 0);
                                   texts as given (no lower()/strip(): that is the pipeline's, not the tokenizer's)
        meta.json                  versions, L, vocabulary, notes

Sharing (about 2.9 MB for the four cases, 0.6 MB for the tokenizer fixture): pixart-tiny/pipeline/ is the only full
pipeline folder. pixart-tiny-empty/pipeline -> ../pixart-tiny/pipeline. pixart-tiny-ddim/pipeline/ holds its own
model_index.json and scheduler/; text_encoder, tokenizer, transformer, vae link to ../../pixart-tiny/pipeline/<name>.
pixart-tiny-1024/pipeline/ holds its own model_index.json, text_encoder/ and transformer/ (a second tiny model);
scheduler, tokenizer, vae link to pixart-tiny's. Every expected tensor is computed by diffusers from the case's
pipeline folder as loaded back from disk (PixArtAlphaPipeline.from_pretrained, dtype float32, through the links).

Cases (L = 120 everywhere; latents h = height / 8):
    pixart-tiny        DPM-Solver++ 2M from PixArt's scheduler file, prompt with capitals and outer spaces
                       (lower().strip() matters), real negative prompt, 48 x 64 px -> latents 6 x 8 (3 x 4 patches),
                       5 steps, grad_step_index 2 (second order step), guidance 6
    pixart-tiny-empty  negative_prompt "" (ids [1, 0 x 119], mask [1, 0 x 119]), DPM (linked pipeline), 32 x 64 px,
                       4 steps, grad_step_index 1, guidance 3
    pixart-tiny-ddim   DDIMScheduler.from_pretrained(PixArt's scheduler folder): linspace timesteps
                       [999, 749, 500, 250, 0] but the previous acp at t - 200 (799, 549, 300, 50, then 1), clip_sample
                       true (x0 clamped to +-1; about 80 % of x0_pred is inside at the gradient step, the rest has zero
                       gradient); a 304-id prompt truncated to 120 (119 pieces + </s>, mask all ones); 48 x 48 px,
                       5 steps, grad_step_index 3, guidance 4.5
    pixart-tiny-1024   transformer sample_size 128: resolution [64, 48] and aspect ratio 64 / 48 conditions
                       (added_cond_resolution, added_cond_aspect_ratio written), interpolation_scale 2 (pos-embed base
                       64); its own T5 (heads x d_kv = d_model = 40: embeddings [1,120,40]); DPM (linked scheduler);
                       64 x 48 px -> latents 8 x 6, 4 steps, grad_step_index 1, guidance 4.5

Models (random weights, O(1) init of gen_parity plus T5's RMS-norm weights 1 + 0.1 N(0,1) and PixArt's
scale_shift_tables 0.3 N(0,1); nothing of the libraries' default init survives: asserted; then the transformer's
proj_out is rescaled so its output is ~unit std, the VAE decoder's conv_out so images are O(1)):
    tokenizer   sentencepiece Unigram trained here (SPM_TRAIN below: 600 pieces, nmt_nfkc, <pad> 0, </s> 1, <unk> 2,
                no BOS, character_coverage 1.0) on PartiPrompts' 1632 prompts + EXTRA_CORPUS + the case prompts;
                transformers' T5Tokenizer with extra_ids 10 (<extra_id_i> = 609 - i): 610 ids. Characters outside
                the vocabulary (emoji, CJK, Greek) become <unk>.
    T5 (A)      T5EncoderModel, T5 v1.1: gated-gelu (gelu_new), d_model 32, num_heads 3 x d_kv 12 = 36 != 32, d_ff 48,
                2 layers, 32 buckets, max distance 128, eps 1e-6, vocab 610 (pixart-tiny, -empty, -ddim)
    T5 (B)      the same with d_model 40, 5 heads x d_kv 8, d_ff 64 (pixart-tiny-1024)
    transformer PixArtTransformer2DModel, ada_norm_single, no norm affine, eps 1e-6, patch 2, in 4 / out 8 (learned
                sigma), gelu-approximate, caption_channels = T5 d_model, cross_attention_dim = inner dim,
                use_additional_conditions null (follows sample_size == 128):
                (A) 2 layers, 2 heads x 8 = 16, sample_size 64 (as PixArt-XL-2-512x512)
                (B) 2 layers, 3 heads x 8 = 24, sample_size 128 (as PixArt-XL-2-1024-MS)
    vae         AutoencoderKL, 4 levels (16, 16, 32, 32), 1 layer per block, 8 groups, latent 4, scaling_factor 0.18215
    scheduler   PIXART_SCHEDULER_FILE below (PixArt's shipped keys), loaded with <Class>.from_pretrained

Checks printed: sentencepiece training twice gives identical bytes; five tokenizations agree on every prompt (raw and
lower()/strip()ed) and every fixture text: the sentencepiece library on spiece.model (+ </s>; it is what the old slow
T5Tokenizer ran; transformers 5 has no slow T5 tokenizer, T5TokenizerFast is T5Tokenizer), transformers' T5Tokenizer
from the full folder, from spiece.model alone (its T5 converter) and from tokenizer.json alone, and the tokenizers
library on tokenizer.json alone; the padded ids / masks equal "119 pieces at most, </s>, zeros"; the reloaded
pipeline's weights equal the in-memory model bitwise and its scheduler config the in-memory one; a linked component
is byte-identical to what the case's own save_pretrained writes; pipe.encode_prompt equals tokenizer + T5 with the
mask by hand; diffusers' own __call__ (output_type "latent", latents=init_latents), on the reloaded and the in-memory
pipeline, reproduces final_latents bit for bit; the gradient step's x0 and transformer output are bitwise the
sampling loop's; gradient rows where the negative mask is 0 are exactly 0; diffusers' f32 steps equal the formulas of
parity-fixtures.md; a float64 run (T5, transformer, VAE cast to f64, scheduler by the formulas) against the f32
tensors: embeddings, trajectory, image, and the gradient both from the stored f32 grad_latents_in and along the f64
trajectory; f64 central finite differences on a few entries (a masked row's is exactly 0).

Things a port (or a rerun) should know, found while writing this:
  - scheduler_config.json holds "lambda_min_clipped": -Infinity (Python's json; not standard JSON), as diffusers
    writes every DPMSolverMultistepScheduler config. DDIMScheduler.from_pretrained of the DPM file keeps the DPM-only
    keys (algorithm_type, solver_order, lambda_min_clipped, ...) in its config and save_pretrained writes them back.
  - DPM-Solver++ with final_sigmas_type "zero" (the default; PixArt's file predates the key) takes a first-order last
    step for any N, not only for N < 15: the last step returns x0 (scheduling_dpmsolver_multistep.py: step).
  - transformers 5 T5Config always sets tie_word_embeddings true (the argument becomes scale_decoder_outputs), so
    config.json says true where t5-v1_1's says false; irrelevant to the encoder.
  - transformers 5 T5Tokenizer.save_pretrained writes only tokenizer.json and a v5 tokenizer_config.json (no
    spiece.model, no special_tokens_map.json); the PixArt layout is written by this script. A tokenizers-backed
    tokenizer that has been called with padding / truncation saves that state into tokenizer.json; each pipeline
    here gets a fresh copy.
  - transformers' T5LayerNorm computes its variance in float32 whatever the dtype; the f64 reference patches that
    (only there). diffusers' sinusoidal timestep / size embeddings are computed in f32 and then cast, in f64 too.
  - DDIM with clip_sample keeps latents O(1) while 1/sqrt(acp) (up to 157) still amplifies eps noise in unclamped
    entries: its f32-vs-f64 gap on final_latents / image is about 1e-5, ten times the DPM cases' (which are relative
    to latents of a few hundred).
"""
from __future__ import annotations

import argparse
import copy
import filecmp
import importlib.util
import io
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
import google.protobuf  # noqa: E402  (transformers' spiece.model -> tokenizers conversion reads the model proto)
import sentencepiece as spm  # noqa: E402
import tokenizers  # noqa: E402
import transformers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel,
)
from safetensors.torch import save_file  # noqa: E402
from transformers import T5Config, T5EncoderModel, T5Tokenizer  # noqa: E402
from transformers.models.t5.modeling_t5 import T5LayerNorm  # noqa: E402

REPO = gp.REPO
torch.utils.deterministic.fill_uninitialized_memory = False  # every torch.empty buffer is overwritten anyway

# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------
L = 120  # max_sequence_length, as PixArt-alpha
EXTRA_IDS = 10  # T5 ships 100 sentinels; 10 keep the token table small (ids 600..609, <extra_id_0> last)

# sentencepiece trainer: a T5-style Unigram model (T5's spiece.model: unigram, nmt_nfkc, pad 0 / eos 1 / unk 2, no
# bos, dummy prefix, extra whitespace removed). One thread, no sampling of the input, a fixed seed: deterministic.
SPM_TRAIN = dict(
    model_type="unigram", vocab_size=600, normalization_rule_name="nmt_nfkc",
    pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
    add_dummy_prefix=True, remove_extra_whitespaces=True, split_digits=False, byte_fallback=False,
    character_coverage=1.0, num_threads=1, input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2,
)
SPM_SEED = 20240

# PixArt-alpha/PixArt-XL-2-512x512 (and -1024-MS) scheduler/scheduler_config.json as shipped (written from
# knowledge of the published file, diffusers 0.22-era keys). Loaded with from_pretrained from a folder holding exactly
# this file, as PixArtAlphaPipeline.from_pretrained would; DDIMScheduler.from_pretrained of the same folder gives the
# pixart-tiny-ddim scheduler (keys DDIM does not know are ignored; clip_sample / set_alpha_to_one take DDIM's
# defaults, true).
PIXART_SCHEDULER_FILE = {
    "_class_name": "DPMSolverMultistepScheduler",
    "_diffusers_version": "0.22.0.dev0",
    "algorithm_type": "dpmsolver++",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "dynamic_thresholding_ratio": 0.995,
    "euler_at_final": False,
    "lambda_min_clipped": -math.inf,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_type": "midpoint",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_karras_sigmas": False,
    "use_lu_lambdas": False,
    "variance_type": None,
}

# T5 v1.1 layout (t5-v1_1-xxl, as PixArt ships it: gated-gelu = gelu_new(wi_0 x) * wi_1 x, 32 buckets, max distance
# 128, eps 1e-6), tiny. T5_A: heads x d_kv = 36 != d_model 32. T5_B (the 1024 case): heads x d_kv = d_model = 40.
T5_A = dict(d_model=32, d_kv=12, num_heads=3, d_ff=48, num_layers=2)
T5_B = dict(d_model=40, d_kv=8, num_heads=5, d_ff=64, num_layers=2)

# PixArt-XL-2's transformer config, tiny. TR_A: sample_size 64 as the 512 model (no resolution / aspect conditions,
# interpolation_scale max(64 // 64, 1) = 1, pos-embed base 32); TR_B: sample_size 128 as the 1024-MS model
# (conditions on, interpolation_scale 2, base 64; inner dim 24 = 3 x 8 divisible by 3 for the size embedders).
TR_COMMON = dict(
    in_channels=4, out_channels=8, patch_size=2, norm_type="ada_norm_single", norm_elementwise_affine=False,
    norm_eps=1e-6, num_embeds_ada_norm=1000, activation_fn="gelu-approximate", attention_bias=True,
    upcast_attention=False, dropout=0.0, norm_num_groups=32, use_additional_conditions=None, interpolation_scale=None,
    attention_type="default",
)
TR_A = dict(TR_COMMON, num_layers=2, num_attention_heads=2, attention_head_dim=8, sample_size=64,
            caption_channels=T5_A["d_model"], cross_attention_dim=16)
TR_B = dict(TR_COMMON, num_layers=2, num_attention_heads=3, attention_head_dim=8, sample_size=128,
            caption_channels=T5_B["d_model"], cross_attention_dim=24)

# 4 levels like SD's VAE (scale factor 8), PixArt's scaling_factor 0.18215, small channels.
PIXART_TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8, scaling_factor=0.18215,
)

LONG_PROMPT = (
    "A breathtaking panoramic matte painting of an ancient walled city built into the side of a towering "
    "emerald mountain, waterfalls cascading between terraced gardens, paper lanterns glowing along winding "
    "stone staircases, merchants with colourful silk awnings, a flock of white herons crossing a pale pink sky "
    "at dawn, mist rolling through pine forests in the valley below, intricate carved wooden balconies, copper "
    "rooftops streaked with verdigris, a lone traveller in a crimson cloak on the old bridge, volumetric light, "
    "ultra detailed, 8k, sharp focus, cinematic composition, by an unknown master of the nineteenth century"
)

# model: "A" (T5_A + TR_A) or "B" (T5_B + TR_B; the tokenizer and the VAE are A's). layout: "full" = the one complete
# pipeline folder; "link" = pipeline -> ../pixart-tiny/pipeline; a tuple = the components this case owns (model_index
# .json always own), every other one a link -> ../../pixart-tiny/pipeline/<name>.
SHARED = "pixart-tiny"
COMPONENTS = ("scheduler", "text_encoder", "tokenizer", "transformer", "vae")
CASES = {
    "pixart-tiny": dict(
        seed=9500, model="A", sched="dpm", layout="full",
        case=dict(prompt="  A Red Fox sitting in the SNOW, golden hour photo  ",
                  negative_prompt="Blurry, low quality, watermark, deformed", guidance_scale=6.0,
                  num_inference_steps=5, grad_step_index=2, height=48, width=64),
    ),
    "pixart-tiny-empty": dict(
        seed=9600, model="A", sched="dpm", layout="link",
        case=dict(prompt="an astronaut riding a horse on the moon, oil painting", negative_prompt="",
                  guidance_scale=3.0, num_inference_steps=4, grad_step_index=1, height=32, width=64),
    ),
    "pixart-tiny-ddim": dict(
        seed=9700, model="A", sched="ddim", layout=("scheduler",),
        case=dict(prompt=LONG_PROMPT, negative_prompt="ugly, distorted, bad anatomy, extra fingers, 2 heads",
                  guidance_scale=4.5, num_inference_steps=5, grad_step_index=3, height=48, width=48),
    ),
    "pixart-tiny-1024": dict(
        seed=9800, model="B", sched="dpm", layout=("text_encoder", "transformer"),
        case=dict(prompt="a watercolor painting of a lighthouse on a cliff at dusk",
                  negative_prompt="grainy, overexposed, too dark", guidance_scale=4.5,
                  num_inference_steps=4, grad_step_index=1, height=64, width=48),
    ),
}

# Extra English for the sentencepiece corpus (written for this script): accents, digits, punctuation, hyphens, so
# the vocabulary has them; emoji, CJK, Greek etc. stay unknown (<unk>).
EXTRA_CORPUS = [
    "a cup of coffee in a small cafe, morning light through the window",
    "the café on the corner serves crème brûlée and a strong espresso",
    "a naïve painting of a façade with a blue door, résumé on the table",
    "über modern architecture, glass and steel, 3 towers at night",
    "a jalapeño pizza with 12 slices, top view, 4k photo",
    "piñata at a birthday party, confetti everywhere",
    "a smörgåsbord of cheeses and breads on a wooden board",
    "an old map of the Côte d'Azur with a compass rose",
    "the 1st, 2nd and 3rd place trophies on a shelf",
    "a clock showing 10:45, 3.14 written on a chalkboard, 1,000 marbles",
    "it's a dog's life; don't wake the cat!",
    "What is this? A strange machine... with 7 levers (and a bell).",
    "a poster that says \"SALE 50% OFF\" in bold red letters",
    "a hand-drawn diagram: input -> model -> output",
    "high-resolution, state-of-the-art, well-lit studio portrait",
    "a robot & a child reading a book together, soft focus",
    "an email address written on a sticky note: name@example.com",
    "the year 2024, 365 days, 24 hours, 60 minutes",
    "ÉCOLE, CAFÉ and HÔTEL signs on a narrow street in Paris",
    "Zoë and Chloë walking past the Noël market in December",
    "a bowl of ramen, steam rising, chopsticks resting on the rim",
    "a minimalist logo, black and white, vector art, flat design",
    "low poly render of a fox in a forest, pastel colors",
    "a macro photo of a dew drop on a leaf, bokeh background",
    "blurry, low quality, jpeg artifacts, watermark, text, signature",
    "distorted, ugly, deformed, bad anatomy, extra limbs, poorly drawn hands",
    "oversaturated, overexposed, underexposed, grainy, noisy, too dark, too bright",
    "a medieval knight in shining armour holding a sword and a shield",
    "a cozy living room with a fireplace, a cat sleeping on the rug",
    "an aerial view of a winding river through a green valley at sunrise",
]


def corpus() -> list[str]:
    path = REPO.parent / "shared/data/PartiPrompts.tsv"
    rows = path.read_text(encoding="utf-8").split("\n")
    assert rows[0].split("\t")[0] == "Prompt", rows[0]
    prompts = [r.split("\t")[0] for r in rows[1:] if r.strip()]
    assert len(prompts) == 1632, len(prompts)
    return prompts + EXTRA_CORPUS + [c["case"]["prompt"].lower().strip() for c in CASES.values()]


# Tricky texts of tests/fixtures/t5_tokenizer/cases.json (no literal special tokens: see the notes in meta.json).
TOKENIZER_TEXTS = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "double  spaces   and    more",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\nhere",
    "non-breaking\u00a0space, em\u2003space, ideographic\u3000space",
    "café crème brûlée",
    "cafe\u0301 (NFD: e + combining acute)",
    "full-width ＡＢＣ１２３ and ligatures ﬁ ﬂ",
    "1234 apples, 3.14 pies and 1,000,000 dollars on 2024-01-31",
    "Hello, world!!! What?!?! No way...",
    "\u201csmart quotes\u201d \u2018single\u2019 \u2026 \u2014 dashes",
    "emoji 😀 🎨🖌️ and 日本語 and Ελληνικά",
    "zero\u200bwidth and control\u0007bell",
    "it's a dog's life; don't wake the CAT",
    "x",
    "",
    "   ",
    LONG_PROMPT,
]


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------
def train_spm(sentences: list[str]) -> bytes:
    spm.set_random_generator_seed(SPM_SEED)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=buf, **SPM_TRAIN)
    return buf.getvalue()


def pixart_tokenizer_config() -> tuple[dict, dict]:
    """tokenizer_config.json and special_tokens_map.json in PixArt's layout (transformers 4.x T5Tokenizer files)."""
    extra = [f"<extra_id_{i}>" for i in range(EXTRA_IDS)]
    cfg = {
        "additional_special_tokens": extra,
        "clean_up_tokenization_spaces": True,
        "eos_token": "</s>",
        "extra_ids": EXTRA_IDS,
        "model_max_length": 512,
        "pad_token": "<pad>",
        "sp_model_kwargs": {},
        "tokenizer_class": "T5Tokenizer",
        "unk_token": "<unk>",
    }
    stm = {"additional_special_tokens": extra, "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    return cfg, stm


def write_json(path: Path, obj, indent=2) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)
        f.write("\n")


def write_pixart_tokenizer_files(tok_dir: Path, spm_bytes: bytes) -> None:
    """spiece.model + PixArt-style tokenizer_config.json + special_tokens_map.json (tokenizer.json left as it is)."""
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / "spiece.model").write_bytes(spm_bytes)
    cfg, stm = pixart_tokenizer_config()
    write_json(tok_dir / "tokenizer_config.json", cfg)
    write_json(tok_dir / "special_tokens_map.json", stm)


def build_tokenizer(spm_bytes: bytes, work: Path) -> T5Tokenizer:
    """T5Tokenizer converted by transformers from spiece.model (the folder has no tokenizer.json)."""
    d = work / "spiece_only"
    write_pixart_tokenizer_files(d, spm_bytes)
    tok = T5Tokenizer.from_pretrained(str(d))
    assert not (d / "tokenizer.json").exists()
    sp = spm.SentencePieceProcessor(model_proto=spm_bytes)
    n = sp.get_piece_size()
    assert len(tok) == n + EXTRA_IDS, (len(tok), n)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    # <extra_id_i> after the sentencepiece vocab in reverse: <extra_id_0> is the last id
    assert tok.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(EXTRA_IDS)]) == \
        list(range(n + EXTRA_IDS - 1, n - 1, -1))
    return tok


def fix_tokenizer_dir(tok_dir: Path, spm_bytes: bytes) -> list[str]:
    """After PixArtAlphaPipeline.save_pretrained (transformers 5 writes tokenizer.json + its own tokenizer_config
    .json): add spiece.model and special_tokens_map.json, PixArt's tokenizer_config.json, tokenizer.json compacted."""
    written = sorted(p.name for p in tok_dir.iterdir())
    tj = tok_dir / "tokenizer.json"
    with open(tj, encoding="utf-8") as f:
        data = json.load(f)
    # a tokenizers-backed tokenizer that has been called with padding / truncation keeps them and would save them
    # (the tokenizers library, e.g. the Rust crate, then applies them on every encode): never in these files
    assert data["truncation"] is None and data["padding"] is None, (data["truncation"], data["padding"])
    assert data["model"]["type"] == "Unigram" and data["normalizer"]["type"] == "Precompiled"
    with open(tj, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, separators=(",", ":"))
    write_pixart_tokenizer_files(tok_dir, spm_bytes)
    return written


def sp_ids(sp, text: str) -> list[int]:
    """The sentencepiece library itself (the backend of transformers 4's slow T5Tokenizer): pieces + </s>."""
    return [int(i) for i in sp.encode(text)] + [1]


def sp_padded(sp, text: str, n: int) -> tuple[list[int], list[int]]:
    """What encode_prompt's tokenizer call must give: truncate to n - 1 pieces, </s>, pad with 0 to n."""
    ids = [int(i) for i in sp.encode(text)][: n - 1] + [1]
    return ids + [0] * (n - len(ids)), [1] * len(ids) + [0] * (n - len(ids))


def hf_padded(tok, text: str, n: int) -> tuple[list[int], list[int]]:
    enc = tok(text, padding="max_length", max_length=n, truncation=True, add_special_tokens=True)
    return [int(i) for i in enc.input_ids], [int(i) for i in enc.attention_mask]


def check_tokenizer_dir(tok_dir: Path, spm_bytes: bytes, texts: list[str]) -> list[dict]:
    """Five ways to tokenize must agree on every text: the sentencepiece library on spiece.model; transformers'
    T5Tokenizer from the full folder, from the folder without tokenizer.json (converted from spiece.model), from the
    folder without spiece.model; the tokenizers library on tokenizer.json alone."""
    sp = spm.SentencePieceProcessor(model_proto=spm_bytes)
    assert (tok_dir / "spiece.model").read_bytes() == spm_bytes
    with tempfile.TemporaryDirectory() as td:
        no_json, no_spm = Path(td) / "no_json", Path(td) / "no_spm"
        shutil.copytree(tok_dir, no_json)
        (no_json / "tokenizer.json").unlink()
        shutil.copytree(tok_dir, no_spm)
        (no_spm / "spiece.model").unlink()
        toks = {"full folder": T5Tokenizer.from_pretrained(str(tok_dir)),
                "spiece.model only": T5Tokenizer.from_pretrained(str(no_json)),
                "tokenizer.json only": T5Tokenizer.from_pretrained(str(no_spm))}
    raw = tokenizers.Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    for name, tk in toks.items():
        assert len(tk) == sp.get_piece_size() + EXTRA_IDS and (tk.pad_token_id, tk.eos_token_id) == (0, 1), name
    rows = []
    for text in texts:
        ref = sp_ids(sp, text)
        assert raw.encode(text).ids == ref, ("tokenizers", ascii(text))
        ref_pad, ref_mask = sp_padded(sp, text, L)
        for name, tk in toks.items():
            assert [int(i) for i in tk(text).input_ids] == ref, (name, ascii(text))
            assert hf_padded(tk, text, L) == (ref_pad, ref_mask), (name, ascii(text))
        rows.append({"text": text, "ids": ref, "ids_padded_to_L": ref_pad, "attention_mask": ref_mask})
    return rows


def write_tokenizer_fixture(tok_dir: Path, spm_bytes: bytes, out: Path) -> None:
    """tests/fixtures/t5_tokenizer/: copies of the pipeline's tokenizer files, cases.json, meta.json."""
    print(f"== t5_tokenizer -> {out}")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tok_dir / name, out / name)
    rows = check_tokenizer_dir(out, spm_bytes, TOKENIZER_TEXTS)
    assert any(len(r["ids"]) > L for r in rows) and any(r["ids"] == [1] for r in rows)
    assert any(2 in r["ids"] for r in rows)  # some <unk>
    with open(out / "cases.json", "w", encoding="ascii") as f:
        f.write("[\n" + ",\n".join(json.dumps(r, ensure_ascii=True) for r in rows) + "\n]\n")
    sp = spm.SentencePieceProcessor(model_proto=spm_bytes)
    meta = {
        "generator": "tools/gen_pixart_parity.py",
        "L": L,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "sentencepiece": spm.__version__,
        "protobuf": google.protobuf.__version__,
        "vocab": f"{sp.get_piece_size()} sentencepiece pieces (Unigram, nmt_nfkc, trained by this script on "
                 f"PartiPrompts + extra English) + {EXTRA_IDS} <extra_id_i> = {sp.get_piece_size() + EXTRA_IDS} ids",
        "special": "<pad> 0, </s> 1, <unk> 2, no BOS; <extra_id_i> = id 609 - i",
        "ids": "tokenizer(text).input_ids: pieces then </s>, no padding, no truncation",
        "ids_padded_to_L": "tokenizer(text, padding='max_length', max_length=L, truncation=True): at most L - 1 "
                           "pieces, then </s>, then <pad> (0) up to L",
        "attention_mask": "1 on the pieces and </s>, 0 on padding",
        "agreement": "every row is identical from: the sentencepiece library on spiece.model (+ </s>); transformers "
                     "T5Tokenizer from this folder, from spiece.model without tokenizer.json (transformers' T5 "
                     "converter), from tokenizer.json without spiece.model; tokenizers.Tokenizer.from_file("
                     "tokenizer.json). transformers 5 has one T5Tokenizer class (T5TokenizerFast is the same "
                     "class, tokenizers-backed): the sentencepiece library stands for the old slow tokenizer",
        "notes": [
            "texts are tokenized as given; PixArtAlphaPipeline lower()s and strip()s prompts before this",
            "normalizer: the nmt_nfkc precompiled charsmap (NFKC: full-width letters and ligatures fold, NBSP/em/"
            "ideographic spaces become spaces, zero-width and control characters are removed); whitespace runs "
            "collapse; each word gets the '\u2581' prefix",
            "characters outside the vocabulary (emoji, CJK, Greek here) become <unk> (2); a run of unknown "
            "characters inside one word is one <unk>",
            "not in cases.json: literal special tokens in the text ('</s>', '<extra_id_0>'): transformers and "
            "tokenizers match them as special tokens (e.g. 'a</s>b' -> [3, 1, 30, 1]) while the sentencepiece "
            "library reads them as characters, so the two backends differ there",
        ],
    }
    with open(out / "meta.json", "w", encoding="ascii") as f:
        json.dump(meta, f, ensure_ascii=True, indent=1)
        f.write("\n")
    n_unk = sum(1 for r in rows if 2 in r["ids"])
    print(f"   {len(rows)} texts: sentencepiece, T5Tokenizer x3 (full / spiece.model only / tokenizer.json only) "
          f"and tokenizers agree; {n_unk} with <unk>; longest {max(len(r['ids']) for r in rows)} ids")


# --------------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def redraw(model: torch.nn.Module, seed: int) -> None:
    """gen_parity's o1_init, plus what it does not know (T5's RMS-norm weights, PixArt's scale_shift_tables);
    asserts that every parameter was re-drawn (nothing of the libraries' default init survives)."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gp.o1_init(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    for _, m in model.named_modules():
        if isinstance(m, T5LayerNorm):
            m.weight.copy_(1.0 + 0.1 * torch.randn(m.weight.shape, generator=g))
    for n, p in model.named_parameters():
        if n.endswith("scale_shift_table"):
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    for n, p in model.named_parameters():
        assert not torch.equal(p, before[n]), f"not re-drawn: {n}"
        assert float(p.abs().max()) > 0.0 and (p.numel() == 1 or float(p.std()) > 0.0), n


def build_t5(c: dict, vocab_size: int, seed: int) -> T5EncoderModel:
    cfg = T5Config(
        vocab_size=vocab_size, d_model=c["d_model"], d_kv=c["d_kv"], num_heads=c["num_heads"], d_ff=c["d_ff"],
        num_layers=c["num_layers"], feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
        relative_attention_max_distance=128, layer_norm_epsilon=1e-6, dropout_rate=0.1, is_encoder_decoder=False,
        use_cache=False, pad_token_id=0, eos_token_id=1, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    te = T5EncoderModel(cfg).eval()
    redraw(te, seed)
    assert te.shared.weight is te.encoder.embed_tokens.weight
    return te


def build_transformer(c: dict, seed: int) -> PixArtTransformer2DModel:
    torch.manual_seed(seed)
    tr = PixArtTransformer2DModel(**c).eval()
    redraw(tr, seed)
    return tr


def build_vae(c: dict, seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(**c).eval()
    redraw(vae, seed)
    return vae


def added_cond(tr, H: int, W: int, batch: int = 2) -> dict:
    """As PixArtAlphaPipeline.__call__ (6.1): resolution / aspect ratio only when sample_size == 128."""
    if tr.config.sample_size != 128:
        return {"resolution": None, "aspect_ratio": None}
    res = torch.tensor([H, W]).repeat(batch, 1).to(torch.float32)
    ar = torch.tensor([float(H / W)]).repeat(batch, 1).to(torch.float32)
    return {"resolution": res, "aspect_ratio": ar}


@torch.no_grad()
def calibrate_transformer(tr, te, lat_shape, seed) -> float:
    """Rescale proj_out so the transformer's output is ~unit std on random inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(lat_shape, generator=g)
    ids = torch.randint(3, te.config.vocab_size - EXTRA_IDS, (1, L), generator=g)
    mask = torch.ones(1, L, dtype=torch.int64)
    emb = te(ids, attention_mask=mask)[0]
    H, W = lat_shape[2] * 8, lat_shape[3] * 8
    stds = [tr(x, encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=torch.tensor([t]),
               added_cond_kwargs=added_cond(tr, H, W, 1)).sample.std().item() for t in (50, 500, 950)]
    s = float(np.mean(stds))
    tr.proj_out.weight.div_(s)
    tr.proj_out.bias.div_(s)
    return s


@torch.no_grad()
def calibrate_vae(vae, lat_shape, seed) -> float:
    """Rescale the VAE decoder's conv_out so images are O(1) (std 0.5) for unit-std latents."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(lat_shape, generator=g)
    img = vae.decode(x / vae.config.scaling_factor).sample
    s = img.std().item() / 0.5
    vae.decoder.conv_out.weight.div_(s)
    vae.decoder.conv_out.bias.div_(s)
    return s


def build_models(spm_bytes: bytes, work: Path) -> dict:
    print("== models")
    tok = build_tokenizer(spm_bytes, work)
    V = len(tok)
    vae = build_vae(PIXART_TINY_VAE, 9001)
    vsf = 2 ** (len(PIXART_TINY_VAE["block_out_channels"]) - 1)
    models = {}
    for key, t5c, trc, seed, spec in (("A", T5_A, TR_A, 9010, CASES["pixart-tiny"]),
                                      ("B", T5_B, TR_B, 9020, CASES["pixart-tiny-1024"])):
        te = build_t5(t5c, V, seed + 1)
        tr = build_transformer(trc, seed + 2)
        H, W = spec["case"]["height"], spec["case"]["width"]
        s = calibrate_transformer(tr, te, (1, 4, H // vsf, W // vsf), seed + 3)
        print(f"   model {key}: T5 {t5c} vocab {V}; transformer inner {tr.inner_dim}, sample_size "
              f"{trc['sample_size']}, use_additional_conditions {tr.use_additional_conditions}; proj_out /{s:.3f}")
        models[key] = dict(tokenizer=tok, text_encoder=te, transformer=tr, vae=vae)
    s = calibrate_vae(vae, (1, 4, 6, 8), 9003)
    print(f"   vae: decoder conv_out /{s:.3f}")
    return models


def scheduler_from_file(kind: str):
    """The scheduler as PixArt's scheduler folder gives it: <Class>.from_pretrained(folder)."""
    with tempfile.TemporaryDirectory() as td:
        (Path(td) / "scheduler").mkdir()
        with open(Path(td) / "scheduler" / "scheduler_config.json", "w") as f:
            json.dump(PIXART_SCHEDULER_FILE, f, indent=2)  # -Infinity for lambda_min_clipped, as diffusers writes it
        cls = DPMSolverMultistepScheduler if kind == "dpm" else DDIMScheduler
        sched = cls.from_pretrained(td, subfolder="scheduler")
    if kind == "ddim":
        c = sched.config
        assert c.clip_sample is True and c.set_alpha_to_one is True and c.timestep_spacing == "linspace"
        assert c.beta_schedule == "linear" and c.steps_offset == 0 and c.prediction_type == "epsilon"
    return sched


# --------------------------------------------------------------------------------------------------
# Reference computation (diffusers' own modules, the same calls as PixArtAlphaPipeline.__call__)
# --------------------------------------------------------------------------------------------------
def tr_call(tr, sched, x, t, emb, mask, added):
    inp = sched.scale_model_input(torch.cat([x] * 2), t)
    ct = t[None].expand(inp.shape[0])
    return tr(inp, encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=ct, added_cond_kwargs=added,
              return_dict=False)[0]


def guide(out, g, C):
    u, c = out.chunk(2)
    n = u + g * (c - u)
    assert out.shape[1] == 2 * C  # learned sigma: keep the eps half
    return n.chunk(2, dim=1)[0]


def text_prep(text: str) -> str:
    return text.lower().strip()  # PixArtAlphaPipeline._text_preprocessing, clean_caption False


@torch.no_grad()
def manual_embeds(pipe, text, n):
    enc = pipe.tokenizer(text_prep(text), padding="max_length", max_length=n, truncation=True,
                         add_special_tokens=True, return_tensors="pt")
    ids, mask = enc.input_ids.to(torch.int64), enc.attention_mask.to(torch.int64)
    emb = pipe.text_encoder(ids, attention_mask=mask)[0]
    return ids, mask, emb


def step_x0(kind, s, eps, t, x):
    """One scheduler step on the scheduler s; returns (prev_sample, the step's data prediction x0)."""
    if kind == "ddim":
        r = s.step(eps, t, x, eta=0.0, generator=None)
        return r.prev_sample, r.pred_original_sample
    r = s.step(eps, t, x)
    return r.prev_sample, s.model_outputs[-1]


def reference(pipe, kind, case, seed):
    tr, vae = pipe.transformer, pipe.vae
    sf = vae.config.scaling_factor
    g, N, k = case["guidance_scale"], case["num_inference_steps"], case["grad_step_index"]
    H, W = case["height"], case["width"]
    vsf = pipe.vae_scale_factor
    C = tr.config.in_channels
    out = {}
    with torch.no_grad():
        pos, pmask, neg, nmask = pipe.encode_prompt(
            case["prompt"], True, negative_prompt=case["negative_prompt"], num_images_per_prompt=1,
            device=torch.device("cpu"), clean_caption=False, max_sequence_length=L)
        pids, pmask_m, pos_m = manual_embeds(pipe, case["prompt"], L)
        nids, nmask_m, neg_m = manual_embeds(pipe, case["negative_prompt"], L)
        assert torch.equal(pos, pos_m) and torch.equal(neg, neg_m)
        assert torch.equal(pmask, pmask_m) and torch.equal(nmask, nmask_m)
        pmask, nmask = pmask.to(torch.int64), nmask.to(torch.int64)

        gen = torch.Generator().manual_seed(seed)
        init = torch.randn((1, C, H // vsf, W // vsf), generator=gen, dtype=torch.float32)
        reward = torch.randn((1, 3, H, W), generator=gen, dtype=torch.float32)

        sched = copy.deepcopy(pipe.scheduler)
        sched.set_timesteps(N)
        timesteps = sched.timesteps.clone()
        assert float(sched.init_noise_sigma) == 1.0
        latents = init * sched.init_noise_sigma
        if hasattr(sched, "set_begin_index"):  # as __call__: DPM has it, DDIM not
            sched.set_begin_index(0)
        emb = torch.cat([neg, pos])
        mask = torch.cat([nmask, pmask])
        added = added_cond(tr, H, W)
        for i, t in enumerate(timesteps):
            if i == k:
                lat_in = latents.clone()
                sched_k = copy.deepcopy(sched)
            mo = tr_call(tr, sched, latents, t, emb, mask, added)
            eps = guide(mo, g, C)
            latents, x0 = step_x0(kind, sched, eps, t, latents)
            if i == k:
                x0_loop, mo_loop = x0.clone(), mo.clone()
        final = latents
        image = vae.decode(final / sf).sample

    # gradient: only the guided step at grad_step_index carries the graph; leaf: the negative embeddings
    neg_l = neg.detach().clone().requires_grad_(True)
    captured = {}
    hooks = [
        tr.adaln_single.register_forward_hook(
            lambda m, a, o: captured.__setitem__("adaln", o[1].detach().clone())),
        tr.caption_projection.register_forward_hook(
            lambda m, a, o: captured.__setitem__("caption", o.detach().clone())),
    ]
    try:
        s = copy.deepcopy(sched_k)
        t = timesteps[k]
        mo = tr_call(tr, s, lat_in, t, torch.cat([neg_l, pos]), mask, added)
        eps = guide(mo, g, C)
        _, x0 = step_x0(kind, s, eps, t, lat_in)
    finally:
        for h in hooks:
            h.remove()
    loss = -(reward * vae.decode(x0 / sf).sample).sum()
    loss.backward()
    assert torch.equal(x0.detach(), x0_loop) and torch.equal(mo.detach(), mo_loop)
    grad = neg_l.grad.detach().clone()
    masked_rows = nmask[0] == 0
    assert float(grad[0, masked_rows].abs().max()) == 0.0 if bool(masked_rows.any()) else True
    assert float(grad[0, ~masked_rows].abs().max()) > 0.0

    out.update(
        prompt_input_ids=pids, negative_input_ids=nids,
        prompt_attention_mask=pmask, negative_prompt_attention_mask=nmask,
        prompt_embeds=pos, negative_prompt_embeds=neg,
        init_latents=init, timesteps=timesteps.to(torch.int64),
        final_latents=final, image=image, grad_latents_in=lat_in,
        model_output_at_grad_step=mo.detach(), eps_at_grad_step=eps.detach(), x0_pred=x0.detach(),
        reward_weight=reward, loss=loss.detach().reshape([]), grad_negative_prompt_embeds=grad,
        adaln_embedded_timestep=captured["adaln"], caption_projection_output=captured["caption"],
    )
    if added["resolution"] is not None:
        out.update(added_cond_resolution=added["resolution"][:1].clone(),
                   added_cond_aspect_ratio=added["aspect_ratio"][:1].clone())
    if kind == "dpm":
        out["sigmas"] = sched.sigmas.clone().to(torch.float32)
    return {k_: v.detach().contiguous() for k_, v in out.items()}


# --------------------------------------------------------------------------------------------------
# Formulas of parity-fixtures.md (any dtype): cross-check diffusers in f32 and run the f64 reference
# --------------------------------------------------------------------------------------------------
class Formula:
    def __init__(self, kind, sched_f32, N):
        self.kind = kind
        self.N = N
        self.T = sched_f32.config.num_train_timesteps
        self.ts = [int(t) for t in sched_f32.timesteps]
        self.ac = sched_f32.alphas_cumprod.double()
        if kind == "ddim":
            self.clip = bool(sched_f32.config.clip_sample)
            self.clip_range = float(sched_f32.config.clip_sample_range)
            self.final_ac = float(sched_f32.final_alpha_cumprod)
            expect = np.linspace(0, self.T - 1, N).round()[::-1].astype(np.int64).tolist()
        else:
            expect = np.linspace(0, self.T - 1, N + 1).round()[::-1][:-1].astype(np.int64).tolist()
        assert self.ts == expect, (self.ts, expect)

    def alpha_sigma(self, i):
        """DPM: alpha_t = sqrt(acp), sigma_t = sqrt(1 - acp) at step i; i == N: the final sigma 0 (alpha 1)."""
        if i == self.N:
            return torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
        a = self.ac[self.ts[i]]
        return torch.sqrt(a), torch.sqrt(1 - a)

    def x0(self, eps, x, i):
        if self.kind == "ddim":
            a = self.ac[self.ts[i]]
            x0 = (x - torch.sqrt(1 - a) * eps) / torch.sqrt(a)
            return x0.clamp(-self.clip_range, self.clip_range) if self.clip else x0
        al, si = self.alpha_sigma(i)
        return (x - si * eps) / al

    def step(self, eps, x, i, prev_x0):
        """Returns (x_next, x0). DDIM (eta 0): previous acp at t - T // N (1 below 0). DPM-Solver++ 2M midpoint:
        first order at the first step and at the last step (final sigma 0: returns x0), second order between."""
        x0 = self.x0(eps, x, i)
        if self.kind == "ddim":
            t = self.ts[i]
            tp = t - self.T // self.N
            ap = self.ac[tp] if tp >= 0 else torch.tensor(self.final_ac, dtype=torch.float64)
            # the direction uses the model's eps, not one recomputed from the clamped x0 (use_clipped_model_output
            # is off)
            return torch.sqrt(ap) * x0 + torch.sqrt(1 - ap) * eps, x0
        if i == self.N - 1:
            return x0, x0
        al_s, si_s = self.alpha_sigma(i)
        al_t, si_t = self.alpha_sigma(i + 1)
        lam_s, lam_t = torch.log(al_s / si_s), torch.log(al_t / si_t)
        h = lam_t - lam_s
        base = (si_t / si_s) * x
        if i == 0:
            return base - al_t * (torch.exp(-h) - 1.0) * x0, x0
        al_p, si_p = self.alpha_sigma(i - 1)
        r0 = (lam_s - torch.log(al_p / si_p)) / h
        d1 = (x0 - prev_x0) / r0
        return base - al_t * (torch.exp(-h) - 1.0) * x0 - 0.5 * al_t * (torch.exp(-h) - 1.0) * d1, x0


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


class _T5NormF64:
    """transformers' T5LayerNorm computes the variance in float32 whatever the input dtype; for the float64
    reference only, compute it in the input's dtype."""

    def __enter__(self):
        self.orig = T5LayerNorm.forward

        def fwd(m, h):
            var = h.pow(2).mean(-1, keepdim=True)
            return m.weight * (h * torch.rsqrt(var + m.variance_epsilon))
        T5LayerNorm.forward = fwd

    def __exit__(self, *a):
        T5LayerNorm.forward = self.orig


def check_formulas_and_f64(pipe, kind, case, exp) -> dict:
    """(1) diffusers' f32 steps == the doc's formulas along the stored trajectory; (2) a float64 run of everything
    (T5, transformer, VAE cast to f64; scheduler by the formulas); (3) the float64 gradient, from the stored f32
    grad_latents_in and along the f64 trajectory; (4) f64 central finite differences."""
    N, k, g = case["num_inference_steps"], case["grad_step_index"], case["guidance_scale"]
    H, W = case["height"], case["width"]
    sched = copy.deepcopy(pipe.scheduler)
    sched.set_timesteps(N)
    f = Formula(kind, sched, N)
    tr32 = pipe.transformer
    C = tr32.config.in_channels
    sf = pipe.vae.config.scaling_factor
    pos, neg = exp["prompt_embeds"], exp["negative_prompt_embeds"]
    mask = torch.cat([exp["negative_prompt_attention_mask"], exp["prompt_attention_mask"]])
    added32 = added_cond(tr32, H, W)

    # (1) f32: formula step vs diffusers step along the stored trajectory
    worst = 0.0
    with torch.no_grad():
        x = exp["init_latents"].clone()
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(0)
        prev = None
        for i, t in enumerate(sched.timesteps):
            eps = guide(tr_call(tr32, sched, x, t, torch.cat([neg, pos]), mask, added32), g, C)
            nx, x0 = step_x0(kind, sched, eps, t, x)
            fx, fx0 = f.step(eps.double(), x.double(), i, prev)
            worst = max(worst, rel(nx, fx), rel(x0, fx0))
            prev = fx0
            x = nx
        assert torch.equal(x, exp["final_latents"])
    print(f"   diffusers f32 steps vs doc formulas (f64 arithmetic): worst rel {worst:.1e}")
    assert worst < 1e-5, worst

    # (2) f64 forward from the token ids
    d = torch.float64
    te = copy.deepcopy(pipe.text_encoder).double()
    tr = copy.deepcopy(tr32).double()
    vae = copy.deepcopy(pipe.vae).double()
    added = {k_: (v.double() if v is not None else None) for k_, v in added32.items()}
    with torch.no_grad(), _T5NormF64():
        pos64 = te(exp["prompt_input_ids"], attention_mask=exp["prompt_attention_mask"])[0]
        neg64 = te(exp["negative_input_ids"], attention_mask=exp["negative_prompt_attention_mask"])[0]

    def model(x, i, neg_):
        t = torch.tensor([f.ts[i]] * 2)
        mo = tr(torch.cat([x] * 2).to(d), encoder_hidden_states=torch.cat([neg_, pos64]),
                encoder_attention_mask=mask, timestep=t, added_cond_kwargs=added, return_dict=False)[0]
        return mo, guide(mo, g, C)

    with torch.no_grad():
        x = exp["init_latents"].double()
        prev = None
        for i in range(N):
            if i == k:
                lat_k = x.clone()
            mo, eps = model(x, i, neg64)
            if i == k:
                mo_k = mo
            x, prev = f.step(eps, x, i, prev)
        img = vae.decode(x / sf).sample
    r = dict(prompt_embeds=rel(exp["prompt_embeds"], pos64), negative_prompt_embeds=rel(exp["negative_prompt_embeds"],
             neg64), grad_latents_in=rel(exp["grad_latents_in"], lat_k),
             model_output_at_grad_step=rel(exp["model_output_at_grad_step"], mo_k),
             final_latents=rel(exp["final_latents"], x), image=rel(exp["image"], img))
    print("   f32 vs f64 forward rel err: " + ", ".join(f"{a} {b:.1e}" for a, b in r.items()))
    assert max(r.values()) < 1e-4, r

    # (3) f64 gradient: from the stored f32 grad_latents_in (step-local), and along the f64 trajectory
    rw = exp["reward_weight"].double()

    def loss_f(neg_, lat):
        _, eps = model(lat, k, neg_)
        x0 = f.x0(eps, lat, k)
        return -(rw * vae.decode(x0 / sf).sample).sum(), x0

    n64 = exp["negative_prompt_embeds"].double().clone().requires_grad_(True)
    l64, x064 = loss_f(n64, exp["grad_latents_in"].double())
    l64.backward()
    m64 = neg64.clone().requires_grad_(True)
    lm64, _ = loss_f(m64, lat_k)
    lm64.backward()
    masked = exp["negative_prompt_attention_mask"][0] == 0
    for gr in (n64.grad, m64.grad):
        assert not bool(masked.any()) or float(gr[0, masked].abs().max()) == 0.0
    r.update(
        loss_local=rel(exp["loss"].reshape(1), l64.detach().reshape(1)),
        x0_pred_local=rel(exp["x0_pred"], x064.detach()),
        grad_local=rel(exp["grad_negative_prompt_embeds"], n64.grad),
        loss_traj=rel(exp["loss"].reshape(1), lm64.detach().reshape(1)),
        grad_traj=rel(exp["grad_negative_prompt_embeds"], m64.grad),
    )
    print("   f32 vs f64 gradient rel err: " + ", ".join(
        f"{a} {r[a]:.1e}" for a in ("loss_local", "x0_pred_local", "grad_local", "loss_traj", "grad_traj")))
    assert r["loss_local"] < 1e-4 and r["x0_pred_local"] < 1e-4 and r["grad_local"] < 1e-3, r
    assert r["grad_traj"] < 1e-3, r

    # (4) f64 central finite differences on the largest-|grad| entry, a random unmasked one, a masked one
    h = 1e-6
    lat = exp["grad_latents_in"].double()
    gref = n64.grad
    flat = gref.flatten()
    D = gref.shape[-1]
    gen = torch.Generator().manual_seed(7)
    rows_on = torch.nonzero(~masked).flatten()
    idx = [int(flat.abs().argmax()),
           int(rows_on[torch.randint(0, len(rows_on), (1,), generator=gen)]) * D + int(torch.randint(0, D, (1,),
                                                                                                  generator=gen))]
    if bool(masked.any()):
        idx.append(int(torch.nonzero(masked).flatten()[-1]) * D + 1)
    worst = 0.0
    lines = []
    with torch.no_grad():
        for j in idx:
            e = torch.zeros_like(flat)
            e[j] = h
            e = e.view_as(gref)
            base = n64.detach()
            fd = (loss_f(base + e, lat)[0] - loss_f(base - e, lat)[0]).item() / (2 * h)
            err = abs(fd - flat[j].item()) / flat.abs().max().item()
            worst = max(worst, err)
            row = j // D
            lines.append(f"      entry {j:5d} (row {row:3d}, mask {int(exp['negative_prompt_attention_mask'][0, row])})"
                         f": fd64 {fd:+.8e} autograd64 {flat[j].item():+.8e}")
            if bool(masked[row]):
                assert fd == 0.0 and flat[j].item() == 0.0, fd
    print(f"   finite differences worst (rel. to max|g|) {worst:.1e}")
    print("\n".join(lines))
    assert worst < 1e-5, worst
    return r


# --------------------------------------------------------------------------------------------------
# Case generation
# --------------------------------------------------------------------------------------------------
def call_pipeline(pipe, case, init):
    with torch.no_grad():
        return pipe(case["prompt"], negative_prompt=case["negative_prompt"],
                    num_inference_steps=case["num_inference_steps"], guidance_scale=case["guidance_scale"],
                    height=case["height"], width=case["width"], latents=init.clone(), clean_caption=False,
                    use_resolution_binning=False, max_sequence_length=L, output_type="latent").images


def memory_pipeline(parts: dict, kind: str) -> PixArtAlphaPipeline:
    # a fresh copy of the tokenizer each time: calls leave padding / truncation state on its backend
    parts = dict(parts, tokenizer=copy.deepcopy(parts["tokenizer"]))
    pipe = PixArtAlphaPipeline(scheduler=scheduler_from_file(kind), **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def same_tree(a: Path, b: Path) -> bool:
    """Same file names and bytes (following links)."""
    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return fa == fb and all(filecmp.cmp(a / p, b / p, shallow=False) for p in fa)


def write_pipeline(layout, pipe_mem, spm_bytes: bytes, cdir: Path) -> None:
    pdir = cdir / "pipeline"
    shared = cdir.parent / SHARED / "pipeline"
    if layout == "full":
        assert cdir.name == SHARED
        pipe_mem.save_pretrained(str(pdir), safe_serialization=True)
        written = fix_tokenizer_dir(pdir / "tokenizer", spm_bytes)
        print(f"   pipeline/: full folder; tokenizer: save_pretrained wrote {written}, now "
              f"{sorted(p.name for p in (pdir / 'tokenizer').iterdir())}")
        return
    assert shared.is_dir() and not shared.is_symlink(), f"{shared} missing: generate {SHARED} first"
    if layout == "link":
        os.symlink(os.path.join("..", SHARED, "pipeline"), pdir)
        assert pdir.resolve() == shared.resolve()
        print(f"   pipeline -> {os.readlink(pdir)}")
        return
    pdir.mkdir()
    with tempfile.TemporaryDirectory() as td:
        tdp = Path(td)
        pipe_mem.save_pretrained(td, safe_serialization=True)
        fix_tokenizer_dir(tdp / "tokenizer", spm_bytes)
        shutil.copy(tdp / "model_index.json", pdir / "model_index.json")
        for c in COMPONENTS:
            if c in layout:
                shutil.copytree(tdp / c, pdir / c)
                assert not same_tree(tdp / c, shared / c), f"{c} is owned but equals the shared one"
            else:
                # what this case's save_pretrained wrote for a linked component is byte-identical to the shared one
                assert same_tree(tdp / c, shared / c), f"{c}: linked, but differs from {shared / c}"
                os.symlink(os.path.join("..", "..", SHARED, "pipeline", c), pdir / c)
                assert (pdir / c).resolve() == (shared / c).resolve()
    print("   pipeline/: own model_index.json, " + ", ".join(f"{c}/" for c in COMPONENTS if c in layout) + "; "
          + ", ".join(f"{c} -> {os.readlink(pdir / c)}" for c in COMPONENTS if c not in layout)
          + " (byte-identical to what this pipeline's save_pretrained writes)")


def gen_case(name: str, spec: dict, models: dict, spm_bytes: bytes, out: Path) -> dict:
    print(f"== {name}")
    case = dict(spec["case"])
    kind = spec["sched"]
    H, W = case["height"], case["width"]
    assert H % 8 == 0 and W % 8 == 0
    pipe_mem = memory_pipeline(models[spec["model"]], kind)
    vsf = pipe_mem.vae_scale_factor
    assert vsf == 8 and (H // vsf) % 2 == 0 and (W // vsf) % 2 == 0
    print(f"   latents {H // vsf}x{W // vsf}, {(H // vsf // 2) * (W // vsf // 2)} patches; scheduler "
          f"{type(pipe_mem.scheduler).__name__}")
    if spec["layout"] == "link":
        assert spec["model"] == CASES[SHARED]["model"] and kind == CASES[SHARED]["sched"]

    cdir = out / name
    if cdir.is_symlink():
        cdir.unlink()
    elif cdir.exists():
        shutil.rmtree(cdir)  # does not follow links inside
    cdir.mkdir(parents=True)
    write_pipeline(spec["layout"], pipe_mem, spm_bytes, cdir)
    pdir = cdir / "pipeline"

    # ---- load the folder back from disk (through the links), in f32: every expected tensor is computed from it
    re_pipe = PixArtAlphaPipeline.from_pretrained(str(pdir), dtype=torch.float32)
    re_pipe.set_progress_bar_config(disable=True)
    assert type(re_pipe.scheduler) is type(pipe_mem.scheduler)
    assert type(re_pipe.transformer) is PixArtTransformer2DModel and type(re_pipe.text_encoder) is T5EncoderModel

    def public(cfg):
        return {k: v for k, v in dict(cfg).items() if not k.startswith("_")}
    assert public(re_pipe.scheduler.config) == public(pipe_mem.scheduler.config)
    assert re_pipe.transformer.use_additional_conditions == (re_pipe.transformer.config.sample_size == 128)
    for comp in ("transformer", "vae", "text_encoder"):
        sd_mem, sd_disk = getattr(pipe_mem, comp).state_dict(), getattr(re_pipe, comp).state_dict()
        assert list(sd_mem) == list(sd_disk), comp
        for n in sd_mem:
            assert sd_disk[n].dtype == torch.float32 and torch.equal(sd_mem[n], sd_disk[n]), (comp, n)
    texts = [case["prompt"], case["negative_prompt"], text_prep(case["prompt"]), text_prep(case["negative_prompt"])]
    check_tokenizer_dir(pdir / "tokenizer", spm_bytes, texts + TOKENIZER_TEXTS)
    for t in texts:
        assert hf_padded(re_pipe.tokenizer, t, L) == hf_padded(pipe_mem.tokenizer, t, L)
    print("   reloaded: scheduler config, tokenizer ids (5 ways), all weights equal the in-memory model")

    exp = reference(re_pipe, kind, case, spec["seed"])
    sp = spm.SentencePieceProcessor(model_proto=spm_bytes)
    for key, mkey, text in (("prompt_input_ids", "prompt_attention_mask", case["prompt"]),
                            ("negative_input_ids", "negative_prompt_attention_mask", case["negative_prompt"])):
        ids, m = sp_padded(sp, text_prep(text), L)
        assert exp[key][0].tolist() == ids and exp[mkey][0].tolist() == m, key
    if case["negative_prompt"] == "":
        assert exp["negative_prompt_attention_mask"][0].tolist() == [1] + [0] * (L - 1)
        assert exp["negative_input_ids"][0].tolist() == [1] + [0] * (L - 1)
    n_untrunc = len(sp.encode(text_prep(case["prompt"]))) + 1
    print(f"   prompt: {n_untrunc} ids before truncation ({'truncated to ' + str(L) if n_untrunc > L else 'fits'}); "
          f"negative: {int(exp['negative_prompt_attention_mask'].sum())} real ids")
    if kind == "ddim":
        x0 = exp["x0_pred"]
        frac = float((x0.abs() < 1.0).float().mean())
        print(f"   DDIM clip_sample: {100 * frac:.0f}% of x0_pred inside (-1, 1) (gradient flows there), "
              "the rest clamped")
        assert 0.1 < frac < 0.9, frac
    gaps = check_formulas_and_f64(re_pipe, kind, case, exp)
    # diffusers' own __call__, on the reloaded pipeline and on the in-memory one: bit for bit
    for label, p in (("reloaded", re_pipe), ("in memory", pipe_mem)):
        lat = call_pipeline(p, case, exp["init_latents"])
        ok = torch.equal(lat, exp["final_latents"])
        print(f"   PixArtAlphaPipeline.__call__ ({label}) final_latents rel err {rel(lat, exp['final_latents']):.2e}"
              f"{' (bitwise equal)' if ok else ''}")
        assert ok, label

    case_json = dict(kind="pixart", prompt=case["prompt"], negative_prompt=case["negative_prompt"],
                     guidance_scale=case["guidance_scale"], num_inference_steps=case["num_inference_steps"],
                     grad_step_index=case["grad_step_index"], height=H, width=W, max_sequence_length=L,
                     clean_caption=False, use_resolution_binning=False,
                     scheduler=type(re_pipe.scheduler).__name__)
    with open(cdir / "case.json", "w") as f:
        json.dump(case_json, f, indent=2, ensure_ascii=True)
        f.write("\n")
    save_file(exp, str(cdir / "expected.safetensors"))
    rows = listing(cdir)
    return {"name": name, "exp": exp, "size": sum(s for _, s, _ in rows), "rows": rows, "gaps": gaps}


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


def summary(results, out: Path, tok_out: Path | None):
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
            print(f"   {k:32s} {str(list(v.shape)):16s} {rng}")
            if v.dtype != torch.int64:
                assert torch.isfinite(v).all(), k
    print("\nf32 vs f64 (max|a-b| / max|b|):")
    keys = ["prompt_embeds", "negative_prompt_embeds", "final_latents", "image", "x0_pred_local", "loss_local",
            "grad_local", "grad_traj"]
    print("   " + " ".join(f"{k:>14s}" for k in ["case"] + keys))
    for r in results:
        print("   " + f"{r['name']:>14s} " + " ".join(f"{r['gaps'][k]:14.1e}" for k in keys))
    dirs = [str(out / n) for n in CASES if (out / n).exists()]
    if tok_out is not None and tok_out.exists():
        dirs.append(str(tok_out))
    sys.stdout.flush()
    subprocess.run(["du", "-shc", *dirs], check=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(REPO / "tests/fixtures/parity"))
    ap.add_argument("--tokenizer-out", default=str(REPO / "tests/fixtures/t5_tokenizer"))
    ap.add_argument("--only", nargs="*", default=None)
    a = ap.parse_args()
    print(f"torch {torch.__version__}  diffusers {diffusers.__version__}  transformers {transformers.__version__}  "
          f"tokenizers {tokenizers.__version__}  sentencepiece {spm.__version__}  protobuf "
          f"{google.protobuf.__version__}  numpy {np.__version__}")
    names = list(CASES) + ["t5_tokenizer"]
    want = set(a.only) if a.only else set(names)
    unknown = want - set(names)
    assert not unknown, f"unknown case(s): {sorted(unknown)}"
    out = Path(a.out)
    assert list(CASES)[0] == SHARED and CASES[SHARED]["layout"] == "full"
    if SHARED not in want and want & set(CASES):
        assert (out / SHARED / "pipeline").is_dir(), f"{out / SHARED / 'pipeline'} missing: generate {SHARED} too"

    sentences = corpus()
    spm_bytes = train_spm(sentences)
    again = train_spm(sentences)
    assert spm_bytes == again, "sentencepiece training is not deterministic"
    sp = spm.SentencePieceProcessor(model_proto=spm_bytes)
    print(f"== sentencepiece: {len(sentences)} sentences -> {sp.get_piece_size()} pieces, spiece.model "
          f"{len(spm_bytes)} bytes (trained twice: identical)")
    with tempfile.TemporaryDirectory() as td:
        models = build_models(spm_bytes, Path(td))
        if "t5_tokenizer" in want:
            tdir = Path(td) / "pixart_layout"
            pipe = memory_pipeline(models["A"], "dpm")
            pipe.tokenizer.save_pretrained(str(tdir))
            fix_tokenizer_dir(tdir, spm_bytes)
            write_tokenizer_fixture(tdir, spm_bytes, Path(a.tokenizer_out))
        results = [gen_case(n, s, models, spm_bytes, out) for n, s in CASES.items() if n in want]
    if "t5_tokenizer" in want and (out / SHARED / "pipeline" / "tokenizer").is_dir():
        for n in ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            assert filecmp.cmp(out / SHARED / "pipeline" / "tokenizer" / n, Path(a.tokenizer_out) / n, shallow=False)
        print("t5_tokenizer/ tokenizer files are byte-identical to pixart-tiny/pipeline/tokenizer/")
    summary(results, out, Path(a.tokenizer_out) if "t5_tokenizer" in want else None)


if __name__ == "__main__":
    sys.exit(main())
