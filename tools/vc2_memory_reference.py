#!/usr/bin/env python3
"""PyTorch/lvdm side of the VideoCrafter2 memory/speed benchmark (CPU). Never run in CI.

Loads a VideoCrafter2 checkpoint folder the way VideoCrafter's own code does (lvdm's LatentDiffusion built from
the folder's config.yaml with utils.utils.instantiate_from_config, f32 modules, then load_state_dict(strict=True)
from model.safetensors; f16 tensors are upcast by load_state_dict) and times one guided DDIM step plus the VAE
decode on the CPU, under torch.no_grad. Prints one JSON line:

    {"impl": "pytorch-lvdm", "frames": F, "peak_rss_mb": ..., "load_s": ..., "step_s": ..., "decode_s": ..., ...}

peak_rss_mb is resource.getrusage(RUSAGE_SELF).ru_maxrss of the whole process (the largest value seen, as
the per-phase VmHWM resets below lower it) (load included: lvdm's
FrozenOpenCLIPEmbedder builds the full open_clip ViT-H-14, vision tower too, before deleting model.visual).
Extra keys: mode, height, width, threads, text_s (the two get_learned_conditioning calls, not in step_s), and
per-phase RSS (Linux; the load peak hides the step's): rss_before_step_mb, step_peak_rss_mb (VmHWM reset just
before the step via /proc/self/clear_refs), rss_before_decode_mb, decode_peak_rss_mb. The step's activation
memory is about step_peak_rss_mb - rss_before_step_mb (glibc may keep freed pages, so it is an upper bound).

Modes (latents [1,4,F,H/8,W/8], default 320x512 -> [1,4,F,40,64]; fps 28; guidance 12):
    step          lvdm's DDIMSampler.p_sample_ddim at the first of 50 DDIM steps (t=981): two UNet calls, batch 1
                  each (cond, then uncond = get_learned_conditioning([""]), uncond_type empty_seq), then
                  model.decode_first_stage_2DAE of the new latents (frame by frame, as lvdm decodes).
    step-batched  the same step with both guidance branches in one UNet call of batch 2 (how reneg runs CFG);
                  the DDIM update is done by the same p_sample_ddim (its e_t comes from the batched call).
    load          load only (step_s and decode_s are 0).

Needs a VideoCrafter source tree (AILab-CVC/VideoCrafter; e.g.
    mkdir -p /tmp/vc_src && git --git-dir=/work/.mirror/AILab-CVC+VideoCrafter/repo archive HEAD | tar -x -C /tmp/vc_src)
and the reference venv of tools/gen_videocrafter_parity.py (torch, safetensors, einops, omegaconf,
open_clip_torch==2.22.0, pytorch_lightning, kornia, opencv-python-headless). Nothing from VideoCrafter is copied
here; lvdm is imported from --vc-src. The one patch is DDIMSampler.register_buffer (it moves tensors to cuda).

Run:
    /work/pyref/bin/python tools/vc2_memory_reference.py --model /work/vc2-full --frames 4 [--mode step]
        [--vc-src /tmp/vc_src] [--threads 2] [--height 320 --width 512] [--eta 0.0] [--seed 0]

Each run is its own process so that peak_rss_mb belongs to one frame count.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def proc_status_mb(field: str) -> float:
    """VmRSS / VmHWM from /proc/self/status, in MB (KiB / 1024); -1 where unavailable."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return -1.0


def reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="folder with config.yaml and model.safetensors")
    ap.add_argument("--frames", type=int, required=True)
    ap.add_argument("--mode", choices=["step", "step-batched", "load"], default="step")
    ap.add_argument("--vc-src", type=Path, default=Path("/tmp/vc_src"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--height", type=int, default=320)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--fps", type=int, default=28)
    ap.add_argument("--guidance", type=float, default=12.0)
    ap.add_argument("--steps", type=int, default=50, help="DDIM schedule length; the step timed is its first")
    ap.add_argument("--eta", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt", default="a red fox running through snow, cinematic")
    args = ap.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(args.vc_src))
    from omegaconf import OmegaConf
    from safetensors.torch import load_file
    from utils.utils import instantiate_from_config
    from lvdm.models.samplers.ddim import DDIMSampler

    def register_buffer_cpu(self, name, attr):  # lvdm moves every sampler buffer to "cuda"
        setattr(self, name, attr)
    DDIMSampler.register_buffer = register_buffer_cpu

    # -- load, as scripts/evaluation/inference.py + funcs.load_model_checkpoint (strict) do
    t0 = time.perf_counter()
    config = OmegaConf.load(str(args.model / "config.yaml"))
    model = instantiate_from_config(config.model)
    sd = load_file(str(args.model / "model.safetensors"))
    model.load_state_dict(sd, strict=True)
    del sd
    model = model.eval()
    load_s = time.perf_counter() - t0

    out = {"impl": "pytorch-lvdm", "frames": args.frames, "mode": args.mode, "height": args.height,
           "width": args.width, "threads": torch.get_num_threads()}
    step_s = decode_s = text_s = 0.0
    phase = {}
    peaks = []
    if args.mode != "load":
        with torch.no_grad():
            t0 = time.perf_counter()
            c_emb = model.get_learned_conditioning([args.prompt])
            uc_emb = model.get_learned_conditioning([""])  # uncond_type: empty_seq
            text_s = time.perf_counter() - t0

            fps = torch.tensor([args.fps]).long()
            h, w = args.height // 8, args.width // 8
            g = torch.Generator().manual_seed(args.seed)
            x = torch.randn((1, model.channels, args.frames, h, w), generator=g)

            sampler = DDIMSampler(model)
            sampler.make_schedule(ddim_num_steps=args.steps, ddim_eta=args.eta, verbose=False)
            index = args.steps - 1
            ts = torch.full((1,), int(sampler.ddim_timesteps[index]), dtype=torch.long)
            cond = {"c_crossattn": [c_emb], "fps": fps}
            uc = {"c_crossattn": [uc_emb], "fps": fps}

            import gc
            gc.collect()
            phase["rss_before_step_mb"] = round(proc_status_mb("VmRSS"), 1)
            peaks.append(peak_rss_mb())  # the reset below also lowers ru_maxrss: keep the load peak
            have_hwm = reset_hwm()
            t0 = time.perf_counter()
            if args.mode == "step":
                x_prev, _ = sampler.p_sample_ddim(x, cond, ts, index=index, use_original_steps=False,
                                                  unconditional_guidance_scale=args.guidance,
                                                  unconditional_conditioning=uc, x0=None)
            else:  # step-batched: both branches in one batch-2 UNet call, then the same DDIM update
                eps2 = model.apply_model(torch.cat([x, x]), torch.cat([ts, ts]),
                                         {"c_crossattn": [torch.cat([c_emb, uc_emb])], "fps": torch.cat([fps, fps])})
                e_c, e_u = eps2.chunk(2)
                e_t = e_u + args.guidance * (e_c - e_u)
                model_apply = model.apply_model
                model.apply_model = lambda *a, **k: e_t  # p_sample_ddim without guidance calls apply_model once
                try:
                    x_prev, _ = sampler.p_sample_ddim(x, cond, ts, index=index, use_original_steps=False,
                                                      unconditional_guidance_scale=1.0,
                                                      unconditional_conditioning=None, x0=None)
                finally:
                    model.apply_model = model_apply
            step_s = time.perf_counter() - t0
            if have_hwm:
                phase["step_peak_rss_mb"] = round(proc_status_mb("VmHWM"), 1)
            peaks.append(peak_rss_mb())

            gc.collect()
            phase["rss_before_decode_mb"] = round(proc_status_mb("VmRSS"), 1)
            have_hwm = reset_hwm()
            t0 = time.perf_counter()
            video = model.decode_first_stage_2DAE(x_prev)
            decode_s = time.perf_counter() - t0
            if have_hwm:
                phase["decode_peak_rss_mb"] = round(proc_status_mb("VmHWM"), 1)
        stats = {"latents_std": float(x_prev.std()), "latents_finite": bool(torch.isfinite(x_prev).all()),
                 "video_std": float(video.std()), "video_absmax": float(video.abs().max()),
                 "video_finite": bool(torch.isfinite(video).all()), "video_shape": list(video.shape)}
        print(json.dumps(stats), file=sys.stderr, flush=True)

    peaks.append(peak_rss_mb())
    out.update({"peak_rss_mb": round(max(peaks), 1), "load_s": round(load_s, 2), "text_s": round(text_s, 2),
                "step_s": round(step_s, 2), "decode_s": round(decode_s, 2)})
    out.update(phase)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
