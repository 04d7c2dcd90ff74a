#!/usr/bin/env python3
"""PyTorch autocast references for the parity cases: what bf16 / fp16 autocast gives on each case, so that
tests/parity.rs can assert reneg's low-precision error against PyTorch's own (issue 15: reneg's error against
the f32 reference at most 1.5x PyTorch autocast's error against the same reference).

Reference stack as tools/gen_parity.py (a venv OUTSIDE the repo, never in CI):

    /work/pyref/bin/python tools/gen_autocast.py [--cases DIR ...] [--dtypes fp16 bf16]

For every pipeline case folder (default: tests/fixtures/parity/*/ with a pipeline/), it reads the committed
pipeline/, case.json and expected.safetensors and writes autocast.safetensors beside them (the format is in
docs/parity-autocast.md). Each stage is fed the f32 reference's own inputs, as tests/parity.rs feeds reneg:

    <dtype>/prompt_embeds                text encoder on prompt_input_ids
    <dtype>/final_latents                guided DDIM sampling from init_latents with the f32 prompt_embeds and
                                         negative_prompt_embeds
    <dtype>/image                        VAE decode of the f32 final_latents
    <dtype>/x0_pred, <dtype>/loss,       the gradient step from grad_latents_in (linear reward reward_weight),
    <dtype>/grad_negative_prompt_embeds  the gradient with respect to the f32 negative_prompt_embeds

How it runs each model: weights converted to the low type (module.to(dtype)), inputs in f32, every call inside
torch.autocast("cpu", dtype) (matmuls and convolutions in the low type, norms, softmax and the loss in f32);
outputs stored as f32. Deterministic: 2 threads, torch.use_deterministic_algorithms.
"""
import argparse
import json
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parent.parent
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def guided_eps(unet, latents, t, neg, pos, g, r=0.0):
    noise = unet(torch.cat([latents] * 2), t, encoder_hidden_states=torch.cat([neg, pos]), return_dict=False)[0]
    u, c = noise.float().chunk(2)
    out = u + g * (c - u)
    return rescale_noise_cfg(out, c, guidance_rescale=r) if r > 0 else out


def autocast_case(cdir: Path, name: str, dtype: torch.dtype) -> dict:
    case = json.loads((cdir / "case.json").read_text())
    exp = load_file(str(cdir / "expected.safetensors"))
    pipe = StableDiffusionPipeline.from_pretrained(str(cdir / "pipeline"), torch_dtype=torch.float32,
                                                   safety_checker=None, requires_safety_checker=False)
    te, unet, vae = pipe.text_encoder, pipe.unet, pipe.vae
    for m in (te, unet, vae):
        m.requires_grad_(False).eval().to(dtype)
    sf = vae.config.scaling_factor
    g = case["guidance_scale"]
    r = case.get("guidance_rescale", 0.0)
    n_steps, k = case["num_inference_steps"], case["grad_step_index"]
    pos, neg = exp["prompt_embeds"].float(), exp["negative_prompt_embeds"].float()
    out = {}
    ac = lambda: torch.autocast("cpu", dtype=dtype)  # noqa: E731
    with torch.no_grad(), ac():
        out["prompt_embeds"] = te(exp["prompt_input_ids"].long(), attention_mask=None)[0].float()
        sched = DDIMScheduler.from_config(pipe.scheduler.config)
        sched.set_timesteps(n_steps)
        latents = exp["init_latents"].float()
        for t in sched.timesteps:
            eps = guided_eps(unet, sched.scale_model_input(latents, t), t, neg, pos, g, r)
            latents = sched.step(eps, t, latents, eta=0.0).prev_sample.float()
        out["final_latents"] = latents
        out["image"] = vae.decode(exp["final_latents"].float() / sf).sample.float()
    neg_p = neg.clone().requires_grad_(True)
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(n_steps)
    t = sched.timesteps[k]
    lat = exp["grad_latents_in"].float()
    with ac():
        eps = guided_eps(unet, lat, t, neg_p, pos, g, r)
        x0 = sched.step(eps, t, lat, eta=0.0).pred_original_sample.float()
        dec = vae.decode(x0 / sf).sample.float()
        loss = -(exp["reward_weight"].float() * dec).sum()
    loss.backward()
    out["x0_pred"] = x0.detach()
    out["loss"] = loss.detach().reshape([])
    out["grad_negative_prompt_embeds"] = neg_p.grad.detach().clone()

    def rel(a, b):
        return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()

    for key, v in out.items():
        print(f"  {name} {key:<28} autocast rel err vs f32 {rel(v, exp[key]):.3e}")
    return {f"{name}/{key}": v.float().contiguous() for key, v in out.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="*", type=Path, default=None)
    ap.add_argument("--dtypes", nargs="*", default=["fp16", "bf16"], choices=sorted(DTYPES))
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    cases = args.cases or sorted(p.parent for p in (REPO / "tests/fixtures/parity").glob("*/pipeline"))
    for cdir in cases:
        print(f"case {cdir}")
        tensors = {}
        for name in args.dtypes:
            tensors.update(autocast_case(cdir, name, DTYPES[name]))
        meta = {"torch": torch.__version__, "generator": "tools/gen_autocast.py", "dtypes": ",".join(args.dtypes)}
        save_file(tensors, str(cdir / "autocast.safetensors"), metadata=meta)


if __name__ == "__main__":
    main()
