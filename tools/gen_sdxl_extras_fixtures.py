#!/usr/bin/env python3
"""Write the SDXL extras fixtures: SDXL textual inversion (clip_l + clip_g), SDXL LoRAs in kohya's sgm layout and in
the diffusers/PEFT layout, diffusers' clip_skip, and AUTOMATIC1111's prompt syntax over both SDXL text encoders.

Reference stack: the pinned venv of tools/gen_parity.py (torch 2.15.0, diffusers 0.42.1, transformers 5.23.0,
safetensors 0.8.0) plus peft 0.21.2, OUTSIDE the repository; never used in CI. Run (CPU, 2 threads, ~10 s):

    /work/pyref/bin/python tools/gen_sdxl_extras_fixtures.py [--out tests/fixtures/sdxl_extras]

The model is tests/fixtures/parity/sdxl-tiny/pipeline (tools/gen_sdxl_parity.py), loaded with
StableDiffusionXLPipeline.from_pretrained(path, torch_dtype=float32) (text encoders stored f16, computed in f32):
text_encoder CLIPTextModel (hidden 32, 3 layers), text_encoder_2 CLIPTextModelWithProjection (hidden 40, 3 layers,
projection 24), both with the real 49408-token CLIP vocabulary (pads '<|endoftext|>' and '!'); UNet
block_out_channels (16, 32, 32), layers_per_block 2, transformer_layers_per_block (1, 1, 2), cross_attention_dim 72,
"text_time" added conditioning (addition_time_embed_dim 8). Deterministic: fixed torch.Generator seeds,
torch.use_deterministic_algorithms, 2 threads; two runs write byte-identical files. The A1111 parser and chunker are
parse() and chunks_of() of tools/gen_prompt_syntax_fixtures.py, imported by path (sys.dont_write_bytecode).
Everything is asserted as it is computed (a failed check stops the script before anything is written but the
input files).

What it writes under --out (all tensors f32):

    negxl.safetensors       {"clip_l": [2, 32], "clip_g": [2, 40]}: a 2-vector SDXL embedding as negativeXL-style
                            files ship it (seeded N(0, 1) rows scaled 0.35 and 0.5, the size of the tiny model's
                            token rows)
    sd15_only.safetensors   {"emb_params": [2, 32]}: an SD1.x embedding (error test: no clip_l / clip_g)
    clip_l_only.safetensors {"clip_l": [2, 32]}: clip_g missing (error test)
    kohya.safetensors       a kohya sd-scripts SDXL LoRA, rank 4, alpha 2 (so alpha / rank = 0.5 matters), each module
                            <name>.lora_down.weight ([4, in] for a Linear, [4, in, kh, kw] for a conv),
                            <name>.lora_up.weight ([out, 4], or [out, 4, 1, 1]) and <name>.alpha (f32 scalar, shape []):
                              lora_te1_text_model_encoder_layers_<i>_{self_attn_{q,k,v,out}_proj,mlp_fc1,mlp_fc2}
                                (text_encoder; all six in layer 0, some in layers 1 and 2), lora_te2_... the same
                                for text_encoder_2,
                              lora_unet_<sgm name with "_">: UNet modules under their ORIGINAL sgm/ldm names, in
                                input_blocks, middle_block and output_blocks: attn1/attn2 to_q, to_k, to_v, to_out_0,
                                ff_net_0_proj, ff_net_2, proj_in, proj_out (Linear here), resnets' in_layers_2 (conv1),
                                out_layers_3 (conv2), emb_layers_1 (time_emb_proj), skip_connection (conv_shortcut,
                                1x1), downsamplers' input_blocks_<n>_0_op and upsamplers' output_blocks_<n>_2_conv
                              (45 UNet + 10 text_encoder + 11 text_encoder_2 modules: KOHYA_UNET, KOHYA_TE1,
                              KOHYA_TE2)
    peft.safetensors        a LoRA made with peft (LoraConfig r 4, lora_alpha 4; unet: to_q, to_k, to_v, to_out.0 of
                            the transformer blocks of down_blocks.1.attentions.0, mid_block.attentions.0 and
                            up_blocks.0.attentions.2 only, 40 modules, to keep the file small; text_encoder and
                            text_encoder_2: q_proj, k_proj, v_proj, out_proj of all 3 layers), seeded nonzero lora_A
                            and lora_B, saved by StableDiffusionXLPipeline.save_lora_weights(unet_lora_layers=
                            get_peft_model_state_dict(unet), text_encoder_lora_layers=..., text_encoder_2_lora_layers=
                            ...). Keys: unet.<module>.lora_A.weight [4, in] / .lora_B.weight [out, 4],
                            text_encoder.encoder.layers.<i>.self_attn.<p>.lora_{A,B}.weight and
                            text_encoder_2.text_model.encoder.layers.<i>.self_attn.<p>.lora_{A,B}.weight. No alpha
                            is stored (header metadata only {"format": "pt"}): a loader must take alpha = rank
                            (scale 1), as diffusers does. NB text_encoder's keys have no "text_model." because
                            transformers 5 flattened CLIPTextModel (its own weights are "encoder.layers..."; files
                            made with transformers 4 say text_encoder.text_model.encoder...; diffusers accepts both
                            by stripping "text_model." when the model has none); CLIPTextModelWithProjection kept it
    sd15_lora.safetensors   an SD1.x kohya LoRA (error test): lora_te_text_model_encoder_layers_0_self_attn_q_proj
                            (the single-encoder prefix, width 32) and lora_unet_down_blocks_0_attentions_0_
                            transformer_blocks_0_attn1_to_q (diffusers-style SD1 name; this SDXL UNet's down_blocks.0
                            is a DownBlock2D without attentions). diffusers refuses it: NoMatchingPeftModuleError
                            "Target modules {...} not found in the base model" (recorded in case.json)
    expected.safetensors    (shapes in case.json "expected_tensors")
      ti_embeds_<i>         [1, 77, 72]  pipe.encode_prompt(prompt=TI_PROMPTS[i], prompt_2=None, device="cpu",
      ti_pooled_<i>         [1, 24]      num_images_per_prompt=1, do_classifier_free_guidance=False) after
                                         pipe.load_textual_inversion(clip_l, token="negxl", text_encoder=text_encoder,
                                         tokenizer=tokenizer) and the same with clip_g, text_encoder_2, tokenizer_2
      ti_pooled_eos_<i>     [1, 24]      text_encoder_2's projected final-layer-norm row at the EOS position (below)
      base_/kohya_/peft_embeds [1, 77, 72], _pooled [1, 24]: encode_prompt(LORA_PROMPT) without a LoRA, after
                                         load_lora_weights(kohya) + fuse_lora(lora_scale=0.7), after
                                         load_lora_weights(peft) + fuse_lora(lora_scale=1.0) (fresh pipeline each)
      base_/kohya_/peft_eps [1, 4, 8, 8] unet(lora_latents, 500, encoder_hidden_states=<name>_embeds,
                                         added_cond_kwargs={"text_embeds": <name>_pooled,
                                         "time_ids": [[64, 64, 0, 0, 64, 64]]}).sample
      lora_latents          [1, 4, 8, 8] seeded N(0, 1)
      clipskip0_embeds      [1, 77, 72]  encode_prompt(CLIP_SKIP_PROMPT) (clip_skip None: hidden_states[-2] of both)
      clipskip1_embeds      [1, 77, 72]  encode_prompt(..., clip_skip=1): hidden_states[-3] of both encoders, no
                                         final layer norm (asserted against the encoders' own hidden states)
      clipskip1_pooled      [1, 24]      its pooled: asserted bitwise equal to the clip_skip None one
      a1111_embeds_<i>      [1, 77 k, 72] A1111's SDXL conditioning of A1111_PROMPTS[i] (k chunks; below)
      a1111_pooled_<i>      [1, 24]
    case.json               everything a test needs (lists of numbers on one line):
      "model"               the pipeline folder, relative to the repository root
      "expected"            "expected.safetensors"; "expected_tensors": name -> shape of every tensor in it
      "textual_inversion"   {note, file, token "negxl", vectors 2, keys {clip_l: [2, 32], clip_g: [2, 40]},
                            added_tokens {tokenizer: {negxl: 49408, negxl_1: 49409}, tokenizer_2: (same)},
                            error_files {file: why}, prompts: [{prompt, expanded_prompt, ids, expanded_prompt_2,
                            ids_2, eos_index, diffusers_pool_index}]} (expanded_prompt(_2): diffusers'
                            maybe_convert_prompt per tokenizer; ids / ids_2: the 77 ids each tokenizer gave it)
      "lora"                {prompt, timestep 500, time_ids [[64, 64, 0, 0, 64, 64]], latents "lora_latents",
                            names ["base", "kohya", "peft"], note, scales {kohya: 0.7, peft: 1.0},
                            kohya {file, scale, rank, alpha, modules, landed_note, landed: kohya module name ->
                            "<component>.<weight name as in pipeline/<component>/*.safetensors>"},
                            peft {file, scale, rank, lora_alpha_used_to_make_it, target_modules, alpha_stored
                            false, safetensors_metadata, key_counts {unet, text_encoder, text_encoder_2},
                            keys: key -> shape}, sd15 {file, keys, diffusers: the error diffusers raised}}
      "clip_skip"           {prompt, clip_skip 1, pooled_unchanged true, hidden_state_index {clipskip0: -2,
                            clipskip1: -3}, ids, ids_2}
      "a1111"               {hidden_state_index -2, chunk_length 77, tokens_per_chunk 75, pad_ids {l: 49407, g: 0},
                            pooled, equals_diffusers_encode_prompt [prompt indices], prompts: [{prompt, parsed
                            ([[text, weight]], BREAK as ["BREAK", -1]), chunks: [{weights [77], ids_l [77],
                            ids_g [77]}]}]}
      "versions"            torch, diffusers, transformers, peft

1. Textual inversion (diffusers' mechanism): each vector becomes an added token, "negxl" (id 49408) and "negxl_1"
(49409) in BOTH tokenizers, with its row in the resized token table (asserted verbatim); encode_prompt's
maybe_convert_prompt rewrites every "negxl" of the prompt to "negxl negxl_1" (str.replace over the whole prompt, so
repeated names all expand), per tokenizer. Surprise: SDXL's text_encoder_2 config has eos_token_id 2 (as the real
SDXL ships it), so transformers pools at argmax(input_ids), which with added tokens is the FIRST "negxl_1"
position, not EOS: ti_pooled_<i> (diffusers) is that row, asserted; ti_pooled_eos_<i> is the EOS row (what A1111 and
ComfyUI, which keep token ids below 49408, get). Both agree for the prompt without the embedding. Checked: the
embedding changes the embeds and the EOS-pooled vector; rows before it (causal) are bitwise unchanged.

2. LoRAs. diffusers' lora_state_dict sees only lora_te_/lora_te1_/lora_te2_/lora_unet_ keys, remaps sgm block
numbers with _maybe_map_sgm_blocks_to_diffusers(unet_config) (input_blocks n -> down_blocks (n-1)//3, layer
(n-1)%3, inner 0/1 = resnets/attentions, "op" = downsamplers.0; middle_block 0/1/2 -> resnets.0 / attentions.0 /
resnets.1; output_blocks n -> up_blocks n//3, layer n%3, inner 2 = upsamplers.0), then
_convert_non_diffusers_lora_to_diffusers renames (in_layers_2 -> conv1, out_layers_3 -> conv2, emb_layers_1 ->
time_emb_proj, skip_connection -> conv_shortcut, op -> conv) and turns alpha into PEFT's lora_alpha (one value for
all modules here: 2). After fuse_lora every changed weight is matched to the module whose scale * alpha / rank *
up @ down equals its delta (rtol 1e-4): every kohya module changed exactly one weight, no other weight changed
(biases untouched), and each landed on the weight the sgm -> diffusers rule of sgm_name() predicts
(case.json lora.kohya.landed). Nothing in this kohya set had to be left out: diffusers 0.42.1 loads every kind
above for this config. Not included (kohya's LoRA / LoCon do not target them): conv_in (input_blocks_0_0), conv_out
(out_2), time_embed_0/2, label_emb_0_0/0_2 (diffusers maps those too), norms, text_projection. This config has no
output block whose upsampler sits at inner index 1 (an up block without attention and with an upsampler), for which
diffusers' rule (inner 2 = upsamplers) would not hold. The kohya text encoder modules of layer 2 of text_encoder
change no output here (SDXL reads hidden_states[-2]); those of text_encoder_2 reach only the pooled vector.
The PEFT LoRA is also checked against the in-memory adapter model it was saved from (unfused, scale 1): embeds,
pooled and eps agree to 1e-4.

3a. clip_skip: diffusers' SDXL encode_prompt takes hidden_states[-(clip_skip + 2)] of both encoders (no final layer
norm); the pooled vector (text_encoder_2's text_embeds) does not depend on clip_skip.

3b. A1111's SDXL prompt handling (modules/sd_hijack_clip.py, sd_models_xl.py; written afresh, not copied): parse
the prompt (emphasis, BREAK) once; per encoder with its own tokenizer, chunk into 75 tokens (comma rule, BREAK),
each chunk BOS + tokens + EOS padded to 77 with that tokenizer's pad ('<|endoftext|>' 49407 for tokenizer, '!' 0 for
tokenizer_2); encode with output_hidden_states and take hidden_states[-2] (no final layer norm); z *= token weight
(BOS / EOS / pad weigh 1), z *= mean before / mean after, per chunk and per encoder; concatenate the encoders along
features (32 + 40 = 72) and the chunks along the sequence. Pooled: text_encoder_2's text_embeds of the FIRST chunk,
not weighted. Both tokenizers give the same chunks (asserted). The plain prompt "a photo of a cat" is asserted bitwise
equal to diffusers' encode_prompt. The empty prompt is encoded like any prompt (BOS EOS pad...); note A1111 zeroes
cond and pooled when an all-empty prompt is the NEGATIVE prompt (force_zero_negative_prompt), which this fixture does
not model. A1111_PROMPTS: those of gen_prompt_syntax_fixtures.py but its LONG alone and "(LONG:0.8)":
0 plain, 1 emphasis and brackets, 2 nested / escaped / unclosed, 3 BREAK (2 chunks), 4 "..., BREAK, LONG" (3 chunks,
the comma rule), 5 "" (1 chunk).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

sys.dont_write_bytecode = True  # the by-path import below must not drop __pycache__ into the repo's tools/
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(2)
torch.use_deterministic_algorithms(True)

import diffusers  # noqa: E402
import peft  # noqa: E402
import transformers  # noqa: E402
from diffusers import StableDiffusionXLPipeline  # noqa: E402
from diffusers.utils import logging as dlogging  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

dlogging.disable_progress_bar()
transformers.utils.logging.disable_progress_bar()

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
PIPE_REL = "tests/fixtures/parity/sdxl-tiny/pipeline"
PIPE = REPO / PIPE_REL

# A1111's prompt parser and chunker, shared with the SD1 fixture (imported by path, no bytecode written).
_spec = importlib.util.spec_from_file_location("gen_prompt_syntax_fixtures", TOOLS / "gen_prompt_syntax_fixtures.py")
ps = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ps)

# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------
SEED_TI, SEED_LORA, SEED_PEFT, SEED_SD15 = 7301, 7302, 7303, 7304
TI_TOKEN = "negxl"
TI_PROMPTS = [
    "negxl",
    "a photo of a cat, negxl",
    "negxl, blurry, negxl, low quality",
    "a photo of a cat",
]
LORA_PROMPT = "a photo of a cat"
TIMESTEP = 500
TIME_IDS = [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]  # original (h, w), crop (top, left), target (h, w) for 8x8 latents
LATENT_SHAPE = (1, 4, 8, 8)
RANK, KOHYA_ALPHA, KOHYA_SCALE = 4, 2.0, 0.7
PEFT_ALPHA, PEFT_SCALE = 4, 1.0
CLIP_SKIP_PROMPT = "a red cat on a blue sofa, sharp focus"
# The prompt kinds of tools/gen_prompt_syntax_fixtures.py: all of its PROMPTS but LONG alone and "(LONG:0.8)" (the
# 3-chunk "..., BREAK, LONG" covers the comma rule and multi-chunk emphasis; dropped to keep the files small).
A1111_PROMPTS = [p for k, p in enumerate(ps.PROMPTS) if k not in (4, 5)]
# The PEFT LoRA's UNet modules: to_q, to_k, to_v, to_out.0 as asked, but only in 3 of the 9 Transformer2DModels
# (5 of 17 transformer blocks, 40 modules) to keep peft.safetensors small; a regex target_modules (re.fullmatch).
PEFT_UNET_TARGETS = (r".*(down_blocks\.1\.attentions\.0|mid_block\.attentions\.0|up_blocks\.0\.attentions\.2)"
                     r"\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)")
PEFT_TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]

# The kohya LoRA's UNet modules, by their diffusers names (the file uses the sgm names sgm_name() gives).
KOHYA_UNET = [
    # input_blocks
    "down_blocks.0.resnets.0.conv1",
    "down_blocks.0.downsamplers.0.conv",
    "down_blocks.1.resnets.0.conv1",
    "down_blocks.1.resnets.0.conv2",
    "down_blocks.1.resnets.0.time_emb_proj",
    "down_blocks.1.resnets.0.conv_shortcut",
    "down_blocks.1.attentions.0.proj_in",
    *[f"down_blocks.1.attentions.0.transformer_blocks.0.{a}.{p}" for a in ("attn1", "attn2")
      for p in ("to_q", "to_k", "to_v", "to_out.0")],
    "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2",
    "down_blocks.1.attentions.0.proj_out",
    "down_blocks.1.downsamplers.0.conv",
    "down_blocks.2.attentions.1.transformer_blocks.1.attn1.to_q",
    "down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_v",
    # middle_block
    "mid_block.resnets.0.conv1",
    "mid_block.resnets.0.time_emb_proj",
    "mid_block.attentions.0.proj_in",
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
    "mid_block.attentions.0.transformer_blocks.1.attn2.to_k",
    "mid_block.attentions.0.transformer_blocks.1.attn2.to_v",
    "mid_block.attentions.0.transformer_blocks.1.attn2.to_out.0",
    "mid_block.attentions.0.transformer_blocks.1.ff.net.2",
    "mid_block.resnets.1.conv2",
    # output_blocks
    "up_blocks.0.resnets.0.conv1",
    "up_blocks.0.attentions.2.proj_in",
    "up_blocks.0.attentions.2.transformer_blocks.1.attn1.to_k",
    "up_blocks.0.attentions.2.transformer_blocks.1.attn2.to_q",
    "up_blocks.0.attentions.2.transformer_blocks.1.ff.net.0.proj",
    "up_blocks.0.attentions.2.proj_out",
    "up_blocks.0.upsamplers.0.conv",
    "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "up_blocks.1.resnets.2.conv1",
    "up_blocks.1.resnets.2.conv2",
    "up_blocks.1.resnets.2.time_emb_proj",
    "up_blocks.1.resnets.2.conv_shortcut",
    "up_blocks.1.upsamplers.0.conv",
    "up_blocks.2.resnets.1.conv1",
    "up_blocks.2.resnets.2.conv_shortcut",
]
_ALL_TE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
# Text encoder modules (layer index, module) of the kohya LoRA; layer 2 is the last of 3: it reaches only the
# pooled output of text_encoder_2 (SDXL takes hidden_states[-2]), and nothing for text_encoder.
KOHYA_TE1 = [(0, m) for m in _ALL_TE] + [(1, "self_attn.q_proj"), (1, "self_attn.v_proj"), (1, "mlp.fc1"),
                                         (2, "self_attn.k_proj")]
KOHYA_TE2 = [(0, m) for m in _ALL_TE] + [(1, "self_attn.k_proj"), (1, "self_attn.out_proj"), (1, "mlp.fc2"),
                                         (2, "self_attn.q_proj"), (2, "mlp.fc1")]


def load_pipe() -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline.from_pretrained(PIPE, torch_dtype=torch.float32)


def encode(pipe, prompt, **kw):
    with torch.no_grad():
        emb, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt=prompt, prompt_2=None, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False,
            **kw)
    assert neg is None and neg_pooled is None
    return emb.contiguous(), pooled.contiguous()


# ---------------------------------------------------------------------------------------------------------------
# 1. Textual inversion, SDXL style
# ---------------------------------------------------------------------------------------------------------------
def textual_inversion(out_dir: Path, out: dict) -> dict:
    pipe = load_pipe()
    d1 = pipe.text_encoder.config.hidden_size
    d2 = pipe.text_encoder_2.config.hidden_size
    g = torch.Generator().manual_seed(SEED_TI)
    # The tiny model's token tables are N(0, 0.5^2): vectors of that size (rows 0.35 and 0.5 rms).
    clip_l = torch.randn(2, d1, generator=g) * torch.tensor([[0.35], [0.5]])
    clip_g = torch.randn(2, d2, generator=g) * torch.tensor([[0.35], [0.5]])
    save_file({"clip_l": clip_l.contiguous(), "clip_g": clip_g.contiguous()}, out_dir / "negxl.safetensors")
    save_file({"emb_params": (torch.randn(2, d1, generator=g) * 0.4).contiguous()}, out_dir / "sd15_only.safetensors")
    save_file({"clip_l": (torch.randn(2, d1, generator=g) * 0.4).contiguous()}, out_dir / "clip_l_only.safetensors")

    # Reference: diffusers' own loader, once per encoder, from the file as written.
    sd = load_file(out_dir / "negxl.safetensors")
    pipe.load_textual_inversion(sd["clip_l"], token=TI_TOKEN, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(sd["clip_g"], token=TI_TOKEN, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    added = {}
    for name, tok, te, vecs in (("tokenizer", pipe.tokenizer, pipe.text_encoder, clip_l),
                                ("tokenizer_2", pipe.tokenizer_2, pipe.text_encoder_2, clip_g)):
        toks = [TI_TOKEN, f"{TI_TOKEN}_1"]
        ids = tok.convert_tokens_to_ids(toks)
        assert ids == [49408, 49409], ids
        assert f"{TI_TOKEN}_2" not in tok.get_vocab()
        table = te.get_input_embeddings().weight
        assert table.shape[0] == 49410
        for k, i in enumerate(ids):
            assert torch.equal(table[i], vecs[k]), "the vectors must be used verbatim"
        added[name] = dict(zip(toks, ids))

    eos = pipe.tokenizer.eos_token_id
    cases = []
    for i, p in enumerate(TI_PROMPTS):
        emb, pooled = encode(pipe, p)
        out[f"ti_embeds_{i}"], out[f"ti_pooled_{i}"] = emb, pooled
        rec = {"prompt": p}
        for name, tok in (("ids", pipe.tokenizer), ("ids_2", pipe.tokenizer_2)):
            text = pipe.maybe_convert_prompt(p, tok)
            ids = tok(text, padding="max_length", max_length=77, truncation=True).input_ids
            rec["expanded_prompt" if name == "ids" else "expanded_prompt_2"] = text
            rec[name] = ids
        # The pooled row: transformers' CLIPTextModelWithProjection with eos_token_id 2 in its config (as SDXL
        # ships it) pools at argmax(input_ids), which lands on the highest added TI id, not on EOS.
        ids2 = rec["ids_2"]
        eos_pos = ids2.index(eos)
        argmax_pos = max(range(77), key=lambda k: (ids2[k], -k))
        with torch.no_grad():
            o2 = pipe.text_encoder_2(torch.tensor([ids2]), output_hidden_states=True)
            pooled_eos = pipe.text_encoder_2.text_projection(o2.last_hidden_state[:, eos_pos])
            pooled_argmax = pipe.text_encoder_2.text_projection(o2.last_hidden_state[:, argmax_pos])
        assert torch.equal(pooled_argmax, pooled), "diffusers' pooled is the argmax(input_ids) row"
        out[f"ti_pooled_eos_{i}"] = pooled_eos.contiguous()
        rec["eos_index"], rec["diffusers_pool_index"] = eos_pos, argmax_pos
        has_ti = TI_TOKEN in p
        assert (argmax_pos != eos_pos) == has_ti
        cases.append(rec)

    base = TI_PROMPTS.index("a photo of a cat")
    with_ti = TI_PROMPTS.index("a photo of a cat, negxl")
    assert not torch.allclose(out[f"ti_embeds_{with_ti}"], out[f"ti_embeds_{base}"], atol=1e-3)
    assert not torch.allclose(out[f"ti_pooled_eos_{with_ti}"], out[f"ti_pooled_eos_{base}"], atol=1e-3)
    assert torch.equal(out[f"ti_pooled_eos_{base}"], out[f"ti_pooled_{base}"])
    # Causal mask: the rows of the common prefix (BOS a photo of a cat) agree.
    assert torch.equal(out[f"ti_embeds_{with_ti}"][:, :6], out[f"ti_embeds_{base}"][:, :6])
    return {
        "note": "ti_pooled_<i>: diffusers' pooled (text_encoder_2 pools at argmax(input_ids) = diffusers_pool_index, "
                "the first negxl_1 when the prompt has the embedding); ti_pooled_eos_<i>: the same model's projected "
                "row at eos_index (A1111 / ComfyUI pool at EOS). ti_embeds_<i> do not depend on pooling.",
        "file": "negxl.safetensors",
        "token": TI_TOKEN,
        "vectors": 2,
        "keys": {"clip_l": [2, d1], "clip_g": [2, d2]},
        "added_tokens": added,
        "error_files": {"sd15_only.safetensors": "only emb_params [2, 32] (SD1.x format, no clip_l/clip_g)",
                        "clip_l_only.safetensors": "clip_l [2, 32] without clip_g"},
        "prompts": cases,
    }


# ---------------------------------------------------------------------------------------------------------------
# 2. LoRAs
# ---------------------------------------------------------------------------------------------------------------
def sgm_name(name: str, unet) -> str:
    """diffusers UNet module name -> the original sgm/ldm name kohya's sd-scripts writes for SDXL."""
    lpb = unet.config.layers_per_block
    p = name.split(".")
    res_map = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
               "conv_shortcut": "skip_connection"}

    def inner(kind, rest):
        if kind == "resnets":
            return [res_map[rest[0]]] + rest[1:]
        return rest

    if p[0] == "down_blocks":
        b, kind = int(p[1]), p[2]
        if kind == "downsamplers":
            return f"input_blocks.{(b + 1) * (lpb + 1)}.0.op"
        l = int(p[3])
        sub = 0 if kind == "resnets" else 1
        return ".".join(["input_blocks", str(1 + b * (lpb + 1) + l), str(sub)] + inner(kind, p[4:]))
    if p[0] == "mid_block":
        kind, l = p[1], int(p[2])
        idx = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}[(kind, l)]
        return ".".join(["middle_block", str(idx)] + inner(kind, p[3:]))
    if p[0] == "up_blocks":
        b, kind = int(p[1]), p[2]
        if kind == "upsamplers":
            has_attn = hasattr(unet.up_blocks[b], "attentions")
            return f"output_blocks.{b * (lpb + 1) + lpb}.{2 if has_attn else 1}.conv"
        l = int(p[3])
        sub = 0 if kind == "resnets" else 1
        return ".".join(["output_blocks", str(b * (lpb + 1) + l), str(sub)] + inner(kind, p[4:]))
    raise ValueError(name)


def get_module(root, name):
    m = root
    for part in name.split("."):
        m = getattr(m, part) if not part.isdigit() else m[int(part)]
    return m


def te_module_name(te, layer, mod):
    prefix = "text_model." if hasattr(te, "text_model") else ""
    return f"{prefix}encoder.layers.{layer}.{mod}"


def lora_pair(weight_shape, g, rank, up_std):
    """(down, up) for a Linear [out, in] or a Conv2d [out, in, kh, kw], kohya's shapes (down [r, in, kh, kw], up
    [out, r, 1, 1] for convs)."""
    out_f, in_f = weight_shape[0], weight_shape[1]
    fan_in = in_f * (weight_shape[2] * weight_shape[3] if len(weight_shape) == 4 else 1)
    if len(weight_shape) == 2:
        down = torch.randn(rank, in_f, generator=g) / fan_in ** 0.5
        up = torch.randn(out_f, rank, generator=g) * up_std
    else:
        down = torch.randn(rank, in_f, *weight_shape[2:], generator=g) / fan_in ** 0.5
        up = torch.randn(out_f, rank, 1, 1, generator=g) * up_std
    return down.contiguous(), up.contiguous()


def lora_delta(down, up, factor, shape):
    return (factor * (up.flatten(1) @ down.flatten(1))).reshape(shape)


def weights(pipe) -> dict:
    """Every weight of the three LoRA-able models by its plain name (peft's base_layer wrapping removed)."""
    res = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        for n, t in getattr(pipe, comp).named_parameters():
            if "lora_" in n:
                continue
            res[f"{comp}.{n.replace('.base_layer', '')}"] = t.detach().clone()
    return res


def lora_outputs(pipe, latents, out, name):
    emb, pooled = encode(pipe, LORA_PROMPT)
    with torch.no_grad():
        eps = pipe.unet(latents, TIMESTEP, encoder_hidden_states=emb,
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": torch.tensor(TIME_IDS)}).sample
    out[f"{name}_embeds"], out[f"{name}_pooled"], out[f"{name}_eps"] = emb, pooled, eps.contiguous()


def kohya_lora(out_dir: Path, out: dict, latents) -> dict:
    pipe = load_pipe()
    g = torch.Generator().manual_seed(SEED_LORA)
    sd, expected_target, modules = {}, {}, {}

    def add(kohya, comp, module_name):
        w = get_module(getattr(pipe, comp), module_name).weight
        down, up = lora_pair(tuple(w.shape), g, RANK, 0.5 / RANK ** 0.5)
        sd[f"{kohya}.lora_down.weight"] = down
        sd[f"{kohya}.lora_up.weight"] = up
        sd[f"{kohya}.alpha"] = torch.tensor(KOHYA_ALPHA)
        expected_target[kohya] = f"{comp}.{module_name}.weight"
        modules[kohya] = (down, up, tuple(w.shape))

    for n in KOHYA_UNET:
        add("lora_unet_" + sgm_name(n, pipe.unet).replace(".", "_"), "unet", n)
    for prefix, comp, mods in (("lora_te1_", "text_encoder", KOHYA_TE1), ("lora_te2_", "text_encoder_2", KOHYA_TE2)):
        te = getattr(pipe, comp)
        for layer, mod in mods:
            # kohya names the CLIP modules text_model.encoder.layers.<i>.<mod> (the HF checkpoint names)
            add(prefix + f"text_model.encoder.layers.{layer}.{mod}".replace(".", "_"), comp,
                te_module_name(te, layer, mod))
    save_file(sd, out_dir / "kohya.safetensors")

    before = weights(pipe)
    pipe.load_lora_weights(str(out_dir), weight_name="kohya.safetensors", adapter_name="kohya")
    pipe.fuse_lora(lora_scale=KOHYA_SCALE)
    after = weights(pipe)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}

    # Where did each kohya module land? Match every changed weight's delta against each module's own
    # scale * alpha / rank * up @ down.
    factor = KOHYA_SCALE * KOHYA_ALPHA / RANK
    landed = {}
    for kohya, (down, up, shape) in modules.items():
        pred = lora_delta(down, up, factor, shape)
        hits = [k for k in changed if tuple(after[k].shape) == shape
                and torch.allclose(after[k] - before[k], pred, rtol=1e-4, atol=1e-6)]
        assert len(hits) == 1, (kohya, hits)
        landed[kohya] = hits[0]
    assert set(landed.values()) == changed, changed - set(landed.values())
    assert all(k.endswith(".weight") for k in changed)
    mismatch = {k: (landed[k], expected_target[k]) for k in landed if landed[k] != expected_target[k]}
    assert not mismatch, mismatch
    lora_outputs(pipe, latents, out, "kohya")
    return {
        "file": "kohya.safetensors",
        "scale": KOHYA_SCALE,
        "rank": RANK,
        "alpha": KOHYA_ALPHA,
        "modules": len(modules),
        "landed_note": "kohya module -> the weight diffusers' load_lora_weights + fuse_lora changed, as "
                       "<component>.<tensor name in pipeline/<component>/*.safetensors>; found by matching each "
                       "changed weight's delta to scale * alpha / rank * up @ down",
        "landed": landed,
    }


def peft_lora(out_dir: Path, out: dict, latents) -> dict:
    pipe = load_pipe()
    g = torch.Generator().manual_seed(SEED_PEFT)
    pipe.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=PEFT_ALPHA, init_lora_weights=True,
                                     target_modules=PEFT_UNET_TARGETS))
    te_cfg = dict(r=RANK, lora_alpha=PEFT_ALPHA, init_lora_weights=True, target_modules=PEFT_TE_TARGETS)
    pipe.text_encoder.add_adapter(LoraConfig(**te_cfg))
    pipe.text_encoder_2.add_adapter(LoraConfig(**te_cfg))
    with torch.no_grad():
        for comp in ("unet", "text_encoder", "text_encoder_2"):
            for n, prm in getattr(pipe, comp).named_parameters():
                if "lora_A" in n:
                    prm.copy_(torch.randn(prm.shape, generator=g) / prm.shape[1] ** 0.5)
                elif "lora_B" in n:
                    prm.copy_(torch.randn(prm.shape, generator=g) * 0.25 / RANK ** 0.5)
    # The adapter model itself (unfused, scale 1): the reloaded + fused pipeline must agree with it.
    direct = {}
    lora_outputs(pipe, latents, direct, "direct")
    StableDiffusionXLPipeline.save_lora_weights(
        str(out_dir),
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        text_encoder_2_lora_layers=get_peft_model_state_dict(pipe.text_encoder_2),
        weight_name="peft.safetensors",
    )
    path = out_dir / "peft.safetensors"
    with safe_open(path, "pt") as f:
        keys = sorted(f.keys())
        shapes = {k: list(f.get_slice(k).get_shape()) for k in keys}
        meta = f.metadata()

    pipe = load_pipe()
    before = weights(pipe)
    pipe.load_lora_weights(str(out_dir), weight_name="peft.safetensors", adapter_name="peft")
    pipe.fuse_lora(lora_scale=PEFT_SCALE)
    after = weights(pipe)
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in keys})
    # every module of the file changed exactly its own weight
    targets = set()
    for m in modules:
        comp, rest = m.split(".", 1)
        targets.add(f"{comp}.{rest}.weight")
    assert set(changed) == targets, set(changed) ^ targets
    lora_outputs(pipe, latents, out, "peft")
    for s in ("embeds", "pooled", "eps"):
        a, b = direct[f"direct_{s}"], out[f"peft_{s}"]
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (s, (a - b).abs().max())
    by_prefix = {}
    for k in keys:
        by_prefix.setdefault(k.split(".", 1)[0], 0)
        by_prefix[k.split(".", 1)[0]] += 1
    return {
        "file": "peft.safetensors",
        "scale": PEFT_SCALE,
        "rank": RANK,
        "lora_alpha_used_to_make_it": PEFT_ALPHA,
        "target_modules": {"unet": PEFT_UNET_TARGETS, "text_encoder": PEFT_TE_TARGETS,
                           "text_encoder_2": PEFT_TE_TARGETS},
        "alpha_stored": any(k.endswith("alpha") for k in keys),
        "safetensors_metadata": meta,
        "key_counts": by_prefix,
        "keys": shapes,
    }


def sd15_lora(out_dir: Path) -> dict:
    g = torch.Generator().manual_seed(SEED_SD15)
    sd = {}
    for kohya, shape in (("lora_te_text_model_encoder_layers_0_self_attn_q_proj", (32, 32)),
                         ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", (16, 16))):
        down, up = lora_pair(shape, g, RANK, 0.1)
        sd[f"{kohya}.lora_down.weight"], sd[f"{kohya}.lora_up.weight"] = down, up
        sd[f"{kohya}.alpha"] = torch.tensor(KOHYA_ALPHA)
    save_file(sd, out_dir / "sd15_lora.safetensors")
    # What diffusers does with it (recorded, not required of reneg).
    pipe = load_pipe()
    before = weights(pipe)
    try:
        pipe.load_lora_weights(str(out_dir), weight_name="sd15_lora.safetensors", adapter_name="sd15")
        pipe.fuse_lora(lora_scale=1.0)
        after = weights(pipe)
        changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
        result = f"loaded without an error; weights changed: {changed}"
    except Exception as e:  # noqa: BLE001
        result = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    return {"file": "sd15_lora.safetensors", "keys": sorted(sd), "diffusers": result}


# ---------------------------------------------------------------------------------------------------------------
# 3. Clip skip and A1111 prompt syntax over both encoders
# ---------------------------------------------------------------------------------------------------------------
def clip_skip(out: dict) -> dict:
    pipe = load_pipe()
    e0, p0 = encode(pipe, CLIP_SKIP_PROMPT)
    e1, p1 = encode(pipe, CLIP_SKIP_PROMPT, clip_skip=1)
    assert torch.equal(p0, p1), "clip_skip must not change the pooled embedding"
    assert not torch.allclose(e0, e1)
    ids1 = pipe.tokenizer(CLIP_SKIP_PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
    ids2 = pipe.tokenizer_2(CLIP_SKIP_PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
    with torch.no_grad():
        h1 = pipe.text_encoder(torch.tensor([ids1]), output_hidden_states=True).hidden_states
        h2 = pipe.text_encoder_2(torch.tensor([ids2]), output_hidden_states=True).hidden_states
    assert torch.equal(e1, torch.cat([h1[-3], h2[-3]], -1))
    assert torch.equal(e0, torch.cat([h1[-2], h2[-2]], -1))
    out["clipskip0_embeds"], out["clipskip1_embeds"], out["clipskip1_pooled"] = e0, e1, p1
    return {"prompt": CLIP_SKIP_PROMPT, "clip_skip": 1, "pooled_unchanged": True,
            "hidden_state_index": {"clipskip0": -2, "clipskip1": -3}, "ids": ids1, "ids_2": ids2}


def a1111(out: dict) -> dict:
    pipe = load_pipe()
    encoders = (("l", pipe.tokenizer, pipe.text_encoder), ("g", pipe.tokenizer_2, pipe.text_encoder_2))
    cases = []
    for i, prompt in enumerate(A1111_PROMPTS):
        parsed = ps.parse(prompt)
        chunks = [ps.chunks_of(tok, parsed) for _, tok, _ in encoders]
        assert chunks[0] == chunks[1], "both tokenizers share one vocabulary: the same chunks"
        zs, meta, pooled = [], [], None
        for k, ch in enumerate(chunks[0]):
            ws = [1.0] + [w for _, w in ch] + [1.0]
            ws += [1.0] * (77 - len(ws))
            parts, rec = [], {"weights": ws}
            for name, tok, te in encoders:
                ids = [tok.bos_token_id] + [t for t, _ in ch] + [tok.eos_token_id]
                ids += [tok.pad_token_id] * (77 - len(ids))
                with torch.no_grad():
                    o = te(torch.tensor([ids]), output_hidden_states=True)
                z = o.hidden_states[-2]
                before = z.mean()
                z = z * torch.tensor(ws).reshape(1, 77, 1)
                z = z * (before / z.mean())
                parts.append(z)
                rec[f"ids_{name}"] = ids
                if name == "g" and k == 0:
                    pooled = o.text_embeds
            zs.append(torch.cat(parts, -1))
            meta.append(rec)
        out[f"a1111_embeds_{i}"] = torch.cat(zs, 1).contiguous()
        out[f"a1111_pooled_{i}"] = pooled.contiguous()
        cases.append({"prompt": prompt, "parsed": parsed, "chunks": meta})
    # Sanity: a plain short prompt is exactly diffusers' encode_prompt.
    plain = A1111_PROMPTS.index("a photo of a cat")
    emb, pooled = encode(pipe, A1111_PROMPTS[plain])
    assert torch.equal(emb, out[f"a1111_embeds_{plain}"]) and torch.equal(pooled, out[f"a1111_pooled_{plain}"])
    return {"hidden_state_index": -2, "chunk_length": 77, "tokens_per_chunk": 75,
            "pad_ids": {"l": pipe.tokenizer.pad_token_id, "g": pipe.tokenizer_2.pad_token_id},
            "pooled": "text_encoder_2 text_embeds of chunk 0, not emphasis-scaled",
            "equals_diffusers_encode_prompt": [plain],
            "prompts": cases}


# ---------------------------------------------------------------------------------------------------------------
def to_json(o, ind=0) -> str:
    """JSON with one dict entry per line and every list of scalars (or of [text, weight] pairs) on one line."""
    pad = " " * (ind + 1)
    if isinstance(o, dict) and o:
        body = ",\n".join(f"{pad}{json.dumps(k)}: {to_json(v, ind + 1)}" for k, v in o.items())
        return "{\n" + body + "\n" + " " * ind + "}"
    if isinstance(o, list) and any(isinstance(x, dict) for x in o):
        return "[\n" + ",\n".join(pad + to_json(x, ind + 1) for x in o) + "\n" + " " * ind + "]"
    return json.dumps(o)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(REPO / "tests/fixtures/sdxl_extras"))
    a = ap.parse_args()
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out: dict = {}
    case = {"model": PIPE_REL, "expected": "expected.safetensors"}
    case["textual_inversion"] = textual_inversion(out_dir, out)

    g = torch.Generator().manual_seed(SEED_LORA - 100)
    latents = torch.randn(*LATENT_SHAPE, generator=g)
    out["lora_latents"] = latents.contiguous()
    base = load_pipe()
    lora_outputs(base, latents, out, "base")
    del base
    lora = {"prompt": LORA_PROMPT, "timestep": TIMESTEP, "time_ids": TIME_IDS, "latents": "lora_latents",
            "names": ["base", "kohya", "peft"],
            "note": "<name>_embeds / <name>_pooled: encode_prompt(prompt) of the fused pipeline (no CFG); <name>_eps: "
                    "unet(lora_latents, timestep, encoder_hidden_states=<name>_embeds, added_cond_kwargs="
                    "{text_embeds: <name>_pooled, time_ids}).sample; fused by load_lora_weights + "
                    "fuse_lora(lora_scale=scale) on unet, text_encoder and text_encoder_2"}
    lora["kohya"] = kohya_lora(out_dir, out, latents)
    lora["peft"] = peft_lora(out_dir, out, latents)
    lora["sd15"] = sd15_lora(out_dir)
    lora["scales"] = {"kohya": KOHYA_SCALE, "peft": PEFT_SCALE}
    for n in ("kohya", "peft"):
        for s in ("embeds", "pooled", "eps"):
            assert not torch.allclose(out[f"{n}_{s}"], out[f"base_{s}"], atol=1e-3), (n, s)
    case["lora"] = lora
    case["clip_skip"] = clip_skip(out)
    case["a1111"] = a1111(out)
    case["versions"] = {"torch": torch.__version__, "diffusers": diffusers.__version__,
                        "transformers": transformers.__version__, "peft": peft.__version__}

    for k, v in out.items():
        assert v.dtype == torch.float32 and torch.isfinite(v).all(), k
    case["expected_tensors"] = {k: list(out[k].shape) for k in sorted(out)}
    save_file(out, out_dir / "expected.safetensors")
    with open(out_dir / "case.json", "w") as f:
        f.write(to_json(case) + "\n")
    for k in sorted(out):
        print(f"{k:24s} {list(out[k].shape)} max|x| {out[k].abs().max().item():.4g}")
    for p in sorted(out_dir.iterdir()):
        print(f"{p.name:28s} {p.stat().st_size:8d}  sha256 {hashlib.sha256(p.read_bytes()).hexdigest()[:16]}")


if __name__ == "__main__":
    main()
