"""Writes tests/data/tiny_official.pth: a checkpoint in PyTorch's zip format,
laid out like the official NVIDIA files ({"state_dict": ..., "epoch": ...},
keys prefixed "module.", int64 num_batches_tracked scalars), without needing
torch: the pickle references torch's rebuild function and storage classes by
name, which is all a .pth holds.

Usage: hmsa-lab model --config tests/data/tiny.toml | python3 tests/data/make_pth.py OUT
Tensor t (in listing order), element j holds float32(sin(0.1 t + 0.01 j)).
"""
import collections
import math
import pickle
import struct
import sys
import types
import zipfile

torch = types.ModuleType("torch")
utils = types.ModuleType("torch._utils")
sys.modules["torch"], sys.modules["torch._utils"] = torch, utils


def _rebuild_tensor_v2(*args):
    raise RuntimeError("only for pickling")


_rebuild_tensor_v2.__module__ = "torch._utils"
utils._rebuild_tensor_v2 = _rebuild_tensor_v2
for name in ("FloatStorage", "LongStorage"):
    cls = type(name, (), {})
    cls.__module__ = "torch"
    setattr(torch, name, cls)


class Storage:
    def __init__(self, kind, key, numel):
        self.kind, self.key, self.numel = kind, key, numel


class Tensor:
    def __init__(self, storage, shape):
        self.storage, self.shape = storage, tuple(shape)

    def __reduce__(self):
        stride, acc = [], 1
        for d in reversed(self.shape):
            stride.insert(0, acc)
            acc *= d
        return (_rebuild_tensor_v2,
                (self.storage, 0, self.shape, tuple(stride), False, collections.OrderedDict()))


class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", obj.kind, str(obj.key), "cpu", obj.numel)
        return None


def main(out):
    state, blobs = collections.OrderedDict(), []
    t = 0
    for line in sys.stdin:
        parts = line.split()
        if not parts or parts[0] in ("parameters:", "GFLOPs"):
            continue
        name = parts[0]
        shape = [int(d) for d in parts[1].split(",")] if len(parts) > 1 else []
        key = len(blobs)
        if name.endswith("num_batches_tracked"):
            blobs.append(struct.pack("<q", 1234))
            state["module." + name] = Tensor(Storage(torch.LongStorage, key, 1), shape)
            continue
        n = math.prod(shape)
        vals = [math.sin(0.1 * t + 0.01 * j) for j in range(n)]
        blobs.append(struct.pack("<%df" % n, *vals))
        state["module." + name] = Tensor(Storage(torch.FloatStorage, key, n), shape)
        t += 1
    wrapper = {"state_dict": state, "epoch": 7, "mean_iu": 0.5, "command": "train.py"}
    import io
    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(wrapper)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        for key, blob in enumerate(blobs):
            z.writestr("archive/data/%d" % key, blob)
        z.writestr("archive/version", "3\n")


if __name__ == "__main__":
    main(sys.argv[1])
