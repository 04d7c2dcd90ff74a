# Builds a pipeline folder from the joint stage's partial checkpoint (param.* tensors).
import sys, shutil, os
from safetensors.torch import load_file, save_file
ck, src, out = sys.argv[1], sys.argv[2], sys.argv[3]
shutil.rmtree(out, ignore_errors=True)
shutil.copytree(src+'/pipeline', out)
m = load_file(ck)
print('step', m['step'].item())
te = {k[6:]: v.half().contiguous() for k, v in m.items() if k.startswith('param.text_model.')}
un = {k[6:]: v.half().contiguous() for k, v in m.items() if k.startswith('param.') and not k.startswith('param.text_model.') and not k.startswith('param.parse_probe')}
os.makedirs(out+'/unet', exist_ok=True)
shutil.copy(src+'/unet-base/config.json', out+'/unet/config.json')
save_file(te, out+'/text_encoder/model.safetensors'); save_file(un, out+'/unet/diffusion_pytorch_model.safetensors')
print(len(te), len(un))
