"""Writes the hostile `pytorch_model.bin` files used by tests/robustness_pickle_code.rs.

Each file is a torch-style zip archive (`archive/data.pkl`, `archive/data/0`, `archive/version`)
whose pickle is written opcode by opcode (protocol 2), so nothing here depends on torch. Each
payload would run a shell command that creates a marker file under /tmp if the pickle were
unpickled by a loader that executes GLOBAL/REDUCE (Python's `pickle.load`, or `torch.load` with
`weights_only=False`):

- malicious_calls.bin: a dict whose values are `os.system(...)`, `builtins.eval(...)` and
  `subprocess.Popen([...])` calls, and nothing else.
- malicious_mixed.bin: the same three calls, then one genuine 2x2 f32 tensor record
  (`backbone.norm_f.weight` = [[1, 2], [3, 4]]) pointing at `archive/data/0`.
- malicious_inst.bin: a protocol-0 INST opcode (`i os\\nsystem\\n`), the other way to call.
- hostile_sizes.bin: no code, but tensor records whose size fields lie: `huge` claims
  (2^31 - 1, 16) f32 elements (128 GiB) and `overflow` (2^31 - 1)^3 with unit strides (more bytes than
  a usize holds), both over a 16-byte storage; `ok` is a genuine [1, 2, 3, 4].
- hostile_memo_blowup.bin: a "billion laughs" pickle (336 bytes of zip): an empty list stored in
  the memo, then 40 times BINGET 0, APPEND, BINPUT 0. Python shares the one list; a reader that
  deep-copies memo entries (Candle 0.11's) builds 2^40 objects and runs out of memory.

Run by hand: `python3 make_malicious_pickles.py` writes the files (the outputs are committed).
`python3 make_malicious_pickles.py --verify` also unpickles each data.pkl with Python's own
`pickle.loads` and checks that the marker files DO appear, i.e. that the files are real exploits
for a code-executing loader and the Rust test that finds no marker is meaningful. It deletes the
markers afterwards.
"""
import io
import os
import pickle
import struct
import sys
import zipfile

MARK_DIR = "/tmp"
MARKERS = {k: f"{MARK_DIR}/mamba2-rs-pickle-executed-{k}" for k in ("os", "eval", "popen", "inst")}


def unicode(s):
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def glob(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def call_os_system():
    return glob("os", "system") + unicode(f"touch {MARKERS['os']}") + b"\x85R"


def call_eval():
    code = f"__import__('os').system('touch {MARKERS['eval']}')"
    return glob("builtins", "eval") + unicode(code) + b"\x85R"


def call_popen():
    # subprocess.Popen(["touch", marker]): list built with EMPTY_LIST MARK ... APPENDS.
    args = b"](" + unicode("touch") + unicode(MARKERS["popen"]) + b"e"
    return glob("subprocess", "Popen") + args + b"\x85R"


def binint(n):
    return b"J" + struct.pack("<i", n)


def int_tuple(values):
    return b"(" + b"".join(binint(v) for v in values) + b"t"


def tensor_record(size=(2, 2), stride=(2, 1)):
    # torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)
    # storage = persistent_load(("storage", torch.FloatStorage, "0", "cpu", 4))
    storage = b"(" + unicode("storage") + glob("torch", "FloatStorage") + unicode("0") + unicode("cpu") + b"K\x04tQ"
    args = (
        b"("
        + storage
        + b"K\x00"  # offset
        + int_tuple(size)
        + int_tuple(stride)
        + b"\x89"  # requires_grad False
        + glob("collections", "OrderedDict") + b")R"  # backward hooks
        + b"t"
    )
    return glob("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def dict_pickle(items):
    body = b"\x80\x02}("
    for key, value in items:
        body += unicode(key) + value
    return body + b"u."


def inst_pickle():
    # Protocol 0: MARK, the argument, INST module\nname\n (calls os.system(arg)), STOP.
    return b"(" + unicode(f"touch {MARKERS['inst']}") + b"ios\nsystem\n."


def archive(pkl, blob=b""):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        # Fixed timestamps, so that rerunning the script reproduces the committed bytes.
        for name, data in (("archive/data.pkl", pkl), ("archive/data/0", blob), ("archive/version", b"3\n")):
            z.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)
    return buf.getvalue()


def memo_blowup_pickle(k=40):
    return b"\x80\x02]q\x00" + b"h\x00aq\x00" * k + b"."


def payloads():
    attacks = [("a", call_os_system()), ("b", call_eval()), ("c", call_popen())]
    weight = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)
    return {
        "malicious_calls.bin": (dict_pickle(attacks), b""),
        "malicious_mixed.bin": (dict_pickle(attacks + [("backbone.norm_f.weight", tensor_record())]), weight),
        "malicious_inst.bin": (inst_pickle(), b""),
        "hostile_memo_blowup.bin": (memo_blowup_pickle(), b""),
        "hostile_sizes.bin": (
            dict_pickle(
                [
                    ("huge", tensor_record((2**31 - 1, 16), (16, 1))),
                    ("overflow", tensor_record((2**31 - 1, 2**31 - 1, 2**31 - 1), (1, 1, 1))),
                    ("ok", tensor_record()),
                ]
            ),
            weight,
        ),
    }


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    for name, (pkl, blob) in payloads().items():
        with open(os.path.join(here, name), "wb") as f:
            f.write(archive(pkl, blob))
        print("wrote", name)
    if "--verify" in sys.argv:
        for m in MARKERS.values():
            if os.path.exists(m):
                os.remove(m)
        for name, (pkl, _) in payloads().items():
            if not name.startswith("malicious_") or name == "malicious_mixed.bin":
                continue  # its tensor record needs torch; the calls come first and are the same
            try:
                pickle.loads(pkl)
            except Exception as e:  # Popen objects etc. are fine; the side effect is what counts
                print(name, "raised after running:", type(e).__name__, e)
        import time
        time.sleep(0.5)  # Popen runs asynchronously
        for k, m in MARKERS.items():
            print(f"{k}: marker {'CREATED' if os.path.exists(m) else 'missing'}")
            assert os.path.exists(m), f"{k} payload did not execute under pickle.loads"
            os.remove(m)
        print("verified: every payload runs under a code-executing unpickler")


if __name__ == "__main__":
    main()
