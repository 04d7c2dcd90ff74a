# initial noise with its low frequencies removed: each 4x4 block's mean subtracted, then
# rescaled to unit variance per sample (what remains is white within blocks)
import torch, sys
from safetensors.torch import save_file
g=torch.Generator().manual_seed(0)
n=int(sys.argv[1]); mode=sys.argv[2]
x=torch.randn(n,4,16,16,generator=g)
if mode=='lowfree':
    m=torch.nn.functional.avg_pool2d(x,8); x=x-torch.nn.functional.interpolate(m,scale_factor=8,mode='nearest')
    x=x/x.flatten(1).std(1).view(-1,1,1,1)
save_file({'latents':x.contiguous()}, sys.argv[3])
