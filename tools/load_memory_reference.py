#!/usr/bin/env python3
"""The PyTorch side of tools/load_memory.sh: peak RSS of diffusers loading a Stable Diffusion pipeline folder
in float32 (`load`), or loading it and generating one 512x512 image with one DDIM step (`generate`), printed as
one JSON line. Reference venv of tools/gen_parity.py; never used in CI.

    python tools/load_memory_reference.py PIPELINE_DIR {load,generate}
"""
import json
import resource
import sys
import time

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

torch.set_num_threads(2)
path, mode = sys.argv[1], sys.argv[2]
start = time.time()
pipe = StableDiffusionPipeline.from_pretrained(path, torch_dtype=torch.float32, safety_checker=None,
                                               requires_safety_checker=False)
if mode == "generate":
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        pipe("a cat", num_inference_steps=1, generator=torch.Generator().manual_seed(0))
print(json.dumps({"impl": "pytorch", "mode": mode, "model": path,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "wall_s": time.time() - start, "torch": torch.__version__}))
