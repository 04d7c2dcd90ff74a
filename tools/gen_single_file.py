#!/usr/bin/env python3
"""Write original-format ("single file", CompVis/Stability LDM key names) checkpoints for the tiny parity cases.

For each of the committed pipeline cases sd15-tiny and sd2-tiny (written by tools/gen_parity.py, format
../shared/docs/parity-fixtures.md) and sdxl-tiny (tools/gen_sdxl_parity.py) this script reads the saved diffusers
folder <case>/pipeline/ and writes

    tests/fixtures/parity/<case>/single_file.safetensors   ONE checkpoint with the key names of the original LDM
                                                            checkpoints (v1-5-pruned-emaonly / v2-1_768-ema-pruned),
                                                            for sdxl-tiny of Stability's SGM sd_xl_base_1.0
    tests/fixtures/parity/<case>/single_file.json          the mapping facts the Rust loader needs (prefixes,
                                                            architecture hints, every diffusers tensor's source)

The conversion is the exact inverse of diffusers' own single-file conversion (diffusers 0.42.1,
diffusers/loaders/single_file_utils.py: convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
convert_ldm_clip_checkpoint, convert_open_clip_checkpoint). It never runs a model to write the file: tensors are
copied (or reshaped / concatenated / transposed, bit for bit) from the folder's safetensors files, keeping their dtype
(sd15-tiny f32, sd2-tiny f16 as its folder is f16, sdxl-tiny mixed: text encoders f16, UNet / VAE f32).

Reference stack (the pinned venv of tools/gen_parity.py, OUTSIDE the repository; never used in CI):

    python3 -m venv /work/pyref
    /work/pyref/bin/pip install torch==2.15.0 diffusers==0.42.1 transformers==5.23.0 safetensors==0.8.0 numpy

Run (from anywhere; CPU only, well under a minute on 2 cores):

    /work/pyref/bin/python tools/gen_single_file.py [--fixtures tests/fixtures/parity]
                                                    [--only sd15-tiny|sd2-tiny|sdxl-tiny] [--check-only]

    --check-only   do not write; verify the committed single_file.safetensors / single_file.json instead

Layout written (P = prefix; L = number of UNet/VAE levels, n = layers_per_block):
    model.diffusion_model.   time_embed.{0,2}, input_blocks.0.0 (conv_in),
                             input_blocks.{1+b(n+1)+j}.0 resnet (in_layers.{0,2}, emb_layers.1, out_layers.{0,3},
                             skip_connection), input_blocks.{1+b(n+1)+j}.1 spatial transformer (diffusers names
                             inside: norm, proj_in, transformer_blocks.K.{attn1,attn2,ff,norm1..3}, proj_out),
                             input_blocks.{(b+1)(n+1)}.0.op (downsampler), middle_block.{0,1,2},
                             output_blocks.{b(n+1)+j}.{0 resnet, 1 transformer} for j in 0..n (n+1 per level),
                             output_blocks.{b(n+1)+n}.{1 if no transformer, else 2}.conv (upsampler),
                             out.{0,2}
    first_stage_model.       encoder.{conv_in,norm_out,conv_out}, encoder.down.B.block.M (nin_shortcut),
                             encoder.down.B.downsample.conv, encoder.mid.{block_1,attn_1,block_2},
                             decoder.up.(L-1-i).block.M  <- diffusers decoder.up_blocks.i (index REVERSED),
                             decoder.up.(L-1-i).upsample.conv, decoder.mid.*, decoder.{conv_in,norm_out,conv_out},
                             quant_conv, post_quant_conv; mid.attn_1.{norm,q,k,v,proj_out} with q/k/v/proj_out
                             weights as 1x1 conv kernels [C,C,1,1] (diffusers squeezes them to [C,C])
    SD1 text                 cond_stage_model.transformer.text_model.<transformers CLIPTextModel key>
                             (+ embeddings.position_ids int64 [1,77], as in the original SD1.x checkpoints)
    SD2 text (OpenCLIP)      cond_stage_model.model.{token_embedding.weight, positional_embedding, ln_final.*,
                             text_projection [D,D] (x @ P convention), logit_scale [],
                             transformer.resblocks.N.{ln_1, attn.in_proj_weight [3D,D] = cat(q,k,v),
                             attn.in_proj_bias [3D], attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}}
                             with ONE EXTRA resblock (index = num_hidden_layers) that SD2 never uses: the real
                             SD2 text encoder is OpenCLIP ViT-H/14 with 24 resblocks of which SD2 uses the
                             penultimate output (23 blocks, then ln_final), and diffusers' text_encoder config
                             has num_hidden_layers 23. See LAYER COUNT below.
    DDPM schedule buffers    betas, alphas_cumprod, alphas_cumprod_prev, sqrt_alphas_cumprod,
    (top level, f32 [1000])  sqrt_one_minus_alphas_cumprod, log_one_minus_alphas_cumprod, sqrt_recip_alphas_cumprod,
                             sqrt_recipm1_alphas_cumprod, posterior_variance, posterior_log_variance_clipped,
                             posterior_mean_coef1, posterior_mean_coef2 (as ldm.models.diffusion.ddpm.DDPM
                             registers them for linear_start 0.00085, linear_end 0.012; the real checkpoints carry
                             them; every loader ignores them). They stay f32 in the f16 sd2 file (mixed dtypes).

SDXL (sdxl-tiny, the layout of sd_xl_base_1.0.safetensors):
    model.diffusion_model.   as above (SDXL base: 3 levels, level 0 without attention: input_blocks.1/2 and
                             output_blocks.6..8 have no .1 transformer), transformer_blocks.K for K < the level's
                             transformer depth (up blocks: the reversed list), plus
                             label_emb.0.0.{weight,bias} = add_embedding.linear_1, label_emb.0.2.{weight,bias} =
                             add_embedding.linear_2 (the "text_time" added conditioning; Linear(adm_in, T), SiLU, Linear)
    first_stage_model.       as above
    text_encoder             conditioner.embedders.0.transformer.text_model.<transformers CLIPTextModel key>
                             (+ embeddings.position_ids int64 [1,77], as in sd_xl_base_1.0)
    text_encoder_2           conditioner.embedders.1.model.{token_embedding.weight, positional_embedding, ln_final.*,
                             transformer.resblocks.N.{ln_1, attn.in_proj_weight [3D,D] = cat(q,k,v), attn.in_proj_bias,
                             attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}, text_projection [D,P] = the TRANSPOSE of
                             diffusers' text_projection.weight [P,D] (OpenCLIP: pooled @ text_projection; diffusers
                             transposes it back and reads its shape[0] as the q/k/v split size), logit_scale [] = log(100)}
                             with exactly num_hidden_layers resblocks (SDXL stores every layer; no extra block)
    no DDPM schedule buffers (SGM checkpoints have none); the file has no key diffusers needs beyond these
    Check 3 for sdxl-tiny: StableDiffusionXLPipeline.from_single_file == from_pretrained tensor by tensor (f32), same
    scheduler config and tokenizers, and its __call__ reproduces the case's final_latents bit for bit.

LAYER COUNT (what diffusers 0.42.1 does for the OpenCLIP text encoder):
    * the number of layers comes ONLY from the text_encoder config (num_hidden_layers); nothing is counted in the file;
    * convert_open_clip_checkpoint skips the keys listed in SD_2_TEXT_ENCODER_KEYS_TO_IGNORE, which are hard-coded
      as cond_stage_model.model.transformer.resblocks.23.* and cond_stage_model.model.text_projection (the real
      24th block by absolute index, not "the last block");
    * every other resblocks.N is converted to encoder.layers.N; a layer the config does not have is an "unexpected"
      key and is dropped silently (without accelerate: model.load_state_dict(strict=False); with accelerate:
      load_model_dict_into_meta skips names not in the model);
    * q/k/v are split from in_proj_* with the row count text_projection.shape[0] if the file has text_projection,
      else config.hidden_size.
    So the tiny file's extra resblocks.3 (config: 3 layers) is dropped as unexpected, exactly as the real file's
    resblocks.23 would be dropped even without the hard-coded list. Note also: without accelerate a tensor MISSING
    from the file leaves that parameter at its random init without any error, which is why the check below compares
    every tensor.

Checks (printed, and asserted):
    1. diffusers' own conversion functions applied to the written checkpoint give back exactly the folder's tensors
       (same key set, same dtype, bit-equal), with only the documented extra keys left over;
    2. StableDiffusionPipeline.from_single_file(file, config=<config-only copy of the case's pipeline folder, all
       weight files removed so nothing can fall back to them>, local_files_only=True): every tensor of unet, vae and
       text_encoder equals the folder's (values, f32 comparison), no parameter left uninitialised;
    3. that pipeline's __call__ (f32, the case's prompt / negative prompt / init_latents) reproduces the case's
       final_latents (expected.safetensors), and its vae encoder the vae_encoder_mean.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

torch.set_num_threads(2)
torch.use_deterministic_algorithms(True)

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline  # noqa: E402
from diffusers.loaders import single_file_utils as sfu  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", category=FutureWarning)
diffusers.utils.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()

REPO = Path(__file__).resolve().parents[1]
CASES = ("sd15-tiny", "sd2-tiny", "sdxl-tiny")
UNET_P = "model.diffusion_model."
VAE_P = "first_stage_model."
CLIP_P = "cond_stage_model.transformer."          # SD1.x: + "text_model." + transformers key
OPENCLIP_P = "cond_stage_model.model."            # SD2.x
XL_CLIP_P = "conditioner.embedders.0.transformer."  # SDXL text_encoder: + "text_model." + transformers key
XL_OPENCLIP_P = "conditioner.embedders.1.model."    # SDXL text_encoder_2 (OpenCLIP layout)


def case_base(name: str) -> str:
    return "sdxl" if name.startswith("sdxl") else "sd15" if name.startswith("sd15") else "sd2"


# --------------------------------------------------------------------------------------------------
# Mapping, diffusers key -> (ldm key, transform). Inverse of diffusers/loaders/single_file_utils.py.
# --------------------------------------------------------------------------------------------------
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_map(keys: list[str], cfg: dict) -> dict[str, str]:
    """diffusers UNet2DConditionModel key -> LDM key (without the model.diffusion_model. prefix)."""
    n = cfg["layers_per_block"]
    out = {}
    fixed = dict(sfu.DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])  # diffusers -> ldm: time_embed, conv_in, out
    if cfg.get("addition_embed_type") == "text_time":   # SDXL: add_embedding.linear_{1,2} <- label_emb.0.{0,2}
        fixed.update(sfu.DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"])
    for k in keys:
        p = k.split(".")
        if k in fixed:
            out[k] = fixed[k]
            continue
        if p[0] == "down_blocks":
            b = int(p[1])
            if p[2] == "resnets":
                j = int(p[3])
                out[k] = f"input_blocks.{1 + b * (n + 1) + j}.0.{UNET_RESNET[p[4]]}.{'.'.join(p[5:])}"
            elif p[2] == "attentions":
                j = int(p[3])
                out[k] = f"input_blocks.{1 + b * (n + 1) + j}.1.{'.'.join(p[4:])}"
            elif p[2] == "downsamplers":
                assert p[3:5] == ["0", "conv"], k
                out[k] = f"input_blocks.{(b + 1) * (n + 1)}.0.op.{p[5]}"
        elif p[0] == "mid_block":
            if p[1] == "resnets":
                out[k] = f"middle_block.{2 * int(p[2])}.{UNET_RESNET[p[3]]}.{'.'.join(p[4:])}"
            elif p[1] == "attentions":
                assert p[2] == "0", k
                out[k] = f"middle_block.1.{'.'.join(p[3:])}"
        elif p[0] == "up_blocks":
            b = int(p[1])
            if p[2] == "resnets":
                j = int(p[3])
                out[k] = f"output_blocks.{b * (n + 1) + j}.0.{UNET_RESNET[p[4]]}.{'.'.join(p[5:])}"
            elif p[2] == "attentions":
                j = int(p[3])
                out[k] = f"output_blocks.{b * (n + 1) + j}.1.{'.'.join(p[4:])}"
            elif p[2] == "upsamplers":
                assert p[3:5] == ["0", "conv"], k
                has_attn = cfg["up_block_types"][b].startswith("CrossAttn")
                out[k] = f"output_blocks.{b * (n + 1) + n}.{2 if has_attn else 1}.conv.{p[5]}"
        if k not in out:
            raise KeyError(f"unmapped UNet key {k}")
    return out


def vae_map(keys: list[str], cfg: dict) -> dict[str, tuple[str, str]]:
    """diffusers AutoencoderKL key -> (LDM key without first_stage_model., transform)."""
    L = len(cfg["up_block_types"])
    fixed = sfu.DIFFUSERS_TO_LDM_MAPPING["vae"]  # diffusers -> ldm: conv_in/out, norm_out, quant convs
    out = {}
    for k in keys:
        p = k.split(".")
        t = "copy"
        if k in fixed:
            ldm = fixed[k]
        elif p[1] == "down_blocks":       # encoder
            b = int(p[2])
            if p[3] == "resnets":
                ldm = f"encoder.down.{b}.block.{p[4]}.{'.'.join(p[5:])}".replace("conv_shortcut", "nin_shortcut")
            else:
                assert p[3:6] == ["downsamplers", "0", "conv"], k
                ldm = f"encoder.down.{b}.downsample.conv.{p[6]}"
        elif p[1] == "up_blocks":         # decoder, index reversed
            i = int(p[2])
            bid = L - 1 - i
            if p[3] == "resnets":
                ldm = f"decoder.up.{bid}.block.{p[4]}.{'.'.join(p[5:])}".replace("conv_shortcut", "nin_shortcut")
            else:
                assert p[3:6] == ["upsamplers", "0", "conv"], k
                ldm = f"decoder.up.{bid}.upsample.conv.{p[6]}"
        elif p[1] == "mid_block":
            if p[2] == "resnets":
                ldm = f"{p[0]}.mid.block_{int(p[3]) + 1}.{'.'.join(p[4:])}".replace("conv_shortcut", "nin_shortcut")
            else:
                assert p[2:4] == ["attentions", "0"], k
                rest = ".".join(p[4:])
                name, wb = rest.rsplit(".", 1)
                ldm = f"{p[0]}.mid.attn_1.{VAE_ATTN[name]}.{wb}"
                if wb == "weight" and name != "group_norm":
                    t = "unsqueeze_1x1"   # [C,C] -> [C,C,1,1] in the file
        else:
            raise KeyError(f"unmapped VAE key {k}")
        out[k] = (ldm, t)
    return out


def openclip_map(keys: list[str], hidden: int) -> dict[str, tuple[str, str]]:
    """transformers CLIPTextModel (flattened, transformers >= 5.6) key -> (OpenCLIP key without prefix, transform)."""
    out = {}
    fixed = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    sub = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
           "self_attn.out_proj": "attn.out_proj"}
    for k in keys:
        if k in fixed:
            out[k] = (fixed[k], "copy")
            continue
        p = k.split(".")
        assert p[:2] == ["encoder", "layers"], k
        n, name, wb = p[2], ".".join(p[3:-1]), p[-1]
        if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            part = "qkv".index(name[10])
            out[k] = (f"transformer.resblocks.{n}.attn.in_proj_{wb}", f"rows[{part * hidden}:{(part + 1) * hidden}]")
        else:
            out[k] = (f"transformer.resblocks.{n}.{sub[name]}.{wb}", "copy")
    return out


# --------------------------------------------------------------------------------------------------
def ddpm_buffers(n=1000, linear_start=0.00085, linear_end=0.012) -> dict[str, torch.Tensor]:
    """ldm.models.diffusion.ddpm.DDPM.register_schedule (beta_schedule "linear" = SD's scaled_linear), v_posterior 0."""
    betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, n, dtype=torch.float64).numpy() ** 2
    alphas = 1.0 - betas
    ac = np.cumprod(alphas, axis=0)
    acp = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - acp) / (1.0 - ac)
    d = {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": acp,
        "sqrt_alphas_cumprod": np.sqrt(ac), "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "log_one_minus_alphas_cumprod": np.log(1.0 - ac), "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1), "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.maximum(post_var, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(acp) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - acp) * np.sqrt(alphas) / (1.0 - ac),
    }
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in d.items()}


def read_json(p: Path) -> dict:
    with open(p) as f:
        return json.load(f)


def build(case_dir: Path, base: str):
    """Returns (checkpoint dict, key map list, extra-keys dict, hints)."""
    pdir = case_dir / "pipeline"
    ucfg = read_json(pdir / "unet" / "config.json")
    vcfg = read_json(pdir / "vae" / "config.json")
    tcfg = read_json(pdir / "text_encoder" / "config.json")
    scfg = read_json(pdir / "scheduler" / "scheduler_config.json")
    unet = load_file(str(pdir / "unet" / "diffusion_pytorch_model.safetensors"))
    vae = load_file(str(pdir / "vae" / "diffusion_pytorch_model.safetensors"))
    te = load_file(str(pdir / "text_encoder" / "model.safetensors"))
    dtype = unet[next(iter(unet))].dtype
    if base == "sdxl":
        # the SDXL folder is mixed: text encoders f16, UNet / VAE f32; every tensor keeps its folder dtype
        te2 = load_file(str(pdir / "text_encoder_2" / "model.safetensors"))
        tcfg2 = read_json(pdir / "text_encoder_2" / "config.json")
        dtype = {}
        for c, d in (("unet", unet), ("vae", vae), ("text_encoder", te), ("text_encoder_2", te2)):
            dt = {t.dtype for t in d.values()}
            assert len(dt) == 1, (c, dt)
            dtype[c] = dt.pop()
    else:
        assert all(t.dtype == dtype for d in (unet, vae, te) for t in d.values())

    ckpt: dict[str, torch.Tensor] = {}
    keymap = []   # {"component", "key", "ldm", "transform"} for every folder tensor
    extra = {}    # ldm key -> why diffusers does not use it

    for k, l in unet_map(sorted(unet), ucfg).items():
        ckpt[UNET_P + l] = unet[k].contiguous()
        keymap.append({"component": "unet", "key": k, "ldm": UNET_P + l, "transform": "copy"})
    for k, (l, t) in vae_map(sorted(vae), vcfg).items():
        v = vae[k]
        if t == "unsqueeze_1x1":
            assert v.ndim == 2
            v = v[:, :, None, None]
        ckpt[VAE_P + l] = v.contiguous()
        keymap.append({"component": "vae", "key": k, "ldm": VAE_P + l,
                       "transform": "squeeze [C,C,1,1] -> [C,C]" if t == "unsqueeze_1x1" else "copy"})

    D = tcfg["hidden_size"]
    if base == "sdxl":
        # text_encoder: conditioner.embedders.0.transformer.text_model.<transformers key> (FrozenCLIPEmbedder)
        for k in sorted(te):
            ckpt[XL_CLIP_P + "text_model." + k] = te[k].contiguous()
            keymap.append({"component": "text_encoder", "key": k, "ldm": XL_CLIP_P + "text_model." + k,
                           "transform": "copy"})
        pid = XL_CLIP_P + "text_model.embeddings.position_ids"
        ckpt[pid] = torch.arange(tcfg["max_position_embeddings"], dtype=torch.int64)[None]
        extra[pid] = ("int64 [1,77] arange buffer, present in sd_xl_base_1.0.safetensors; transformers 5 has it as a "
                      "non-persistent buffer, so diffusers drops it as unexpected")
        # text_encoder_2: conditioner.embedders.1.model.<OpenCLIP key> (FrozenOpenCLIPEmbedder2, all layers stored)
        D2 = tcfg2["hidden_size"]
        assert all(k.startswith("text_model.") for k in te2 if k != "text_projection.weight"), sorted(te2)[:4]
        te2s = {k.removeprefix("text_model."): v for k, v in te2.items() if k != "text_projection.weight"}
        groups = {}
        for k, (l, t) in openclip_map(sorted(te2s), D2).items():
            keymap.append({"component": "text_encoder_2", "key": "text_model." + k, "ldm": XL_OPENCLIP_P + l,
                           "transform": t})
            if t == "copy":
                ckpt[XL_OPENCLIP_P + l] = te2s[k].contiguous()
            else:
                groups.setdefault(XL_OPENCLIP_P + l, {})[int(t[5:].split(":")[0])] = te2s[k]
        for l, parts in groups.items():
            assert sorted(parts) == [0, D2, 2 * D2], l
            ckpt[l] = torch.cat([parts[0], parts[D2], parts[2 * D2]], 0).contiguous()
        tp = XL_OPENCLIP_P + "text_projection"
        w = te2["text_projection.weight"]          # nn.Linear(D2, P, bias=False).weight: [P, D2]
        assert tuple(w.shape) == (tcfg2["projection_dim"], D2), w.shape
        ckpt[tp] = w.T.contiguous()                # OpenCLIP: pooled @ text_projection, [D2, P]
        keymap.append({"component": "text_encoder_2", "key": "text_projection.weight", "ldm": tp,
                       "transform": "transpose: file [width, proj] -> diffusers [proj, width]"})
        ls = XL_OPENCLIP_P + "logit_scale"
        ckpt[ls] = torch.tensor(np.log(100.0), dtype=dtype["text_encoder_2"])
        extra[ls] = ("0-dim scalar log(100) (sd_xl_base_1.0 stores 4.6055 in f16), the CLIP contrastive temperature; "
                     "unused by SDXL; diffusers never reads it")
    elif base == "sd15":
        for k in sorted(te):
            ckpt[CLIP_P + "text_model." + k] = te[k].contiguous()
            keymap.append({"component": "text_encoder", "key": k, "ldm": CLIP_P + "text_model." + k,
                           "transform": "copy"})
        pid = CLIP_P + "text_model.embeddings.position_ids"
        ckpt[pid] = torch.arange(tcfg["max_position_embeddings"], dtype=torch.int64)[None]
        extra[pid] = ("int64 [1,77] arange buffer, present in the original SD1.x checkpoints; transformers 5 has it as a "
                      "non-persistent buffer, so diffusers drops it as unexpected")
    else:
        m = openclip_map(sorted(te), D)
        groups: dict[str, dict[int, torch.Tensor]] = {}
        for k, (l, t) in m.items():
            keymap.append({"component": "text_encoder", "key": k, "ldm": OPENCLIP_P + l, "transform": t})
            if t == "copy":
                ckpt[OPENCLIP_P + l] = te[k].contiguous()
            else:
                start = int(t[5:].split(":")[0])
                groups.setdefault(OPENCLIP_P + l, {})[start] = te[k]
        for l, parts in groups.items():
            assert sorted(parts) == [0, D, 2 * D], l
            ckpt[l] = torch.cat([parts[0], parts[D], parts[2 * D]], 0).contiguous()
        # the unused last resblock (SD2 uses the penultimate layer), seeded random values of the same shapes
        nl = tcfg["num_hidden_layers"]
        g = torch.Generator().manual_seed(20_23)
        src = f"{OPENCLIP_P}transformer.resblocks.{nl - 1}."
        for l in sorted(k for k in list(ckpt) if k.startswith(src)):
            name = f"{OPENCLIP_P}transformer.resblocks.{nl}." + l[len(src):]
            shape = ckpt[l].shape
            base_v = 1.0 if (".ln_" in l and l.endswith("weight")) else 0.0
            ckpt[name] = (base_v + 0.1 * torch.randn(shape, generator=g)).to(dtype)
            extra[name] = (f"the extra last resblock: the file has num_hidden_layers+1 = {nl + 1} resblocks like the real "
                           f"SD2 file (24 for 23); SD2 uses the penultimate output, diffusers' config has {nl} layers "
                           "and drops this block as unexpected")
        tp = OPENCLIP_P + "text_projection"
        ckpt[tp] = (torch.randn(D, D, generator=g) * D ** -0.5).to(dtype)
        extra[tp] = (f"[{D},{D}] (x @ text_projection); unused by SD2 conditioning; diffusers ignores it by name but "
                     "reads shape[0] as the q/k/v split size")
        ls = OPENCLIP_P + "logit_scale"
        ckpt[ls] = torch.tensor(np.log(1 / 0.07), dtype=dtype)
        extra[ls] = "0-dim scalar log(1/0.07); unused by SD2"

    if base != "sdxl":   # the SGM (SDXL) checkpoints carry no DDPM schedule buffers
        for k, v in ddpm_buffers(scfg["num_train_timesteps"], scfg["beta_start"], scfg["beta_end"]).items():
            ckpt[k] = v
            extra[k] = "DDPM schedule buffer (f32 [1000]), as the real checkpoints carry it; ignored by every loader"

    hints = make_hints(base, ucfg, vcfg, tcfg, scfg, dtype,
                       tcfg2=read_json(pdir / "text_encoder_2" / "config.json") if base == "sdxl" else None)
    return ckpt, keymap, extra, hints, dtype


def make_hints(base, ucfg, vcfg, tcfg, scfg, dtype, tcfg2=None):
    boc = ucfg["block_out_channels"]
    ahd = ucfg["attention_head_dim"]
    attn_levels = [i for i, t in enumerate(ucfg["down_block_types"]) if t.startswith("CrossAttn")]
    unet = {
        "prefix": UNET_P,
        "layout": "ldm openaimodel UNetModel (input_blocks / middle_block / output_blocks)",
        "diffusers_config": "pipeline/unet/config.json",
        "model_channels": boc[0],
        "channel_mult": [c // boc[0] for c in boc],
        "num_res_blocks": ucfg["layers_per_block"],
        "attention_levels": attn_levels,
        "attention_resolutions_ldm": [2 ** i for i in attn_levels],
        "context_dim": ucfg["cross_attention_dim"],
        "transformer_depth": ucfg["transformer_layers_per_block"],
        "use_linear_in_transformer": ucfg["use_linear_projection"],
        "norm_num_groups": ucfg["norm_num_groups"],
        "upcast_attention": ucfg["upcast_attention"],
        "in_channels": ucfg["in_channels"], "out_channels": ucfg["out_channels"],
        "flip_sin_to_cos": ucfg["flip_sin_to_cos"], "freq_shift": ucfg["freq_shift"],
    }
    if base == "sdxl":
        tlpb = ucfg["transformer_layers_per_block"]
        assert ucfg["reverse_transformer_layers_per_block"] is None
        unet["heads_per_level"] = list(ahd)
        unet["head_channels_per_level"] = [boc[i] // ahd[i] for i in range(len(boc))]
        unet["heads_note"] = ("diffusers' attention_head_dim is HEADS per level (SDXL yaml num_head_channels: 64, "
                              "i.e. 5/10/20 heads at 320/640/1280); the tiny model's head widths are NOT uniform, so take "
                              "heads from this list / the config, not from a fixed head width; the middle block uses "
                              "the last level's head count")
        unet["transformer_depth_ldm"] = [tlpb[i] if i in attn_levels else 0 for i in range(len(boc))]
        unet["transformer_depth_middle"] = tlpb[-1]
        unet["transformer_depth_note"] = (
            "transformer_blocks.K, K < depth, inside every input_blocks.I.1 / middle_block.1 / output_blocks.I.1; "
            "down level b has depth transformer_layers_per_block[b]; the middle block the last level's; diffusers "
            "up_blocks.i (output_blocks.{i(n+1)..i(n+1)+n}) the depth of level L-1-i (reversed list); SDXL base: "
            "[0,2,10] (yaml transformer_depth: [0, 2, 10], transformer_depth_middle 10)")
        unet["adm_in_channels"] = ucfg["projection_class_embeddings_input_dim"]
        unet["addition_embed_type"] = ucfg["addition_embed_type"]
        unet["addition_time_embed_dim"] = ucfg["addition_time_embed_dim"]
        unet["label_emb"] = {
            "label_emb.0.0.weight": "add_embedding.linear_1.weight", "label_emb.0.0.bias": "add_embedding.linear_1.bias",
            "label_emb.0.2.weight": "add_embedding.linear_2.weight", "label_emb.0.2.bias": "add_embedding.linear_2.bias",
            "note": ("SGM num_classes 'sequential': label_emb = Sequential(Sequential(Linear(adm_in, T), SiLU, "
                     "Linear(T, T))); adm_in = projection_dim of text_encoder_2 (pooled) + 6 * addition_time_embed_dim "
                     f"= {tcfg2['projection_dim']} + 6*{ucfg['addition_time_embed_dim']} = "
                     f"{ucfg['projection_class_embeddings_input_dim']} (SDXL base 1280 + 6*256 = 2816); T = "
                     "time_embed_dim = 4 * model_channels"),
        }
        unet["level_without_attention_note"] = ("down_block_types[0] is DownBlock2D: input_blocks.1/2 hold only a "
                                                "resnet (.0), no .1; up_blocks.2 (UpBlock2D) likewise; the "
                                                "upsampler is output_blocks.{b(n+1)+n}.2.conv after an attention "
                                                "block and .1.conv otherwise")
    elif isinstance(ahd, int):
        unet["num_heads"] = ahd
        unet["heads_note"] = (f"diffusers' attention_head_dim={ahd} is the number of HEADS (SD1.x yaml num_heads: 8); "
                              "head width = channels / num_heads at every level and in the middle block")
    else:
        hc = {boc[i] // ahd[i] for i in range(len(boc))}
        assert len(hc) == 1
        unet["num_head_channels"] = hc.pop()
        unet["heads_per_level"] = list(ahd)
        unet["heads_note"] = (f"diffusers' attention_head_dim={ahd} is HEADS per level (SD2 yaml num_head_channels: 64); "
                              f"here every level has head width {unet['num_head_channels']}; the middle block uses the "
                              "last level's head count")
    unet["proj_in_out_shape"] = ("linear [C,C]" if ucfg["use_linear_projection"] else "1x1 conv [C,C,1,1]") + \
        " (same in file and folder)"
    vae = {
        "prefix": VAE_P,
        "layout": "ldm Encoder/Decoder (encoder.down.B.block.M, decoder.up.B.block.M with B REVERSED vs diffusers "
                  "up_blocks: decoder.up.(L-1-i) <- decoder.up_blocks.i)",
        "diffusers_config": "pipeline/vae/config.json",
        "ch": vcfg["block_out_channels"][0],
        "ch_mult": [c // vcfg["block_out_channels"][0] for c in vcfg["block_out_channels"]],
        "num_res_blocks": vcfg["layers_per_block"],
        "decoder_blocks_per_level": vcfg["layers_per_block"] + 1,
        "z_channels": vcfg["latent_channels"], "embed_dim": vcfg["latent_channels"], "double_z": True,
        "norm_num_groups": vcfg["norm_num_groups"],
        "scaling_factor": vcfg["scaling_factor"],
        "attn_note": "mid.attn_1.{q,k,v,proj_out}.weight are 1x1 conv kernels [C,C,1,1] in the file; diffusers uses "
                     "[C,C] (to_q, to_k, to_v, to_out.0); mid.attn_1.norm -> group_norm; nin_shortcut -> conv_shortcut",
    }
    text = {
        "diffusers_config": "pipeline/text_encoder/config.json",
        "hidden_size": tcfg["hidden_size"], "num_attention_heads": tcfg["num_attention_heads"],
        "intermediate_size": tcfg["intermediate_size"], "hidden_act": tcfg["hidden_act"],
        "max_position_embeddings": tcfg["max_position_embeddings"], "vocab_size": tcfg["vocab_size"],
        "layer_norm_eps": tcfg["layer_norm_eps"],
        "num_hidden_layers_used": tcfg["num_hidden_layers"],
        "output": "last_hidden_state after final_layer_norm (ln_final) of the layers used",
    }
    if base == "sdxl":
        text.update({
            "prefix": XL_CLIP_P + "text_model.",
            "layout": "transformers CLIPTextModel (HF CLIP) keys under the prefix: embeddings.*, encoder.layers.N.*, "
                      "final_layer_norm.*; plus embeddings.position_ids int64 [1,77]",
            "resblocks_in_file": tcfg["num_hidden_layers"],
            "output": "SDXL uses hidden_states[-2] (the input of the LAST layer, no final_layer_norm); "
                      "final_layer_norm is stored but unused by SDXL conditioning",
        })
        D2, P = tcfg2["hidden_size"], tcfg2["projection_dim"]
        text2 = {
            "prefix": XL_OPENCLIP_P,
            "diffusers_config": "pipeline/text_encoder_2/config.json",
            "diffusers_class": "CLIPTextModelWithProjection (keys text_model.* + text_projection.weight)",
            "hidden_size": D2, "num_attention_heads": tcfg2["num_attention_heads"],
            "intermediate_size": tcfg2["intermediate_size"], "hidden_act": tcfg2["hidden_act"],
            "max_position_embeddings": tcfg2["max_position_embeddings"], "vocab_size": tcfg2["vocab_size"],
            "layer_norm_eps": tcfg2["layer_norm_eps"], "projection_dim": P,
            "num_hidden_layers_used": tcfg2["num_hidden_layers"],
            "resblocks_in_file": tcfg2["num_hidden_layers"],
            "layout": "OpenCLIP text tower: token_embedding.weight, positional_embedding, transformer.resblocks.N."
                      "{ln_1, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}, "
                      "ln_final, text_projection, logit_scale",
            "in_proj_split": f"in_proj_weight [3D,D] rows [0:D]=q_proj, [D:2D]=k_proj, [2D:3D]=v_proj (D={D2}); "
                             "in_proj_bias likewise; diffusers takes the split size D from text_projection.shape[0]",
            "text_projection": f"file [width, proj] = [{D2}, {P}] (OpenCLIP: pooled @ text_projection); diffusers' "
                               f"text_projection.weight = its transpose [{P}, {D2}] (nn.Linear weight); SDXL base "
                               "[1280, 1280]",
            "output": "prompt embeds: hidden_states[-2] (input of the last resblock, no ln_final); pooled: "
                      "ln_final(last layer output) at the first EOS (argmax id) position @ text_projection",
            "hidden_act_note": "OpenCLIP ViT-bigG uses plain (erf) gelu",
        }
    elif base == "sd15":
        text.update({
            "prefix": CLIP_P + "text_model.",
            "layout": "transformers CLIPTextModel (HF CLIP) keys under the prefix: embeddings.*, encoder.layers.N.*, "
                      "final_layer_norm.*",
            "resblocks_in_file": tcfg["num_hidden_layers"],
        })
    else:
        D = tcfg["hidden_size"]
        text.update({
            "prefix": OPENCLIP_P,
            "layout": "OpenCLIP text tower: token_embedding.weight, positional_embedding, transformer.resblocks.N."
                      "{ln_1, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}, "
                      "ln_final, text_projection, logit_scale",
            "resblocks_in_file": tcfg["num_hidden_layers"] + 1,
            "layer": "penultimate: run resblocks 0..N-2 (all but the file's last), then ln_final",
            "in_proj_split": f"in_proj_weight [3D,D] rows [0:D]=q_proj, [D:2D]=k_proj, [2D:3D]=v_proj (D={D}); "
                             "in_proj_bias likewise",
            "hidden_act_note": "OpenCLIP ViT-H uses plain (erf) gelu, not quick_gelu",
        })
    components = {"unet": unet, "vae": vae, "text_encoder": text}
    if base == "sdxl":
        components["text_encoder_2"] = text2
        return {
            "base": base,
            "prediction_type": scfg["prediction_type"],
            "dtype": {c: str(d).replace("torch.", "") for c, d in dtype.items()},
            "dtype_note": "every tensor keeps its folder dtype (text encoders f16, UNet / VAE f32; position_ids "
                          "int64); sd_xl_base_1.0.safetensors itself is f16 throughout (position_ids int64)",
            "detect": {
                "sdxl": "conditioner.embedders.1.model.positional_embedding present (diffusers "
                        "CHECKPOINT_KEY_NAMES['open_clip_sdxl']), with "
                        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight "
                        "(CHECKPOINT_KEY_NAMES['clip_sdxl'])",
                "xl_base_key_note": "diffusers' model-type key for xl_base is "
                                    "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias, absent "
                                    "from this 3-layer tiny file: detect SDXL by prefix, not by that key; with "
                                    "config= given diffusers does not need the model type",
                "refiner": "sd_xl_refiner has ONLY conditioner.embedders.0.model.* (OpenCLIP, no CLIP-L); not this "
                           "layout",
            },
            "components": components,
            "scheduler": {"diffusers_config": "pipeline/scheduler/scheduler_config.json",
                          "ldm": {"linear_start": scfg["beta_start"], "linear_end": scfg["beta_end"],
                                  "timesteps": scfg["num_train_timesteps"]}},
        }
    return {
        "base": base,
        "prediction_type": scfg["prediction_type"],
        "dtype": str(dtype).replace("torch.", ""),
        "detect": {
            "sd15": "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight present "
                    "(diffusers CHECKPOINT_KEY_NAMES['clip'])",
            "sd2": "cond_stage_model.model.token_embedding.weight present (diffusers CHECKPOINT_KEY_NAMES['open_clip'])",
            "v_prediction": "not stored in the file (the original yaml's parameterization: v); diffusers guesses 'v2' "
                            "only from attn2.to_k width 1024, which the tiny models do not have: take it from here / "
                            "from the case's scheduler config",
        },
        "components": {"unet": unet, "vae": vae, "text_encoder": text},
        "scheduler": {"diffusers_config": "pipeline/scheduler/scheduler_config.json",
                      "ldm": {"linear_start": scfg["beta_start"], "linear_end": scfg["beta_end"],
                              "timesteps": scfg["num_train_timesteps"]}},
    }


# --------------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------------
def check_diffusers_conversion(ckpt, case_dir, base, extra):
    """Apply diffusers' own conversion functions to the checkpoint; compare with the folder tensor by tensor."""
    pdir = case_dir / "pipeline"
    ucfg = read_json(pdir / "unet" / "config.json")
    vcfg = read_json(pdir / "vae" / "config.json")
    folder = {c: load_file(str(pdir / c / f)) for c, f in component_files(base)}
    conv = {
        "unet": sfu.convert_ldm_unet_checkpoint(dict(ckpt), ucfg),
        "vae": sfu.convert_ldm_vae_checkpoint(dict(ckpt), vcfg),
    }
    if base == "sdxl":
        assert sfu.is_clip_sdxl_model(ckpt) and sfu.is_open_clip_sdxl_model(ckpt)
        assert not (sfu.is_clip_model(ckpt) or sfu.is_open_clip_model(ckpt) or sfu.is_open_clip_sdxl_refiner_model(ckpt))
        te = sfu.convert_ldm_clip_checkpoint(dict(ckpt))
        tcfg2 = CLIPTextConfig.from_pretrained(str(pdir / "text_encoder_2"))
        with torch.device("meta"):
            model2 = CLIPTextModelWithProjection(tcfg2)
        assert hasattr(model2, "text_model")   # keeps the text_model. wrapper in transformers 5.23
        conv["text_encoder_2"] = sfu.convert_open_clip_checkpoint(model2, dict(ckpt), prefix=XL_OPENCLIP_P)
    elif base == "sd15":
        assert sfu.is_clip_model(ckpt) and not sfu.is_open_clip_model(ckpt)
        te = sfu.convert_ldm_clip_checkpoint(dict(ckpt))
    else:
        assert sfu.is_open_clip_model(ckpt) and not sfu.is_clip_model(ckpt)
        tcfg = CLIPTextConfig.from_pretrained(str(pdir / "text_encoder"))
        with torch.device("meta"):
            model = CLIPTextModel(tcfg)
        te = sfu.convert_open_clip_checkpoint(model, dict(ckpt), prefix=OPENCLIP_P)
    # transformers >= 5.6 CLIPTextModel has no text_model. wrapper (diffusers strips it the same way)
    conv["text_encoder"] = {k.removeprefix("text_model."): v for k, v in te.items()}
    leftovers = {}
    for c, sd in folder.items():
        got = conv[c]
        missing = sorted(set(sd) - set(got))
        assert not missing, (c, missing[:5])
        leftovers[c] = sorted(set(got) - set(sd))
        for k, v in sd.items():
            assert got[k].dtype == v.dtype and got[k].shape == v.shape, (c, k, got[k].dtype, got[k].shape, v.shape)
            assert torch.equal(got[k], v), (c, k)
    print("   diffusers conversion: " + ", ".join(f"{c} {len(sd)}" for c, sd in folder.items()) +
          " tensors bit-equal to the folder (dtype and shape too)")
    print(f"   converted keys the model does not have (dropped by diffusers as unexpected): "
          f"{ {c: v for c, v in leftovers.items() if v} }")
    return leftovers


def component_files(base):
    out = [("unet", "diffusion_pytorch_model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors"),
           ("text_encoder", "model.safetensors")]
    if base == "sdxl":
        out.append(("text_encoder_2", "model.safetensors"))
    return out


def config_only_copy(pdir: Path, dst: Path) -> None:
    shutil.copytree(pdir, dst)
    for p in list(dst.rglob("*.safetensors")) + list(dst.rglob("*.bin")):
        p.unlink()


def check_from_single_file(path: Path, case_dir: Path, base: str):
    pdir = case_dir / "pipeline"
    case = read_json(case_dir / "case.json")
    exp = load_file(str(case_dir / "expected.safetensors"))
    cls = StableDiffusionXLPipeline if base == "sdxl" else StableDiffusionPipeline
    with tempfile.TemporaryDirectory() as td:
        cfgdir = Path(td) / "pipeline"
        config_only_copy(pdir, cfgdir)
        pipe = cls.from_single_file(str(path), config=str(cfgdir), local_files_only=True, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for c, f in component_files(base):
        ref = load_file(str(pdir / c / f))
        sd = getattr(pipe, c).state_dict()
        assert set(sd) == set(ref), (c, sorted(set(sd) ^ set(ref))[:6])
        for k, v in ref.items():
            assert sd[k].device.type == "cpu", (c, k)
            assert torch.equal(sd[k], v.float()), (c, k)
        print(f"   from_single_file: {c:12s} {len(ref):4d} tensors == folder (f32 values exact)")
    if base == "sdxl":
        return check_sdxl_call(pipe, pdir, case, exp)
    with torch.no_grad():
        lat = pipe(prompt=case["prompt"], negative_prompt=case["negative_prompt"], height=case["height"],
                   width=case["width"], num_inference_steps=case["num_inference_steps"],
                   guidance_scale=case["guidance_scale"], eta=0.0, latents=exp["init_latents"].clone(),
                   output_type="latent").images
        mean = pipe.vae.encode(exp["vae_encoder_input"]).latent_dist.mean
    rel = ((lat - exp["final_latents"]).abs().max() / exp["final_latents"].abs().max()).item()
    rel_e = ((mean - exp["vae_encoder_mean"]).abs().max() / exp["vae_encoder_mean"].abs().max()).item()
    print(f"   from_single_file pipeline __call__: final_latents rel err {rel:.2e}; vae encoder mean rel err {rel_e:.2e}")
    assert rel < 1e-4 and rel_e < 1e-5, (rel, rel_e)
    return rel, rel_e


def check_sdxl_call(pipe, pdir, case, exp):
    """The from_single_file SDXL pipeline against the folder's from_pretrained one (both f32): same scheduler and
    tokenizers, and its __call__ reproduces the case's final_latents (gen_sdxl_parity.py: the from_pretrained
    pipeline's __call__ gives them bit for bit)."""
    ref = StableDiffusionXLPipeline.from_pretrained(str(pdir), torch_dtype=torch.float32, local_files_only=True)
    for c, _ in component_files("sdxl"):   # every tensor (parameters and persistent buffers), dtype included
        a, b = getattr(pipe, c).state_dict(), getattr(ref, c).state_dict()
        assert set(a) == set(b), (c, sorted(set(a) ^ set(b))[:6])
        for k in b:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (c, k)
    print("   from_single_file == from_pretrained (both torch_dtype float32): every tensor of unet, vae, text_encoder, "
          "text_encoder_2 torch.equal")
    assert dict(pipe.scheduler.config) == dict(ref.scheduler.config), "scheduler config differs"
    assert type(pipe.scheduler) is type(ref.scheduler), (type(pipe.scheduler), type(ref.scheduler))
    for t in ("tokenizer", "tokenizer_2"):
        a, b = getattr(pipe, t), getattr(ref, t)
        assert a(case["prompt"]).input_ids == b(case["prompt"]).input_ids, t
    H, W = case["height"], case["width"]
    orig = tuple(case["original_size"] or (H, W))
    crops = tuple(case["crops_coords_top_left"] or (0, 0))
    target = tuple(case["target_size"] or (H, W))
    with torch.no_grad():
        lat = pipe(prompt=case["prompt"], negative_prompt=case["negative_prompt"], height=H, width=W,
                   num_inference_steps=case["num_inference_steps"], guidance_scale=case["guidance_scale"],
                   guidance_rescale=case["guidance_rescale"], original_size=orig, crops_coords_top_left=crops,
                   target_size=target, latents=exp["init_latents"].clone(), output_type="latent").images
    same = torch.equal(lat, exp["final_latents"])
    rel = ((lat - exp["final_latents"]).abs().max() / exp["final_latents"].abs().max()).item()
    print(f"   from_single_file pipeline __call__: final_latents {'bit-equal' if same else f'rel err {rel:.2e}'} "
          "to expected.safetensors")
    assert same, rel
    return rel, None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fixtures", type=Path, default=REPO / "tests" / "fixtures" / "parity")
    ap.add_argument("--only", nargs="*", choices=CASES)
    ap.add_argument("--check-only", action="store_true")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}")
    for name in args.only or CASES:
        case_dir = args.fixtures / name
        base = case_base(name)
        print(f"== {name} ({base})")
        ckpt, keymap, extra, hints, dtype = build(case_dir, base)
        out = case_dir / "single_file.safetensors"
        jout = case_dir / "single_file.json"
        if args.check_only:
            on_disk = load_file(str(out))
            assert set(on_disk) == set(ckpt), sorted(set(on_disk) ^ set(ckpt))[:6]
            for k, v in ckpt.items():
                assert on_disk[k].dtype == v.dtype and torch.equal(on_disk[k], v), k
            print(f"   {out.name}: matches a fresh conversion")
        else:
            save_file(ckpt, str(out))
        leftovers = check_diffusers_conversion(load_file(str(out)), case_dir, base, extra)
        check_from_single_file(out, case_dir, base)
        comps = [c for c, _ in component_files(base)]
        counts = {c: sum(1 for e in keymap if e["component"] == c) for c in comps}
        prefixes = {"unet": UNET_P, "vae": VAE_P}
        prefixes.update({c: hints["components"][c]["prefix"] for c in comps if c.startswith("text_encoder")})
        per_prefix = {c: sum(1 for k in ckpt if k.startswith(p)) for c, p in prefixes.items()}
        doc = dict(hints)
        doc.update({
            "file": out.name,
            "file_tensors": len(ckpt),
            "folder_tensors": counts,
            "file_tensors_per_prefix": per_prefix,
            "extra_keys": {k: extra[k] for k in sorted(extra)},
            "diffusers_layer_count_behaviour": (
                "diffusers 0.42.1 takes the text encoder's layer count from the config only; it skips "
                "cond_stage_model.model.transformer.resblocks.23.* and cond_stage_model.model.text_projection by "
                "hard-coded name (SD_2_TEXT_ENCODER_KEYS_TO_IGNORE); any other resblock beyond the config's "
                "num_hidden_layers becomes an unexpected key and is silently dropped; a missing tensor silently keeps "
                "its random init (no accelerate: load_state_dict(strict=False))"),
            "diffusers_dropped_after_conversion": leftovers,
            "verified": ("diffusers' conversion functions give back every folder tensor bit-equal (dtype included); "
                         "StableDiffusionPipeline.from_single_file(config=<config-only copy of pipeline/>, "
                         "local_files_only=True) state dicts equal the folder; its __call__ reproduces final_latents"),
            "versions": {"torch": torch.__version__.split("+")[0], "diffusers": diffusers.__version__,
                         "transformers": transformers.__version__},
            "key_map": keymap,
        })
        if base == "sdxl":
            doc["diffusers_layer_count_behaviour"] = (
                "diffusers 0.42.1 takes both text encoders' layer counts from their configs only (nothing is counted "
                "in the file); SDXL files store every layer of both encoders (no extra resblock, unlike SD2); "
                "convert_open_clip_checkpoint reads text_projection.shape[0] (= width) as the q/k/v split size and "
                "transposes text_projection into text_projection.weight; logit_scale is never read; a missing tensor "
                "silently keeps its random init, hence the tensor-by-tensor checks")
            doc["verified"] = (
                "diffusers' conversion functions (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, "
                "convert_ldm_clip_checkpoint, convert_open_clip_checkpoint with prefix conditioner.embedders.1.model.) "
                "give back every folder tensor of unet, vae, text_encoder, text_encoder_2 bit-equal (dtype included); "
                "StableDiffusionXLPipeline.from_single_file(config=<config-only copy of pipeline/>, "
                "local_files_only=True, torch_dtype=float32) state dicts equal the folder's and "
                "StableDiffusionXLPipeline.from_pretrained(pipeline/, torch_dtype=float32)'s; its scheduler config and "
                "tokenizers equal from_pretrained's; its __call__ reproduces final_latents bit for bit")
        if args.check_only:
            assert read_json(jout) == json.loads(json.dumps(doc)), f"{jout} differs from a fresh run"
            print(f"   {jout.name}: matches")
        else:
            with open(jout, "w") as f:
                json.dump(doc, f, indent=1)
                f.write("\n")
            print(f"   wrote {out} ({out.stat().st_size} bytes, {len(ckpt)} tensors, {dtype}) and {jout.name}")


if __name__ == "__main__":
    sys.exit(main())
