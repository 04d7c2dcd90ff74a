#!/usr/bin/env python3
"""Write original-layout ("single file", lllyasviel ControlNet / ldm key names) ControlNet checkpoints for the tiny cases.

For each of the committed ControlNet parity cases controlnet-sd15-tiny and controlnet-sd2-tiny (written by
tools/gen_controlnet_parity.py) this script reads the saved diffusers ControlNetModel folder
tests/fixtures/parity/<case>/pipeline/controlnet/ (config.json + diffusion_pytorch_model.safetensors) and writes

    tests/fixtures/single_file_controlnet/<case>-controlnet.safetensors   keys WITH the prefix "control_model."
    tests/fixtures/single_file_controlnet/<case>-controlnet.pth           the same tensors, keys WITHOUT a prefix,
                                                                          torch.save of a plain dict (zip format)

The tensors are copied bit for bit and keep the folder's dtype (controlnet-sd15-tiny f32, controlnet-sd2-tiny f16);
nothing is reshaped (the original ControlNet keeps proj_in/proj_out as 1x1 convs when use_linear_projection is false
and as linears when it is true, exactly like diffusers). Both files are deterministic: a rerun gives identical bytes
(torch.save's zip entries carry a fixed 1980 date, its serialization_id is derived from the content, and its archive
folder is the file's stem, so the file NAME is part of the bytes).

Reference stack (the pinned venv of tools/gen_parity.py, OUTSIDE the repository; never used in CI):

    python3 -m venv /work/pyref
    /work/pyref/bin/pip install torch==2.15.0 diffusers==0.42.1 transformers==5.23.0 safetensors==0.8.0 numpy

Run (from anywhere; CPU only, a few seconds):

    /work/pyref/bin/python tools/gen_single_file_controlnet.py [--fixtures tests/fixtures/parity]
                                                               [--out tests/fixtures/single_file_controlnet]
                                                               [--only controlnet-sd15-tiny|controlnet-sd2-tiny]
                                                               [--check-only]

    --check-only   do not write; verify the committed files against a fresh conversion instead

Layout (ldm/cldm.py ControlNet module names; n = layers_per_block, L = number of levels, H = number of
controlnet_cond_embedding.blocks = 2 * (len(conditioning_embedding_out_channels) - 1)):

    time_embed.{0,2}.{weight,bias}              <- time_embedding.linear_{1,2}
    input_blocks.0.0.*                          <- conv_in
    input_blocks.{1+b(n+1)+j}.0.*               <- down_blocks.b.resnets.j, ldm resnet names: in_layers.0 (norm1),
                                                   in_layers.2 (conv1), emb_layers.1 (time_emb_proj),
                                                   out_layers.0 (norm2), out_layers.3 (conv2),
                                                   skip_connection (conv_shortcut)
    input_blocks.{1+b(n+1)+j}.1.*               <- down_blocks.b.attentions.j, SpatialTransformer; the names inside
                                                   are the diffusers ones, as in SD's original UNet checkpoints:
                                                   norm, proj_in, transformer_blocks.K.{attn1,attn2}.{to_q,to_k,to_v,
                                                   to_out.0}, transformer_blocks.K.ff.net.{0.proj,2},
                                                   transformer_blocks.K.norm{1,2,3}, proj_out
    input_blocks.{(b+1)(n+1)}.0.op.*            <- down_blocks.b.downsamplers.0.conv   (b < L-1)
    middle_block.{0,2}.*                        <- mid_block.resnets.{0,1}  (resnet names as above)
    middle_block.1.*                            <- mid_block.attentions.0   (transformer names as above)
    zero_convs.{i}.0.*                          <- controlnet_down_blocks.i (one per input block, i = 0 .. last)
    middle_block_out.0.*                        <- controlnet_mid_block
    input_hint_block.0.*                        <- controlnet_cond_embedding.conv_in
    input_hint_block.{2(h+1)}.*                 <- controlnet_cond_embedding.blocks.h   (h = 0 .. H-1)
    input_hint_block.{2(H+1)}.*                 <- controlnet_cond_embedding.conv_out   (the LAST conv)
    (odd input_hint_block indices are the SiLUs of the nn.Sequential and hold no weights)

The UNet-side names (time_embed, input_blocks, middle_block) are produced by unet_map of tools/gen_single_file.py
(imported by path), the same inverse of diffusers' convert_ldm_unet_checkpoint used for the SD single files. Keys
are written in the order of the real files (module registration order of cldm.ControlNet: time_embed,
input_blocks, zero_convs, input_hint_block, middle_block, middle_block_out; inside a resnet in_layers, emb_layers,
out_layers, skip_connection; inside a transformer norm, proj_in, transformer_blocks (attn1, ff, attn2, norm1..3),
proj_out; weight before bias), which only matters for the .pth bytes.

PREFIXES.
  * .safetensors: "control_model." -- the key names of the real ControlNet 1.0 / 1.1 releases
    (lllyasviel/ControlNet-v1-1 control_v11p_sd15_canny.pth dumps read control_model.time_embed.0.weight ...
    control_model.middle_block_out.0.bias, because they are ControlLDM state dicts restricted to the control
    model; the community fp16 .safetensors conversions keep them), and the form diffusers 0.42.1 detects:
    CHECKPOINT_KEY_NAMES["controlnet"] lists "control_model.time_embed.0.weight", and
    convert_controlnet_checkpoint strips LDM_CONTROLNET_KEY = "control_model." unless the dict has a top-level
    "time_embed.0.weight".
  * .pth: no prefix, as requested for this fixture (the "stand-alone" form of e.g. thibaud/controlnet-sd21, which
    convert_controlnet_checkpoint takes as-is when "time_embed.0.weight" is a key; ComfyUI and the A1111 extension
    accept both). NOTE: this is NOT what lllyasviel's ControlNet 1.1 .pth files hold -- those carry the
    "control_model." prefix too (see above) -- so between them the two fixtures cover both prefix conventions.
    Change PTH_PREFIX below to write the 1.1 form.

DIFFUSERS' HINT-BLOCK LIMITATION (found while verifying; diffusers 0.42.1 convert_controlnet_checkpoint):
    conv_out is hard-coded as input_hint_block.14 (right only for the real 8-conv hint block: conv_in, 6 blocks,
    conv_out), and every input_hint_block.N other than 0 and 14 is taken as a block. The tiny models have H = 2, so
    conv_out sits at input_hint_block.6 here and diffusers' converter turns it into a non-existent
    controlnet_cond_embedding.blocks.2 and never fills conv_out: ControlNetModel.from_single_file on these files
    fails ("Cannot copy out of meta tensor" with accelerate's empty init; with low_cpu_mem_usage=False it loads,
    warns only that blocks.2 was unused, and conv_out keeps its zero init). The checks below therefore (a) assert that this is the ONLY difference on the files as
    written, and (b) rename input_hint_block.{2(H+1)} -> input_hint_block.14 in a copy (only when 2(H+1) != 14) and
    assert that diffusers' converter and from_single_file then give back every tensor exactly. A loader that takes
    the highest input_hint_block index as conv_out reads real files and these fixtures alike.

Checks (printed, and asserted), per case and per file (.safetensors and .pth, re-read from disk):
    1. diffusers.loaders.single_file_utils.convert_controlnet_checkpoint(file, config): as written, the result
       differs from the folder's state dict only by conv_out -> blocks.H (when 2(H+1) != 14); with the conv_out
       rename, the same key set and every tensor bit-equal (dtype and shape too);
    2. ControlNetModel.from_single_file(<renamed dict>, config=<the controlnet folder>, local_files_only=True,
       torch_dtype=<stored dtype>): its state dict equals the folder's exactly; from_single_file(<file path>) as
       written raises (recorded, not fatal) -- for a file whose conv_out index is 14 it must load exactly;
    3. the .pth loads with torch.load(weights_only=True) as a plain dict, and both files equal each other modulo
       the prefix.
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import sys
import warnings
from pathlib import Path

sys.dont_write_bytecode = True  # do not drop __pycache__ into the repo's tools/
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

_GSF_PATH = Path(__file__).resolve().parent / "gen_single_file.py"
_spec = importlib.util.spec_from_file_location("gen_single_file", _GSF_PATH)
gsf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gsf)   # sets torch threads = 2 and deterministic algorithms

import torch  # noqa: E402
import diffusers  # noqa: E402
from diffusers import ControlNetModel  # noqa: E402
from diffusers.loaders import single_file_utils as sfu  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
diffusers.utils.logging.set_verbosity_error()

REPO = Path(__file__).resolve().parents[1]
CASES = ("controlnet-sd15-tiny", "controlnet-sd2-tiny")
ST_PREFIX = "control_model."    # .safetensors keys (ControlNet 1.0/1.1 releases, diffusers' detection key)
PTH_PREFIX = ""                 # .pth keys (stand-alone form; lllyasviel's 1.1 .pth files use "control_model.")
DIFFUSERS_HINT_CONV_OUT = 14    # sfu.DIFFUSERS_TO_LDM_MAPPING["controlnet"]["layers"] conv_out index


# --------------------------------------------------------------------------------------------------
# Mapping, diffusers ControlNetModel key -> original ControlNet key (no prefix)
# --------------------------------------------------------------------------------------------------
def hint_blocks(cfg: dict) -> int:
    """Number of controlnet_cond_embedding.blocks (ControlNetConditioningEmbedding: two convs per channel step)."""
    return 2 * (len(cfg["conditioning_embedding_out_channels"]) - 1)


def controlnet_map(keys: list[str], cfg: dict) -> dict[str, str]:
    H = hint_blocks(cfg)
    out, unet_side = {}, []
    for k in keys:
        p = k.split(".")
        if p[0] == "controlnet_cond_embedding":
            if p[1] == "conv_in":
                out[k] = f"input_hint_block.0.{p[2]}"
            elif p[1] == "conv_out":
                out[k] = f"input_hint_block.{2 * (H + 1)}.{p[2]}"
            else:
                assert p[1] == "blocks" and int(p[2]) < H and len(p) == 4, k
                out[k] = f"input_hint_block.{2 * (int(p[2]) + 1)}.{p[3]}"
        elif p[0] == "controlnet_down_blocks":
            assert len(p) == 3, k
            out[k] = f"zero_convs.{p[1]}.0.{p[2]}"
        elif p[0] == "controlnet_mid_block":
            assert len(p) == 2, k
            out[k] = f"middle_block_out.0.{p[1]}"
        else:
            unet_side.append(k)
    # time_embedding, conv_in, down_blocks, mid_block: exactly as in SD's original UNet (model.diffusion_model.*)
    out.update(gsf.unet_map(unet_side, cfg))
    assert len(set(out.values())) == len(out), "mapping is not one-to-one"
    return out


_TOP = {"time_embed": 0, "input_blocks": 1, "zero_convs": 2, "input_hint_block": 3, "middle_block": 4,
        "middle_block_out": 5}
_RANK = {  # registration order inside ldm modules
    "in_layers": 0, "emb_layers": 1, "out_layers": 2, "skip_connection": 3, "op": 0,
    "norm": 0, "proj_in": 1, "transformer_blocks": 2, "proj_out": 3,
    "attn1": 0, "ff": 1, "attn2": 2, "norm1": 3, "norm2": 4, "norm3": 5,
    "to_q": 0, "to_k": 1, "to_v": 2, "to_out": 3, "net": 0, "proj": 0,
    "weight": 0, "bias": 1,
}


def ldm_order(key: str):
    p = key.split(".")
    return (_TOP[p[0]],) + tuple((0, int(x), 0) if x.isdigit() else (1, _RANK[x], 0) for x in p[1:])


def read_json(p: Path) -> dict:
    with open(p) as f:
        return json.load(f)


def build(cn_dir: Path):
    cfg = read_json(cn_dir / "config.json")
    sd = load_file(str(cn_dir / "diffusion_pytorch_model.safetensors"))
    dtype = next(iter(sd.values())).dtype
    assert all(v.dtype == dtype for v in sd.values())
    m = controlnet_map(sorted(sd), cfg)
    orig = collections.OrderedDict()
    for k, l in sorted(((k, l) for k, l in m.items()), key=lambda kl: ldm_order(kl[1])):
        orig[l] = sd[k].contiguous().clone()   # own storage each: torch.save writes exactly this tensor
    return cfg, sd, orig, m, dtype


# --------------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------------
def to_diffusers_hint_index(ckpt: dict, cfg: dict, prefix: str) -> dict:
    """Copy of ckpt with conv_out moved to diffusers' hard-coded input_hint_block.14."""
    last = 2 * (hint_blocks(cfg) + 1)
    if last == DIFFUSERS_HINT_CONV_OUT:
        return dict(ckpt)
    out = {}
    for k, v in ckpt.items():
        for wb in ("weight", "bias"):
            if k == f"{prefix}input_hint_block.{last}.{wb}":
                k = f"{prefix}input_hint_block.{DIFFUSERS_HINT_CONV_OUT}.{wb}"
        out[k] = v
    return out


def assert_equal_sd(got: dict, ref: dict, what: str, cast=None):
    assert set(got) == set(ref), (what, sorted(set(got) ^ set(ref))[:8])
    for k, v in ref.items():
        g = got[k]
        if cast is not None:
            v = v.to(cast)
        assert g.dtype == v.dtype and g.shape == v.shape, (what, k, g.dtype, v.dtype, g.shape, v.shape)
        assert torch.equal(g, v), (what, k)


def check_converter(ckpt: dict, cfg: dict, ref: dict, prefix: str, label: str):
    H = hint_blocks(cfg)
    last = 2 * (H + 1)
    got = sfu.convert_controlnet_checkpoint(dict(ckpt), cfg)
    if last != DIFFUSERS_HINT_CONV_OUT:
        missing = sorted(set(ref) - set(got))
        extra = sorted(set(got) - set(ref))
        want_missing = ["controlnet_cond_embedding.conv_out.bias", "controlnet_cond_embedding.conv_out.weight"]
        want_extra = [f"controlnet_cond_embedding.blocks.{H}.bias", f"controlnet_cond_embedding.blocks.{H}.weight"]
        assert missing == want_missing and extra == want_extra, (label, missing, extra)
        for wb in ("weight", "bias"):
            assert torch.equal(got[f"controlnet_cond_embedding.blocks.{H}.{wb}"],
                               ref[f"controlnet_cond_embedding.conv_out.{wb}"]), (label, wb)
        common = {k: got[k] for k in ref if k in got}
        assert_equal_sd(common, {k: ref[k] for k in common}, label)
        print(f"   {label}: convert_controlnet_checkpoint AS WRITTEN: {len(common)}/{len(ref)} tensors bit-equal; "
              f"the only difference is diffusers' hard-coded conv_out index 14: input_hint_block.{last} -> "
              f"{want_extra}, conv_out missing")
    got = sfu.convert_controlnet_checkpoint(to_diffusers_hint_index(ckpt, cfg, prefix), cfg)
    assert_equal_sd(got, ref, label)
    print(f"   {label}: convert_controlnet_checkpoint with conv_out at input_hint_block.{DIFFUSERS_HINT_CONV_OUT}: "
          f"same {len(ref)} keys, every tensor bit-equal (dtype, shape, values)")


def check_from_single_file(path: Path, ckpt: dict, cfg: dict, ref: dict, cn_dir: Path, prefix: str, dtype):
    label = path.suffix
    kw = dict(config=str(cn_dir), local_files_only=True, torch_dtype=dtype)
    last = 2 * (hint_blocks(cfg) + 1)
    try:
        model = ControlNetModel.from_single_file(str(path), **kw)
        assert_equal_sd(model.state_dict(), ref, label)
        print(f"   {label}: ControlNetModel.from_single_file(file as written): state dict == folder")
        as_written = "ok"
    except Exception as e:  # noqa: BLE001
        assert last != DIFFUSERS_HINT_CONV_OUT, f"from_single_file failed on a 14-index file: {e!r}"
        msg = str(e).splitlines()[0][:100]
        print(f"   {label}: ControlNetModel.from_single_file(file as written) FAILS as expected "
              f"(conv_out at input_hint_block.{last}, diffusers reads only 14): {type(e).__name__}: {msg}")
        as_written = f"{type(e).__name__}: {msg}"
    model = ControlNetModel.from_single_file(to_diffusers_hint_index(ckpt, cfg, prefix), **kw)
    sd = model.state_dict()
    assert_equal_sd(sd, ref, label)
    print(f"   {label}: ControlNetModel.from_single_file(file's dict, conv_out renamed to "
          f"input_hint_block.{DIFFUSERS_HINT_CONV_OUT}, torch_dtype={str(dtype).replace('torch.', '')}): "
          f"{len(sd)} tensors == folder (values and dtype exact)")
    return as_written


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fixtures", type=Path, default=REPO / "tests" / "fixtures" / "parity")
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "single_file_controlnet")
    ap.add_argument("--only", nargs="*", choices=CASES)
    ap.add_argument("--check-only", action="store_true")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}")
    if not args.check_only:
        args.out.mkdir(parents=True, exist_ok=True)
    for name in args.only or CASES:
        cn_dir = args.fixtures / name / "pipeline" / "controlnet"
        cfg, ref, orig, m, dtype = build(cn_dir)
        H = hint_blocks(cfg)
        print(f"== {name}: {len(ref)} tensors, {str(dtype).replace('torch.', '')}, layers_per_block "
              f"{cfg['layers_per_block']}, {H} hint blocks (conv_out = input_hint_block.{2 * (H + 1)})")
        st_path = args.out / f"{name}-controlnet.safetensors"
        pth_path = args.out / f"{name}-controlnet.pth"
        st = collections.OrderedDict((ST_PREFIX + k, v) for k, v in orig.items())
        pt = collections.OrderedDict((PTH_PREFIX + k, v) for k, v in orig.items())
        if args.check_only:
            assert_equal_sd(load_file(str(st_path)), st, st_path.name)
            assert_equal_sd(torch.load(str(pth_path), weights_only=True), pt, pth_path.name)
            print(f"   {st_path.name}, {pth_path.name}: match a fresh conversion")
        else:
            save_file(st, str(st_path))
            torch.save(dict(pt), str(pth_path))
            print(f"   wrote {st_path} ({st_path.stat().st_size} bytes) and {pth_path} "
                  f"({pth_path.stat().st_size} bytes), {len(orig)} tensors each")
        # re-read from disk and verify
        st_disk = load_file(str(st_path))
        pt_disk = torch.load(str(pth_path), weights_only=True)
        assert type(pt_disk) is dict and all(isinstance(v, torch.Tensor) for v in pt_disk.values())
        assert list(pt_disk) == list(pt), "pth key order"
        assert_equal_sd({k[len(ST_PREFIX):]: v for k, v in st_disk.items()},
                        {k[len(PTH_PREFIX):]: v for k, v in pt_disk.items()}, "safetensors vs pth")
        assert all(k.startswith(ST_PREFIX) for k in st_disk)
        check_converter(st_disk, cfg, ref, ST_PREFIX, st_path.suffix)
        check_converter(pt_disk, cfg, ref, PTH_PREFIX, pth_path.suffix)
        check_from_single_file(st_path, st_disk, cfg, ref, cn_dir, ST_PREFIX, dtype)
        check_from_single_file(pth_path, pt_disk, cfg, ref, cn_dir, PTH_PREFIX, dtype)


if __name__ == "__main__":
    sys.exit(main())
