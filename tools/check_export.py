#!/usr/bin/env python3
"""Check a tensor file written by reneg's exporter against PyTorch, by hand.

    /work/pyref/bin/python tools/check_export.py FILE.pt [REFERENCE.safetensors] [--key NAME]

Loads FILE.pt with torch.load(path, weights_only=True) (torch's restricted unpickler: it refuses arbitrary pickle
globals, so it is safe on untrusted files), prints shape / dtype / mean / std and the container facts (zip archive
prefix and entries), and, when a safetensors file is given, compares the tensor with REFERENCE[key] for EXACT
equality (same shape, same dtype, bit-equal values). key: --key, else "emb" if present, else the file's only tensor.
Exit status 0 when it loads (and matches), 1 otherwise.

Uses the pinned reference venv of tools/gen_parity.py (torch 2.15.0, safetensors 0.8.0), outside the repository.
"""
from __future__ import annotations

import argparse
import sys
import zipfile

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("path")
    ap.add_argument("reference", nargs="?")
    ap.add_argument("--key")
    a = ap.parse_args()

    if zipfile.is_zipfile(a.path):
        with zipfile.ZipFile(a.path) as z:
            names = z.namelist()
        print(f"container: zip, {len(names)} entries: {names}")
    else:
        print("container: not a zip (legacy torch format?)")
    try:
        t = torch.load(a.path, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001
        print(f"torch.load(weights_only=True) FAILED: {type(e).__name__}: {str(e).splitlines()[0]}")
        return 1
    if not isinstance(t, torch.Tensor):
        print(f"payload is {type(t).__name__}, not a tensor: {t!r:.200}")
        return 1
    f = t.double()
    print(f"tensor: shape {list(t.shape)} dtype {str(t.dtype).replace('torch.', '')} stride {list(t.stride())} "
          f"mean {f.mean().item():.9g} std {f.std().item() if t.numel() > 1 else 0.0:.9g} "
          f"min {f.min().item():.9g} max {f.max().item():.9g}")
    if a.reference is None:
        return 0

    from safetensors.torch import load_file

    ref = load_file(a.reference)
    key = a.key or ("emb" if "emb" in ref else (next(iter(ref)) if len(ref) == 1 else None))
    if key is None or key not in ref:
        print(f"reference: no key {a.key!r}; keys {sorted(ref)}")
        return 1
    r = ref[key]
    ok = t.shape == r.shape and t.dtype == r.dtype and torch.equal(t, r)
    detail = ""
    if not ok and t.shape == r.shape:
        detail = f", max |diff| {(t.double() - r.double()).abs().max().item():.3g}"
    print(f"reference {key!r}: shape {list(r.shape)} dtype {str(r.dtype).replace('torch.', '')} -> "
          f"{'EXACT MATCH' if ok else 'MISMATCH'}{detail}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
