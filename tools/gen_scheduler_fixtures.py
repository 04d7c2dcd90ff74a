#!/usr/bin/env python3
"""Write the scheduler fixtures: one recorded sampling run per case of a diffusers scheduler on a fixed fake
model, so that reneg's schedulers (DDIM with eta >= 0, Euler, Euler ancestral, DPM++ 2M with and without Karras
sigmas, UniPC, PNDM/PLMS) can be checked against diffusers step for step.

Reference stack: the pinned venv of tools/gen_parity.py (torch 2.15.0, diffusers 0.42.1), OUTSIDE the repository;
never used in CI. Run (CPU, a few seconds):

    /work/pyref/bin/python tools/gen_scheduler_fixtures.py [--out tests/fixtures/schedulers] [--only CASE ...]

Each scheduler is built as users build it, Cls.from_config(source_config, **overrides), where source_config is
the scheduler_config.json that Stable Diffusion 1.5 (PNDM, epsilon) or 2.1 (DDIM, v_prediction) ships. The fake
model is model_output = 0.5 * model_input + 0.5 * e_i with e_i fixed standard normal tensors. The loop is the
pipelines' loop:

    sample = noise * init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(sample, t)
        model_output = 0.5 * model_input + 0.5 * e_i
        sample = scheduler.step(model_output, t, sample, ...).prev_sample

Writes, per case, under --out:
    <case>.json          case, class, source_config, overrides, effective_config (the scheduler's resolved
                         config), steps, eta (DDIM only), timesteps, sigmas (null when the class has none),
                         init_noise_sigma, model_output_formula, the seeds, diffusers_version, torch_version,
                         pred_original_sample_source (DPM++, UniPC, PNDM: where their x0 comes from)
    <case>.safetensors   float32 [1, 4, 6, 5]: noise (x_T before scaling by init_noise_sigma); for every step
                         index i: model_input.i, e.i, model_output.i, prev_sample.i, pred_original_sample.i (the
                         step's own; DPM++ and UniPC: their convert_model_output, which step() does not
                         return; PNDM: the alphas_cumprod formula) and step_noise.i (the exact tensor a stochastic step drew through
                         diffusers.utils.torch_utils.randn_tensor; absent when nothing was drawn)
"""
import argparse
import inspect
import json
import os
import sys

import diffusers
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.utils import logging as diffusers_logging
from safetensors.torch import load_file, save_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (1, 4, 6, 5)
FORMULA = "0.5 * model_input + 0.5 * e_i"

# scheduler_config.json as the Stable Diffusion v1.5 and 2.1 repositories ship it.
SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SD21 = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

# (case, class, source config, overrides, steps, eta)
CASES = [
    ("ddim_sd15", DDIMScheduler, SD15, {}, 10, 0.0),
    ("ddim_eta_sd15", DDIMScheduler, SD15, {}, 10, 0.7),
    ("ddim_v_sd21_trailing", DDIMScheduler, SD21, {"timestep_spacing": "trailing"}, 7, 0.0),
    ("euler_sd15", EulerDiscreteScheduler, SD15, {}, 10, None),
    ("euler_v_sd21_linspace", EulerDiscreteScheduler, SD21, {"timestep_spacing": "linspace"}, 9, None),
    ("euler_a_sd15", EulerAncestralDiscreteScheduler, SD15, {}, 10, None),
    ("euler_a_v_sd21", EulerAncestralDiscreteScheduler, SD21, {}, 8, None),
    ("dpmpp_2m_sd15", DPMSolverMultistepScheduler, SD15, {}, 10, None),
    ("dpmpp_2m_karras_sd15", DPMSolverMultistepScheduler, SD15, {"use_karras_sigmas": True}, 10, None),
    ("dpmpp_2m_karras_v_sd21", DPMSolverMultistepScheduler, SD21, {"use_karras_sigmas": True}, 8, None),
    ("unipc_sd15", UniPCMultistepScheduler, SD15, {}, 10, None),
    ("unipc_v_sd21", UniPCMultistepScheduler, SD21, {}, 7, None),
    ("pndm_sd15", PNDMScheduler, SD15, {}, 10, None),
    ("pndm_v_sd21", PNDMScheduler, SD21, {}, 8, None),
    ("euler_sd15_1step", EulerDiscreteScheduler, SD15, {}, 1, None),
    ("dpmpp_2m_sd15_3step", DPMSolverMultistepScheduler, SD15, {}, 3, None),
    # Zero terminal SNR (Lin et al.), as the miniature world's fourth pipeline ships it.
    ("ddim_v_zero_snr_trailing", DDIMScheduler, SD21,
     {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True}, 7, 0.0),
]


class NoiseRecorder:
    """Stands in for randn_tensor inside one scheduler module and keeps every tensor it hands out."""

    def __init__(self, inner):
        self.inner = inner
        self.drawn = []

    def __call__(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        self.drawn.append(out.detach().clone())
        return out


# Where each class's pred_original_sample.i comes from, for the samplers whose step() returns none.
X0_SOURCE = {
    DPMSolverMultistepScheduler: "convert_model_output (the solver's own data prediction), before step",
    UniPCMultistepScheduler: "convert_model_output (the solver's own data prediction, predict_x0), before step",
    PNDMScheduler: "alphas_cumprod[t] formula: (sample - sqrt(1 - a) * eps) / sqrt(a), or "
    "sqrt(a) * sample - sqrt(1 - a) * v for v_prediction (PNDM keeps no x0 of its own)",
}


def reference_x0(sched, cls, model_output, t, sample):
    """The predicted x0 of a step whose step() returns none, from diffusers' own conversion where the class
    has one (the multistep solvers) or from the training schedule (PNDM); None for the other classes."""
    if cls in (DPMSolverMultistepScheduler, UniPCMultistepScheduler):
        if sched.step_index is None:
            sched._init_step_index(t)
        return sched.convert_model_output(model_output, sample=sample)
    if cls is PNDMScheduler:
        a = sched.alphas_cumprod[int(t)]
        if sched.config.prediction_type == "v_prediction":
            return a.sqrt() * sample - (1 - a).sqrt() * model_output
        return (sample - (1 - a).sqrt() * model_output) / a.sqrt()
    return None


def jsonable(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


def run_case(index, name, cls, source, overrides, steps, eta):
    noise_seed = 1000 + index
    e_seed = 2000 + index
    step_seed = 3000 + index

    sched = cls.from_config(dict(source), **overrides)
    sched.set_timesteps(steps)
    timesteps = sched.timesteps
    sigmas = getattr(sched, "sigmas", None)

    torch.manual_seed(noise_seed)
    noise = torch.randn(SHAPE, dtype=torch.float32)
    g_e = torch.Generator().manual_seed(e_seed)
    es = [torch.randn(SHAPE, generator=g_e, dtype=torch.float32) for _ in range(len(timesteps))]

    step_params = inspect.signature(sched.step).parameters
    g_step = torch.Generator().manual_seed(step_seed)
    kwargs = {}
    if "generator" in step_params and (cls is not DDIMScheduler or eta > 0):
        kwargs["generator"] = g_step
    if cls is DDIMScheduler:
        kwargs["eta"] = eta

    module = sys.modules[cls.__module__]
    original = getattr(module, "randn_tensor", None)
    recorder = NoiseRecorder(original) if original is not None else None
    if recorder is not None:
        module.randn_tensor = recorder

    init_noise_sigma = sched.init_noise_sigma
    tensors = {"noise": noise}
    sample = noise * init_noise_sigma
    try:
        for i, t in enumerate(timesteps):
            model_input = sched.scale_model_input(sample, t)
            model_output = 0.5 * model_input + 0.5 * es[i]
            if recorder is not None:
                recorder.drawn.clear()
            x0 = reference_x0(sched, cls, model_output, t, sample)
            out = sched.step(model_output, t, sample, **kwargs)
            tensors[f"model_input.{i}"] = model_input
            tensors[f"e.{i}"] = es[i]
            tensors[f"model_output.{i}"] = model_output
            tensors[f"prev_sample.{i}"] = out.prev_sample
            pred = getattr(out, "pred_original_sample", None)
            if pred is None:
                pred = x0
            if pred is not None:
                tensors[f"pred_original_sample.{i}"] = pred
            if recorder is not None and recorder.drawn:
                if len(recorder.drawn) != 1:
                    raise RuntimeError(f"{name}: step {i} drew {len(recorder.drawn)} noise tensors")
                tensors[f"step_noise.{i}"] = recorder.drawn[0]
            sample = out.prev_sample
    finally:
        if recorder is not None:
            module.randn_tensor = original

    for key, value in tensors.items():
        if value.dtype != torch.float32 or tuple(value.shape) != SHAPE:
            raise RuntimeError(f"{name}: {key} is {value.dtype} {tuple(value.shape)}")
    tensors = {k: v.detach().clone().contiguous() for k, v in tensors.items()}  # no shared storage

    meta = {
        "diffusers_version": diffusers.__version__,
        "torch_version": torch.__version__,
        "case": name,
        "class": cls.__name__,
        "source_config": source,
        "overrides": overrides,
        "effective_config": {
            # _use_default_values comes from a set; sort it so that reruns write identical files
            k: sorted(v) if k == "_use_default_values" else jsonable(v)
            for k, v in sched.config.items()
        },
        "steps": steps,
    }
    if cls is DDIMScheduler:
        meta["eta"] = eta
    if cls in X0_SOURCE:
        meta["pred_original_sample_source"] = X0_SOURCE[cls]
    meta.update(
        {
            "timesteps": [float(x) for x in timesteps],
            "sigmas": None if sigmas is None else [float(x) for x in sigmas],
            "init_noise_sigma": float(init_noise_sigma),
            "model_output_formula": FORMULA,
            "shape": list(SHAPE),
            "noise_seed": noise_seed,
            "e_seed": e_seed,
            "step_generator_seed": step_seed if "generator" in kwargs else None,
        }
    )
    return meta, tensors


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(REPO, "tests/fixtures/schedulers"))
    ap.add_argument("--only", nargs="*", help="case names to (re)write; all when absent")
    args = ap.parse_args()
    diffusers_logging.set_verbosity_error()
    torch.set_default_dtype(torch.float32)
    os.makedirs(args.out, exist_ok=True)

    names = [c[0] for c in CASES]
    for wanted in args.only or []:
        if wanted not in names:
            sys.exit(f"unknown case {wanted}; known: {', '.join(names)}")

    total = 0
    print(f"{'case':<24} {'n':>3} {'first t':>9} {'last t':>9} {'max|x_0|':>10} {'bytes':>7}")
    for index, (name, cls, source, overrides, steps, eta) in enumerate(CASES):
        if args.only and name not in args.only:
            continue
        meta, tensors = run_case(index, name, cls, source, overrides, steps, eta)
        json_path = os.path.join(args.out, f"{name}.json")
        st_path = os.path.join(args.out, f"{name}.safetensors")
        with open(json_path, "w") as f:
            json.dump(meta, f, indent=1)
            f.write("\n")
        save_file(tensors, st_path)

        # Reload and compare, bit for bit.
        with open(json_path) as f:
            again = json.load(f)
        if again != meta:
            raise RuntimeError(f"{name}: JSON does not reload to the same value")
        loaded = load_file(st_path)
        if loaded.keys() != tensors.keys() or any(not torch.equal(loaded[k], tensors[k]) for k in tensors):
            raise RuntimeError(f"{name}: safetensors do not reload to the same tensors")

        n = len(meta["timesteps"])
        final = tensors[f"prev_sample.{n - 1}"]
        size = os.path.getsize(json_path) + os.path.getsize(st_path)
        total += size
        print(
            f"{name:<24} {n:>3} {meta['timesteps'][0]:>9.3f} {meta['timesteps'][-1]:>9.3f} "
            f"{final.abs().max().item():>10.5f} {size:>7}"
        )
    print(f"total {total} bytes")


if __name__ == "__main__":
    main()
