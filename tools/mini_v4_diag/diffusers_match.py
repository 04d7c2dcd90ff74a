# diffusers' StableDiffusionPipeline on the committed fourth world vs `reneg generate`, same latents
import torch, numpy as np, subprocess, sys
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file
from PIL import Image
torch.set_num_threads(1)
P = '/work/main/assets/mini/pipeline'
pipe = StableDiffusionPipeline.from_pretrained(P, torch_dtype=torch.float32, safety_checker=None)
print(type(pipe.scheduler).__name__, pipe.scheduler.config.prediction_type, pipe.scheduler.config.rescale_betas_zero_snr, pipe.scheduler.config.timestep_spacing)
prompts = ['a large yellow circle on the left, on a grey background', 'a small red square at the bottom, on a teal background']
lat = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
save_file({'latents': lat.contiguous()}, 'lat.safetensors')
out = pipe(prompts, latents=lat.clone(), num_inference_steps=20, guidance_scale=7.5, height=32, width=32, output_type='np').images
open('prompts.txt', 'w').write('\n'.join(prompts))
subprocess.run(['/work/main/target/release/reneg', 'generate', '--model', P, '--prompts', 'prompts.txt', '--steps', '20',
                '--init-latents', 'lat.safetensors', '--out', 'ours'], check=True, capture_output=True)
import glob
ours = [np.asarray(Image.open(f), dtype=np.float64) / 255 for f in sorted(glob.glob('ours/*.png'))]
for i, o in enumerate(ours):
    d = np.abs(o - out[i]).max()
    print(f'image {i}: max |diffusers - reneg| over pixels in [0,1] = {d:.4f} (8-bit PNG quantisation: 1/255 = 0.0039)')
    Image.fromarray((out[i] * 255).round().astype(np.uint8)).resize((96, 96), Image.NEAREST).save(f'diffusers_{i}.png')
