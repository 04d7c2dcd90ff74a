# Does the UNet read the layout from x_t at the first sampling steps? (schedule-leak hypothesis)
import sys, torch, numpy as np
torch.set_num_threads(1)
from diffusers import AutoencoderKL, UNet2DConditionModel, DDIMScheduler
from transformers import CLIPTextModel, CLIPTokenizer
P = sys.argv[1] if len(sys.argv) > 1 else '/work/main/assets/mini/pipeline'
UN = sys.argv[2] if len(sys.argv) > 2 else P + '/unet'
TE = sys.argv[3] if len(sys.argv) > 3 else P + '/text_encoder'
vae = AutoencoderKL.from_pretrained(P + '/vae'); unet = UNet2DConditionModel.from_pretrained(UN)
te = CLIPTextModel.from_pretrained(TE).float(); tok = CLIPTokenizer.from_pretrained(P + '/tokenizer')
sched = DDIMScheduler.from_pretrained(P + '/scheduler')
sf = vae.config.scaling_factor
def img(cx):
    y, x = np.mgrid[0:32, 0:32] + 0.5
    im = np.full((3, 32, 32), 0.5, np.float32)
    m = (x - cx) ** 2 + (y - 16) ** 2 <= 7 ** 2
    im[0][m], im[1][m], im[2][m] = 0.9, 0.1, 0.1
    return torch.tensor(im * 2 - 1)[None]
def emb(c):
    ids = tok([c], padding='max_length', max_length=tok.model_max_length, return_tensors='pt').input_ids
    return te(ids)[0].float()
with torch.no_grad():
    z = {s: vae.encode(img(cx)).latent_dist.mean * sf for s, cx in (('left', 9), ('right', 23))}
    print('latent std', float(z['left'].std()), 'left-right diff norm', float((z['left'] - z['right']).norm()))
    caps = {'null': '', 'left': 'a large red circle on the left, on a grey background',
            'right': 'a large red circle on the right, on a grey background'}
    E = {k: emb(c) for k, c in caps.items()}
    for t in [999, 951, 901, 801, 601]:
        ab = float(sched.alphas_cumprod[t])
        for cap in ['null', 'left', 'right']:
            hits = 0; n = 0
            for side in ['left', 'right']:
                for s in range(12):
                    g = torch.Generator().manual_seed(s)
                    eps = torch.randn(z[side].shape, generator=g)
                    xt = ab ** .5 * z[side] + (1 - ab) ** .5 * eps
                    # the layout a linear detector reads from x_t alone
                    e = unet(xt, t, encoder_hidden_states=E[cap]).sample
                    x0 = (xt - (1 - ab) ** .5 * e) / ab ** .5
                    im = vae.decode(x0 / sf).sample[0]
                    red = (im[0] - im[1]).clamp(min=0)
                    l, r = float(red[:, :16].sum()), float(red[:, 16:].sum())
                    hits += (l > r) == (side == 'left'); n += 1
            print(f't={t} sqrt(ab)={ab**.5:.3f} caption={cap:5s}: x0-prediction puts the circle on the true side of x_t in {hits}/{n}')
