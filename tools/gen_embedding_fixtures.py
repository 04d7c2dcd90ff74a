#!/usr/bin/env python3
"""Write the PyTorch-file fixtures (torch.save of one tensor, and files that must be refused) for reneg's loader.

Reference stack (the pinned venv of tools/gen_parity.py, OUTSIDE the repository; never used in CI):

    python3 -m venv /work/pyref
    /work/pyref/bin/pip install torch==2.15.0 safetensors==0.8.0 numpy

Run (from anywhere; CPU only, a few seconds):

    /work/pyref/bin/python tools/gen_embedding_fixtures.py [--out tests/fixtures/embedding]
                                                           [--official ../shared/data/reneg-official]

What it writes under --out (default <repo>/tests/fixtures/embedding):

    torch_saved.pt            torch.save(t) with t = torch.randn(1, 77, 32, generator=manual_seed(7701)), f32,
                              default (zip) format; archive prefix "torch_saved/" (torch names the root folder after
                              the file's stem when saving to a path; "archive/" when saving to a buffer)
    torch_saved.safetensors   the same tensor under key "emb"
    torch_saved_f16.pt        torch.save(t.half())  (same values rounded to float16; HalfStorage)
    not_a_tensor.pt           torch.save({"a": 1, "b": [1, 2, 3]})   (valid file, payload is not a tensor)
    malicious.pt              a torch zip file (written with torch's own PyTorchFileWriter, so the zip layout is
                              torch's) whose data.pkl is hand-made: PROTO 2, GLOBAL 'os system',
                              BINUNICODE 'echo pwned > /tmp/reneg-pwned', TUPLE1, REDUCE, STOP.
                              NEVER unpickle it (this script only disassembles it with pickletools, which executes
                              nothing). A safe loader must refuse it: os.system is not an allowed global.
    legacy_format.pt          torch.save(t2, f, _use_new_zipfile_serialization=False), t2 = randn(2, 3, 4) seeded 7702:
                              the pre-1.6 format (NOT a zip: magic-number pickle, protocol pickle, sys_info pickle,
                              the object pickle, the storage-keys pickle, then each storage as u64 numel + raw bytes)
    official_stats.json       for each file in --official (the project's reference embeddings, torch zip files):
                              shape, dtype, mean, std (torch.std, unbiased), row0_norm = t[0,0].norm(), per-row norms
                              t[0].norm(dim=-1) min/max, sha256, all computed with torch in the tensor's dtype (f32),
                              plus float64 mean/std, and the container facts (zip entries, archive prefix, data offsets,
                              pickle opcodes, storage class)
    manifest.json             the same facts for every file written here, and what a loader must do with each

Tensor statistics are exact f32 torch results written with repr() precision (JSON numbers). Byte-for-byte the .pt
files are NOT reproducible across runs: torch writes a fresh .data/serialization_id each time (sha256 in
manifest.json is of the committed files); the tensors inside are.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import pickletools
import struct
import sys
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]
MALICIOUS_CMD = "echo pwned > /tmp/reneg-pwned"


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def tensor_stats(t: torch.Tensor) -> dict:
    f = t if t.dtype == torch.float32 else t.float()
    rows = f[0].norm(dim=-1)
    return {
        "shape": list(t.shape),
        "dtype": str(t.dtype).replace("torch.", ""),
        "mean": f.mean().item(),
        "std": f.std().item(),
        "row0_norm": f[0, 0].norm().item(),
        "row_norm_min": rows.min().item(),
        "row_norm_max": rows.max().item(),
        "mean_f64": t.double().mean().item(),
        "std_f64": t.double().std().item(),
        "stats_note": "mean/std/norms computed by torch in float32 (f16 tensors upcast first); *_f64 in float64",
    }


def pickle_summary(data: bytes) -> dict:
    ops, globals_, proto = [], [], None
    for op, arg, _pos in pickletools.genops(data):
        ops.append(op.name)
        if op.name == "PROTO":
            proto = arg
        if op.name in ("GLOBAL", "STACK_GLOBAL"):
            globals_.append(arg if op.name == "GLOBAL" else "STACK_GLOBAL")
    return {"protocol": proto, "opcodes": sorted(set(ops)), "globals": globals_, "size": len(data)}


def zip_facts(p: Path) -> dict:
    raw = p.read_bytes()
    if raw[:4] != b"PK\x03\x04":
        return {"zip": False, "first_bytes_hex": raw[:16].hex()}
    z = zipfile.ZipFile(p)
    entries = []
    for i in z.infolist():
        sig, _ver, flag, comp, _t, _d, crc, csz, usz, nl, el = struct.unpack(
            "<IHHHHHIIIHH", raw[i.header_offset:i.header_offset + 30])
        assert sig == 0x04034B50
        off = i.header_offset + 30 + nl + el
        entries.append({"name": i.filename, "size": i.file_size, "data_offset": off, "offset_mod_64": off % 64,
                        "method": comp, "flags": flag, "local_crc": crc, "local_sizes": [csz, usz],
                        "local_extra_len": el, "central_extra_len": len(i.extra)})
    names = z.namelist()
    prefix = names[0].split("/")[0] + "/"
    pkl = z.read(prefix + "data.pkl")
    facts = {"zip": True, "archive_prefix": prefix, "entries": entries, "data_pkl": pickle_summary(pkl)}
    for small in ("version", "byteorder", ".format_version", ".storage_alignment"):
        if prefix + small in names:
            facts[small] = z.read(prefix + small).decode("ascii", "replace")
    storage = [g for g in facts["data_pkl"]["globals"] if "Storage" in str(g)]
    facts["storage_classes"] = storage
    return facts


def malicious_pickle() -> bytes:
    cmd = MALICIOUS_CMD.encode()
    data = (b"\x80\x02"                        # PROTO 2
            + b"cos\nsystem\n"                  # GLOBAL 'os system'
            + b"q\x00"                          # BINPUT 0
            + b"X" + struct.pack("<I", len(cmd)) + cmd   # BINUNICODE cmd
            + b"q\x01"                          # BINPUT 1
            + b"\x85"                           # TUPLE1
            + b"q\x02"                          # BINPUT 2
            + b"R"                              # REDUCE  -> os.system(cmd)
            + b"q\x03"                          # BINPUT 3
            + b".")                             # STOP
    return data


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "embedding")
    ap.add_argument("--official", type=Path, default=REPO.parent / "shared" / "data" / "reneg-official")
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}")

    t = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(7701))
    t2 = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(7702))
    torch.save(t, out / "torch_saved.pt")
    save_file({"emb": t}, str(out / "torch_saved.safetensors"))
    torch.save(t.half(), out / "torch_saved_f16.pt")
    torch.save({"a": 1, "b": [1, 2, 3]}, out / "not_a_tensor.pt")
    torch.save(t2, out / "legacy_format.pt", _use_new_zipfile_serialization=False)
    # A negative of several parts (issue 30), under diffusers' names, as torch.save of a dict and as
    # safetensors: 5 tokens of t, a pooled embedding, and the mask of a 3-token prompt.
    parts = {
        "negative_prompt_embeds": t[:, :5, :].clone(),
        "negative_pooled_prompt_embeds": torch.randn(1, 8, generator=torch.Generator().manual_seed(7703)),
        "negative_prompt_attention_mask": torch.tensor([[1, 1, 1, 0, 0]], dtype=torch.int64),
    }
    torch.save(parts, out / "parts.pt")
    save_file(parts, str(out / "parts.safetensors"))

    mal = out / "malicious.pt"
    mal.unlink(missing_ok=True)
    w = torch._C.PyTorchFileWriter(str(mal))
    data = malicious_pickle()
    w.write_record("data.pkl", data, len(data))
    w.write_end_of_file()
    del w
    # inspect without executing: disassembly only
    with zipfile.ZipFile(mal) as z:
        got = z.read("malicious/data.pkl")
    assert got == data
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(got)]
    assert ("GLOBAL", "os system") in ops and ("REDUCE", None) in ops, ops
    print("malicious.pt data.pkl:")
    pickletools.dis(got, out=sys.stdout, indentlevel=2)

    # ---- self-checks of the good files (weights_only, i.e. torch's restricted unpickler)
    a = torch.load(out / "torch_saved.pt", weights_only=True)
    assert a.dtype == torch.float32 and torch.equal(a, t) and torch.equal(load_file(str(out / "torch_saved.safetensors"))["emb"], t)
    b = torch.load(out / "torch_saved_f16.pt", weights_only=True)
    assert b.dtype == torch.float16 and torch.equal(b, t.half())
    c = torch.load(out / "not_a_tensor.pt", weights_only=True)
    assert c == {"a": 1, "b": [1, 2, 3]}
    d = torch.load(out / "legacy_format.pt", weights_only=True)
    assert torch.equal(d, t2)
    e = torch.load(out / "parts.pt", weights_only=True)
    assert e.keys() == parts.keys() and all(torch.equal(e[k], parts[k]) for k in parts)

    manifest = {
        "torch_saved.pt": {"expect": "tensor", "seed": 7701, "make": "torch.randn(1,77,32, generator=manual_seed(7701))",
                           "equals": "torch_saved.safetensors:emb", **tensor_stats(t)},
        "torch_saved.safetensors": {"expect": "tensor", "key": "emb", **tensor_stats(t)},
        "torch_saved_f16.pt": {"expect": "tensor", "make": "torch_saved.pt's tensor .half()", **tensor_stats(t.half())},
        "not_a_tensor.pt": {"expect": "error: payload is not a tensor (a dict {'a': 1, 'b': [1, 2, 3]})"},
        "malicious.pt": {"expect": "error: refuse the pickle global 'os system' (never execute it)",
                         "payload": f"os.system({MALICIOUS_CMD!r}) via GLOBAL + REDUCE", "canary": "/tmp/reneg-pwned"},
        "parts.pt": {"expect": "a negative of three parts", "make": "torch.save({negative_prompt_embeds: torch_saved.pt's "
                     "tensor[:, :5], negative_pooled_prompt_embeds: randn(1, 8, seed 7703), "
                     "negative_prompt_attention_mask: [[1, 1, 1, 0, 0]] int64})",
                     "pooled": parts["negative_pooled_prompt_embeds"].flatten().tolist()},
        "parts.safetensors": {"expect": "the same three parts as parts.pt"},
        "legacy_format.pt": {"expect": "tensor, or a clear 'legacy (pre-1.6, non-zip) torch format not supported' error",
                             "seed": 7702, "make": "torch.randn(2,3,4, generator=manual_seed(7702))",
                             "values": t2.flatten().tolist(), **tensor_stats(t2)},
    }
    for name, m in manifest.items():
        p = out / name
        m["bytes"] = p.stat().st_size
        m["sha256"] = sha256(p)
        if name.endswith(".pt"):
            m["container"] = zip_facts(p)
    manifest["_versions"] = {"torch": torch.__version__.split("+")[0]}
    with open(out / "manifest.json", "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")

    # ---- the official reference embeddings
    stats = {}
    for p in sorted(args.official.iterdir()):
        if not p.is_file():
            continue
        x = torch.load(p, weights_only=True, map_location="cpu")
        assert isinstance(x, torch.Tensor), (p, type(x))
        s = tensor_stats(x)
        s.update({"bytes": p.stat().st_size, "sha256": sha256(p), "contiguous": x.is_contiguous(),
                  "stride": list(x.stride()), "storage_offset": x.storage_offset(), "container": zip_facts(p)})
        stats[p.name] = s
        print(f"{p.name}: {s['shape']} {s['dtype']} mean {s['mean']:.6g} std {s['std']:.6g} row0 {s['row0_norm']:.6g} "
              f"rows [{s['row_norm_min']:.6g}, {s['row_norm_max']:.6g}] prefix {s['container']['archive_prefix']}")
    stats["_versions"] = {"torch": torch.__version__.split("+")[0]}
    with open(out / "official_stats.json", "w") as f:
        json.dump(stats, f, indent=1)
        f.write("\n")
    for p in sorted(out.iterdir()):
        print(f"{p.stat().st_size:>9d}  {p.name}")


if __name__ == "__main__":
    sys.exit(main())
