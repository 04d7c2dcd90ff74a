#!/usr/bin/env python3
"""Write the malicious-checkpoint fixtures for the test that reneg's checkpoint reader refuses them.

    /work/pyref/bin/python tools/gen_evil_checkpoints.py [--out tests/fixtures/videocrafter/evil]

Writes (each a real torch.save zip; the payload would run `touch /tmp/reneg-pwned` under the stock unpickler):
    reduce_os_system.ckpt      {"state_dict": {"x": zeros(2)}, "hook": obj}, obj.__reduce__ -> (os.system, (cmd,));
                               pickle protocol 2 (torch.save's default): data.pkl holds GLOBAL 'posix system'
    global_builtins_eval.ckpt  {"state_dict": {"x": zeros(2)}, "hook": obj}, obj.__reduce__ -> (eval, (code,));
                               pickle protocol 4: data.pkl holds SHORT_BINUNICODE 'builtins', 'eval', STACK_GLOBAL
    README.md
The files are never loaded back here: data.pkl is only disassembled (pickletools.dis does not execute it).
"""
from __future__ import annotations

import argparse
import io
import os
import pickletools
import zipfile
from pathlib import Path

import torch

CMD = "touch /tmp/reneg-pwned"

README = """# Malicious checkpoint fixtures (do not unpickle)

Test inputs for reneg's safe checkpoint reader: each file must be refused before anything runs, and
`/tmp/reneg-pwned` must not appear. Written by `tools/gen_evil_checkpoints.py` (also run by
`tools/gen_videocrafter_parity.py`). No loader may unpickle these files with the stock unpickler
(`torch.load(..., weights_only=False)`, `pickle.load`): that runs `touch /tmp/reneg-pwned`.

| file | what the pickle (`<name>/data.pkl` inside the torch zip) does |
|---|---|
| `reduce_os_system.ckpt` | `{"state_dict": {"x": zeros(2)}, "hook": obj}`; `obj` pickles via `__reduce__` as `os.system("touch /tmp/reneg-pwned")`: opcode `GLOBAL 'posix system'` (pickle protocol 2, torch.save's default), then `REDUCE` |
| `global_builtins_eval.ckpt` | the same shape; `obj` pickles as `eval("__import__('os').system('touch /tmp/reneg-pwned')")`: `SHORT_BINUNICODE 'builtins'`, `SHORT_BINUNICODE 'eval'`, `STACK_GLOBAL` (protocol 4), then `REDUCE` |

The tensor `x` is a normal f32 storage, so a reader that walks the file must reject the non-whitelisted global,
not fail for some other reason.
"""


class _OsSystem:
    def __reduce__(self):
        return (os.system, (CMD,))


class _Eval:
    def __reduce__(self):
        return (eval, (f"__import__('os').system('{CMD}')",))


def _data_pkl(path: Path) -> bytes:
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
        return z.read(name)


def _disasm(raw: bytes) -> str:
    buf = io.StringIO()
    pickletools.dis(raw, out=buf)
    return buf.getvalue()


def write_all(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    p1 = out / "reduce_os_system.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(2)}, "hook": _OsSystem()}, str(p1), pickle_protocol=2)
    d1 = _disasm(_data_pkl(p1))
    assert "GLOBAL     'posix system'" in d1 or "GLOBAL     'os system'" in d1, d1
    p2 = out / "global_builtins_eval.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(2)}, "hook": _Eval()}, str(p2), pickle_protocol=4)
    d2 = _disasm(_data_pkl(p2))
    assert "'builtins'" in d2 and "'eval'" in d2 and "STACK_GLOBAL" in d2, d2
    (out / "README.md").write_text(README)
    for p in (p1, p2, out / "README.md"):
        assert p.stat().st_size < 10_000
        print(f"  {p}  {p.stat().st_size:,} B")
    for p, d in ((p1, d1), (p2, d2)):
        print(f"  {p.name} data.pkl globals:",
              [ln.split(None, 2)[-1] for ln in d.splitlines() if "GLOBAL" in ln or "BINUNICODE" in ln])


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    default = Path(__file__).resolve().parent.parent / "tests/fixtures/videocrafter/evil"
    ap.add_argument("--out", type=Path, default=default)
    write_all(ap.parse_args().out)
