#!/usr/bin/env python3
"""Write the LoRA fixtures (issue 19): LoRAs for the sd15-tiny parity pipeline in kohya's layout and in the
diffusers/PEFT layout, and what diffusers computes after loading and fusing them.

Reference stack: the pinned venv of tools/gen_parity.py (torch 2.15.0, diffusers 0.42.1, transformers 5.23.0)
plus peft 0.21.2, OUTSIDE the repository; never used in CI. Run (CPU, seconds):

    /work/pyref/bin/python tools/gen_lora_fixtures.py [--out tests/fixtures/lora]

Writes under --out:
    kohya.safetensors   lora_unet_* and lora_te_* modules (lora_down [r, in(, kh, kw)], lora_up [out, r(, 1, 1)],
                        alpha): the UNet's attention projections (to_q, to_k, to_v, to_out.0), its 1x1 proj_in
                        convolutions and a 3x3 resnet conv, and the text encoder's q/k/v/out projections and fc1;
                        rank 4, alpha 2 (so alpha / rank = 0.5 matters)
    peft.safetensors    the same kind of LoRA made with peft on the UNet and saved by diffusers'
                        save_lora_weights (keys unet.<module>.lora_A.weight / lora_B.weight), rank 4, alpha 4
    expected.safetensors for each LoRA (kohya at scale 0.7, peft at scale 1.0), after diffusers'
                        load_lora_weights + fuse_lora: <name>_text [1, 77, 32] (the prompt's last hidden state) and
                        <name>_eps (the UNet's output on fixed latents, timestep and that context); base_text and
                        base_eps without a LoRA
    case.json           the prompt, timestep, scales, and the fused model's weights' max change per module
"""
import argparse
import json
import os

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPE = os.path.join(REPO, "tests/fixtures/parity/sd15-tiny/pipeline")
PROMPT = "a photo of a cat"
T = 500


def outputs(pipe, latents):
    ids = pipe.tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        text = pipe.text_encoder(ids).last_hidden_state
        eps = pipe.unet(latents, T, encoder_hidden_states=text).sample
    return text.contiguous(), eps.contiguous()


def kohya_lora(pipe, g):
    sd = {}
    r = 4

    def add(prefix, name, module):
        key = prefix + name.replace(".", "_")
        w = module.weight
        if w.dim() == 2:
            down = torch.randn(r, w.shape[1], generator=g) * 0.3
            up = torch.randn(w.shape[0], r, generator=g) * 0.3
        else:
            down = torch.randn(r, w.shape[1], w.shape[2], w.shape[3], generator=g) * 0.3
            up = torch.randn(w.shape[0], r, 1, 1, generator=g) * 0.3
        sd[key + ".lora_down.weight"] = down
        sd[key + ".lora_up.weight"] = up
        sd[key + ".alpha"] = torch.tensor(2.0)

    for name, m in pipe.unet.named_modules():
        if name.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                          "attn2.to_v", "attn2.to_out.0", "proj_in")) or name == "down_blocks.1.resnets.0.conv1":
            add("lora_unet_", name, m)
    for name, m in pipe.text_encoder.named_modules():
        if name.endswith(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1")):
            add("lora_te_", "text_model." + name if not name.startswith("text_model") else name, m)
    return sd


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(REPO, "tests/fixtures/lora"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    g = torch.Generator().manual_seed(1902)
    latents = torch.randn(1, 4, 16, 16, generator=g)
    out = {}
    pipe = StableDiffusionPipeline.from_pretrained(PIPE, safety_checker=None)
    out["base_text"], out["base_eps"] = outputs(pipe, latents)

    kohya = kohya_lora(pipe, g)
    save_file(kohya, os.path.join(a.out, "kohya.safetensors"))
    pipe.load_lora_weights(a.out, weight_name="kohya.safetensors", adapter_name="k")
    pipe.fuse_lora(lora_scale=0.7)
    out["kohya_text"], out["kohya_eps"] = outputs(pipe, latents)

    pipe = StableDiffusionPipeline.from_pretrained(PIPE, safety_checker=None)
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=True))
    with torch.no_grad():
        for n, p in pipe.unet.named_parameters():
            if "lora_B" in n or "lora_A" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    StableDiffusionPipeline.save_lora_weights(a.out, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                              weight_name="peft.safetensors")
    pipe = StableDiffusionPipeline.from_pretrained(PIPE, safety_checker=None)
    pipe.load_lora_weights(a.out, weight_name="peft.safetensors", adapter_name="p")
    pipe.fuse_lora(lora_scale=1.0)
    out["peft_text"], out["peft_eps"] = outputs(pipe, latents)
    out["latents"] = latents.contiguous()
    save_file(out, os.path.join(a.out, "expected.safetensors"))
    with open(os.path.join(a.out, "case.json"), "w") as f:
        json.dump({"prompt": PROMPT, "timestep": T, "scales": {"kohya": 0.7, "peft": 1.0},
                   "versions": {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
                                "peft": __import__("peft").__version__}}, f, indent=1)


if __name__ == "__main__":
    main()
