"""An independent PyTorch implementation of the network (HRNetV2 + OCR +
scale attention, the official MscaleOCR structure and state_dict names) for
two checks that need PyTorch, run where PyTorch is installed:

  parity   load weights and an input written by hmsa-lab (npz), run every
           scale and the hierarchical fusion, and compare with the tensors
           `hmsa-lab infer --dump` wrote (max abs difference per tensor).
  bench    CPU inference latency of the same network and input with a given
           number of threads (for the comparison with `hmsa-lab bench`).
  compare  both sides on one machine: docs/performance.md's inference and training
           cases, PyTorch in this process and `hmsa-lab bench --case` as a
           child, alternating, two rounds; prints a markdown table of the
           minimum times.
  train    CPU time of one training step as `hmsa-lab bench train` measures
           it: train-mode forward of the fusion, CE + 0.4 aux CE on the fused
           outputs at the input size, backward, SGD (momentum 0.9, weight
           decay 5e-4), on random images and labels.
  gpu      the W48 rows of `hmsa-lab bench model train --full` on CUDA GPU 0,
           in f32 (TF32 off, as candle computes f32) or bf16 (autocast, the
           standard mixed precision): inference forwards and training steps,
           each timed between synchronisations, min of 3 after a warm-up,
           with the peak of allocated device memory.
  trainstep  one hierarchical training step run the official way
           (`official_train_step`: MscaleOCR.two_scale_forward in training,
           0.5x pass first, the attention head on both passes, CE + 0.4 aux
           CE on the fused outputs + 0.05 CE per scale, then torch.optim.SGD
           with momentum 0.9 and weight decay 5e-4; OCR dropout off) on a
           network built with torch.manual_seed(0) and PyTorch's default
           initialisation and a seeded batch (2 images 3x32x64, labels in
           0..num_classes with some 255). Writes OUT.safetensors: `image`,
           `labels` (u32), `lr` (f64), `loss_total`/`loss_main`/`loss_aux`,
           every parameter and BatchNorm running statistic before the step
           (`before.NAME`, our state_dict names) and after it (`after.NAME`).
           The fixture of tests/it/train.rs is written by
             python3 tools/torch_reference.py trainstep tests/data/trainstep.json tests/data/trainstep.safetensors
           (torch 2.15.0 wrote the committed file, byte for byte reproducibly;
           the version is in its __metadata__).

usage: python3 tools/torch_reference.py parity WEIGHTS.safetensors INPUT.safetensors DUMP.safetensors CONFIG.json
       python3 tools/torch_reference.py bench CONFIG.json THREADS H W SCALES FUSION
       python3 tools/torch_reference.py train CONFIG.json THREADS BATCH H W SCALES FUSION
       python3 tools/torch_reference.py compare HMSA_LAB_BINARY THREADS
       python3 tools/torch_reference.py gpu f32|bf16 [cuda|cpu]
       python3 tools/torch_reference.py trainstep CONFIG.json OUT.safetensors
       python3 tools/torch_reference.py inference CONFIG.json OUT.safetensors
       python3 tools/torch_reference.py pth LISTING.txt OUT.pth

  inference  the fixture of tests/it/model.rs's parity test (see
           `inference` below), written by
             python3 tools/torch_reference.py inference tests/data/trainstep.json tests/data/inference.safetensors

  pth      checkpoints written by torch.save itself, zip and legacy layouts,
           with offset and non-contiguous storages (see `pth` below), by
             hmsa-lab model --config tests/data/tiny.toml > /tmp/listing.txt
             python3 tools/torch_reference.py pth /tmp/listing.txt tests/data/torch_zip.pth

CONFIG.json is the model config as serde writes it (hmsa-lab's ModelConfig).
"""
import collections
import contextlib
import json
import sys
import time

import struct

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def load_safetensors(path):
    """name -> numpy array (f32/f64/i64/u32), read by hand: 8-byte header
    length, JSON header, raw little-endian data."""
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    base = 8 + n
    types = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "U32": np.uint32, "U8": np.uint8}
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(raw[base + a : base + b], dtype=types[info["dtype"]]).reshape(info["shape"])
    return out


def save_safetensors(path, tensors, metadata=None):
    """Writes name -> numpy array (f32/f64/i64/u32/u8) as safetensors by
    hand, the layout `load_safetensors` reads: 8-byte little-endian header
    length, JSON header (names sorted, padded with spaces to 8 bytes), raw
    little-endian data in header order."""
    types = {np.dtype(np.float32): "F32", np.dtype(np.float64): "F64", np.dtype(np.int64): "I64",
             np.dtype(np.uint32): "U32", np.dtype(np.uint8): "U8"}
    header, blobs, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    for name in sorted(tensors):
        a = np.array(tensors[name], order="C")  # (ascontiguousarray makes 0-d arrays 1-d)
        blob = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": types[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for blob in blobs:
            f.write(blob)


def up(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def resize_x(x, s):
    return F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False, recompute_scale_factor=True)


def bn(c):
    return nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)


class BasicBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn1 = bn(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = bn(c)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + x)


class Bottleneck(nn.Module):
    def __init__(self, cin, planes):
        super().__init__()
        cout = planes * 4
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = bn(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = bn(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = bn(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), bn(cout)) if cin != cout else None

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (self.downsample(x) if self.downsample is not None else x))


def conv_bn(cin, cout, k, s, relu):
    layers = [nn.Conv2d(cin, cout, k, s, k // 2, bias=False), bn(cout)]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class HrModule(nn.Module):
    def __init__(self, widths, blocks):
        super().__init__()
        nb = len(widths)
        self.branches = nn.ModuleList([nn.Sequential(*[BasicBlock(w) for _ in range(blocks)]) for w in widths])
        self.fuse_layers = nn.ModuleList()
        for i in range(nb):
            row = nn.ModuleList()
            for j in range(nb):
                if j > i:
                    row.append(conv_bn(widths[j], widths[i], 1, 1, False))
                elif j == i:
                    row.append(None)
                else:
                    chain = []
                    for k in range(i - j):
                        last = k == i - j - 1
                        chain.append(conv_bn(widths[j], widths[i] if last else widths[j], 3, 2, not last))
                    row.append(nn.Sequential(*chain))
            self.fuse_layers.append(row)

    def forward(self, xs):
        xs = [b(x) for b, x in zip(self.branches, xs)]
        out = []
        for i, row in enumerate(self.fuse_layers):
            y = None
            for j, op in enumerate(row):
                if j == i:
                    t = xs[j]
                elif j > i:
                    t = up(op(xs[j]), xs[i].shape[-2:])
                else:
                    t = op(xs[j])
                y = t if y is None else y + t
            out.append(F.relu(y))
        return out


class HRNetV2(nn.Module):
    def __init__(self, b):
        super().__init__()
        s = b["stem_width"]
        self.conv1 = nn.Conv2d(3, s, 3, 2, 1, bias=False)
        self.bn1 = bn(s)
        self.conv2 = nn.Conv2d(s, s, 3, 2, 1, bias=False)
        self.bn2 = bn(s)
        layers, cin = [], s
        for _ in range(b["layer1_blocks"]):
            layers.append(Bottleneck(cin, b["layer1_planes"]))
            cin = b["layer1_planes"] * 4
        self.layer1 = nn.Sequential(*layers)
        pre = [cin]
        for st in range(3):
            cur = b["widths"][: st + 2]
            trans = nn.ModuleList()
            for i, c in enumerate(cur):
                if i < len(pre):
                    trans.append(conv_bn(pre[i], c, 3, 1, True) if pre[i] != c else None)
                else:
                    steps = i + 1 - len(pre)
                    trans.append(nn.Sequential(*[
                        conv_bn(pre[-1], c if j == steps - 1 else pre[-1], 3, 2, True) for j in range(steps)
                    ]))
            setattr(self, "transition%d" % (st + 1), trans)
            setattr(self, "stage%d" % (st + 2), nn.Sequential(*[HrModule(cur, b["blocks"][st]) for _ in range(b["modules"][st])]))
            pre = cur

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        ys = [self.layer1(x)]
        for st in range(3):
            trans = getattr(self, "transition%d" % (st + 1))
            xs = []
            for i, t in enumerate(trans):
                src = ys[i] if i < len(ys) else ys[-1]
                xs.append(t(src) if t is not None else src)
            ys = getattr(self, "stage%d" % (st + 2))(xs)
        h, w = ys[0].shape[-2:]
        return torch.cat([ys[0]] + [up(y, (h, w)) for y in ys[1:]], 1)


def bn_relu(c):
    return nn.Sequential(bn(c), nn.ReLU())


class ObjectAttention(nn.Module):
    def __init__(self, c, key):
        super().__init__()
        self.key = key
        self.f_pixel = nn.Sequential(nn.Conv2d(c, key, 1, bias=False), bn_relu(key), nn.Conv2d(key, key, 1, bias=False), bn_relu(key))
        self.f_object = nn.Sequential(nn.Conv2d(c, key, 1, bias=False), bn_relu(key), nn.Conv2d(key, key, 1, bias=False), bn_relu(key))
        self.f_down = nn.Sequential(nn.Conv2d(c, key, 1, bias=False), bn_relu(key))
        self.f_up = nn.Sequential(nn.Conv2d(key, c, 1, bias=False), bn_relu(c))

    def forward(self, x, proxy):
        n, _, h, w = x.shape
        q = self.f_pixel(x).view(n, self.key, -1).permute(0, 2, 1)
        k = self.f_object(proxy).view(n, self.key, -1)
        v = self.f_down(proxy).view(n, self.key, -1).permute(0, 2, 1)
        sim = F.softmax(torch.matmul(q, k) * self.key ** -0.5, dim=-1)
        ctx = torch.matmul(sim, v).permute(0, 2, 1).contiguous().view(n, self.key, h, w)
        return self.f_up(ctx)


class OCR(nn.Module):
    def __init__(self, high, mid, key, k):
        super().__init__()
        self.conv3x3_ocr = nn.Sequential(nn.Conv2d(high, mid, 3, 1, 1), bn_relu(mid))
        self.ocr_distri_head = nn.Module()
        self.ocr_distri_head.object_context_block = ObjectAttention(mid, key)
        self.ocr_distri_head.conv_bn_dropout = nn.Sequential(nn.Conv2d(2 * mid, mid, 1, bias=False), bn_relu(mid), nn.Dropout2d(0.05))
        self.cls_head = nn.Conv2d(mid, k, 1)
        self.aux_head = nn.Sequential(nn.Conv2d(high, high, 1), bn_relu(high), nn.Conv2d(high, k, 1))

    def forward(self, high):
        feats = self.conv3x3_ocr(high)
        aux = self.aux_head(high)
        n, k, h, w = aux.shape
        probs = F.softmax(aux.view(n, k, -1), dim=2)
        f = feats.view(n, feats.shape[1], -1).permute(0, 2, 1)
        proxy = torch.matmul(probs, f).permute(0, 2, 1).unsqueeze(3)
        ctx = self.ocr_distri_head.object_context_block(feats, proxy)
        y = self.ocr_distri_head.conv_bn_dropout(torch.cat([ctx, feats], 1))
        return self.cls_head(y), aux, y


class Net(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        b = cfg["backbone"]
        high, mid = sum(b["widths"]), cfg["ocr_mid_channels"]
        self.backbone = HRNetV2(b)
        self.ocr = OCR(high, mid, cfg["ocr_key_channels"], cfg["num_classes"])
        bot = cfg["attn_bottleneck"]
        n = len(cfg["scales"]) if cfg["fusion"] == "explicit" else 1
        self.scale_attn = nn.Module()
        self.scale_attn.conv0 = nn.Conv2d(mid * n, bot, 3, 1, 1, bias=False)
        self.scale_attn.bn0 = bn(bot)
        self.scale_attn.conv1 = nn.Conv2d(bot, bot, 3, 1, 1, bias=False)
        self.scale_attn.bn1 = bn(bot)
        self.scale_attn.conv2 = nn.Conv2d(bot, n, 1, bias=False)

    def attn(self, feats):
        a = self.scale_attn
        y = F.relu(a.bn0(a.conv0(feats)))
        y = F.relu(a.bn1(a.conv1(y)))
        return a.conv2(y)

    def fwd(self, x, with_attn=True, with_aux=True):
        cls, aux, feats = self.ocr(self.backbone(x))
        size = x.shape[-2:]
        a = up(torch.sigmoid(self.attn(feats)), size) if with_attn else None
        return up(cls, size), up(aux, size) if with_aux else None, a

    def features(self, x):
        """Logits and aux at the input size, and the OCR features."""
        cls, aux, feats = self.ocr(self.backbone(x))
        size = x.shape[-2:]
        return up(cls, size), up(aux, size), feats

    def explicit(self, x1, scales):
        """Explicit attention: features of every scale at the 1.0x feature
        size, concatenated; softmax across scales of the head's output
        weights the predictions brought to the 1.0x input size."""
        outs = [self.features(resize_x(x1, s) if s != 1.0 else x1) for s in sorted(scales, reverse=True)]
        size = x1.shape[-2:]
        fsize = [o for o, s in zip(outs, sorted(scales, reverse=True)) if s == 1.0][0][2].shape[-2:]
        logits = self.attn(torch.cat([up(f, fsize) for _, _, f in outs], 1))
        w = up(F.softmax(logits, 1), size)
        pred = sum(up(c, size) * w[:, i : i + 1] for i, (c, _, _) in enumerate(outs))
        aux = sum(up(a, size) * w[:, i : i + 1] for i, (_, a, _) in enumerate(outs))
        return pred, aux

    def hierarchical(self, x1, scales, with_aux=True):
        """The official `nscale_forward`; `with_aux=False` leaves out the aux
        fusion, as our inference does (only training reads it)."""
        pred = aux = None
        per = {}
        for s in sorted(scales, reverse=True):
            x = resize_x(x1, s) if s != 1.0 else x1
            cls, ax, a = self.fwd(x, pred is not None, with_aux)
            per[s] = (cls, ax, a)
            if pred is None:
                pred, aux = cls, ax
            elif s >= 1.0:
                pred = a * cls + (1 - a) * up(pred, cls.shape[-2:])
                if with_aux:
                    aux = a * ax + (1 - a) * up(aux, cls.shape[-2:])
            else:
                size = pred.shape[-2:]
                up_a = up(a, size)
                pred = up(a * cls, size) + (1 - up_a) * pred
                if with_aux:
                    aux = up(a * ax, size) + (1 - up_a) * aux
        return pred, aux, per


def build(cfg_path, weights=None):
    cfg = json.load(open(cfg_path))
    net = Net(cfg).eval()
    if weights is not None:
        w = load_safetensors(weights)
        sd = net.state_dict()
        missing = [k for k in sd if not k.endswith("num_batches_tracked") and k not in w]
        unexpected = [k for k in w if k not in sd]
        assert not missing and not unexpected, (missing[:5], unexpected[:5])
        net.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in w.items()}, strict=False)
    return cfg, net


def scale_as(x, y):
    """The official `scale_as`: `x` resized (bilinear, align_corners=False)
    to the spatial size of `y`."""
    return up(x, y.shape[-2:])


def official_train_step(net, x_1x, gts, lr, ocr_alpha=0.4, mscale_wt=0.05):
    """One training step as the official code runs it, literally:
    network/ocrnet.py `MscaleOCR.two_scale_forward` with `self.training`
    (`_fwd` on the 0.5x input first, then on the 1.0x input; `_fwd` runs
    `scale_attn` (sigmoid) on every pass, so its BatchNorm running
    statistics see both scales; each pass's outputs upsampled to its own
    input size), the loss with RMI off (`criterion` = CE, ignore 255, mean
    over labelled pixels), then `torch.optim.SGD` (momentum 0.9, weight
    decay 5e-4) over every parameter. The network is in train() mode (batch
    statistics, running statistics updated with momentum 0.1 and the
    unbiased variance) but for the OCR's Dropout2d, which is put in eval()
    mode: with dropout off both sides compute the same function.
    Returns (loss, main_loss, aux_loss)."""
    net.train()
    net.ocr.ocr_distri_head.conv_bn_dropout[2].eval()
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)

    def criterion(logits):
        return F.cross_entropy(logits, gts, ignore_index=255)

    def _fwd(x):
        cls_out, aux_out, attn = net.fwd(x, with_attn=True, with_aux=True)
        return {"cls_out": cls_out, "aux_out": aux_out, "logit_attn": attn}

    x_lo = resize_x(x_1x, 0.5)
    lo_outs = _fwd(x_lo)
    pred_05x = lo_outs["cls_out"]
    p_lo = pred_05x
    aux_lo = lo_outs["aux_out"]
    logit_attn = lo_outs["logit_attn"]

    hi_outs = _fwd(x_1x)
    pred_10x = hi_outs["cls_out"]
    p_1x = pred_10x
    aux_1x = hi_outs["aux_out"]

    p_lo = logit_attn * p_lo
    aux_lo = logit_attn * aux_lo
    p_lo = scale_as(p_lo, p_1x)
    aux_lo = scale_as(aux_lo, p_1x)
    logit_attn = scale_as(logit_attn, p_1x)

    joint_pred = p_lo + (1 - logit_attn) * p_1x
    joint_aux = aux_lo + (1 - logit_attn) * aux_1x

    aux_loss = criterion(joint_aux)
    main_loss = criterion(joint_pred)
    loss = ocr_alpha * aux_loss + main_loss
    scaled_pred_05x = scale_as(pred_05x, p_1x)
    loss_lo = criterion(scaled_pred_05x)
    loss_hi = criterion(pred_10x)
    loss = loss + mscale_wt * loss_lo
    loss = loss + mscale_wt * loss_hi

    opt.zero_grad(set_to_none=True)
    loss.backward()
    no_grad = [n for n, p in net.named_parameters() if p.grad is None]
    assert not no_grad, "parameters without a gradient: %s" % no_grad[:5]
    opt.step()
    return loss.detach(), main_loss.detach(), aux_loss.detach()


def state(net):
    """Every parameter and BatchNorm running statistic by state_dict name
    (num_batches_tracked, which we do not keep, left out)."""
    return {k: v.detach().numpy().copy() for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}


def trainstep(cfg_path, out, lr=0.01):
    cfg = json.load(open(cfg_path))
    assert cfg["fusion"] == "hierarchical" and sorted(cfg["scales"]) == [0.5, 1.0], "two_scale_forward: hierarchical on 0.5, 1.0"
    torch.manual_seed(0)
    net = Net(cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 64, generator=g)
    y = torch.randint(0, cfg["num_classes"], (2, 32, 64), generator=g)
    y[torch.rand(2, 32, 64, generator=g) < 0.1] = 255
    before = state(net)
    loss, main, aux = official_train_step(net, x, y, lr)
    after = state(net)
    tensors = {"image": x.numpy(), "labels": y.numpy().astype(np.uint32), "lr": np.array(lr, dtype=np.float64),
               "loss_total": loss.numpy().astype(np.float32), "loss_main": main.numpy().astype(np.float32),
               "loss_aux": aux.numpy().astype(np.float32)}
    tensors.update({"before." + k: v for k, v in before.items()})
    tensors.update({"after." + k: v for k, v in after.items()})
    save_safetensors(out, tensors, {"torch": torch.__version__, "config": json.dumps(cfg)})
    print("torch %s: loss %.6f (main %.6f, aux %.6f), %d state tensors, labelled pixels %d of %d; wrote %s"
          % (torch.__version__, loss, main, aux, len(after), int((y != 255).sum()), y.numel(), out))
    return 0


def randomize_bn(net, g):
    """BatchNorm away from the identity: random affine parameters and
    running statistics, so that inference exercises them."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))


def inference(cfg_path, out):
    """The fixture of tests/it/model.rs's parity test: a hierarchical network
    and an explicit one (torch.manual_seed(0), PyTorch's default
    initialisation, BatchNorm randomised), a seeded 1x3x36x60 input, and
    their eval-mode outputs: the single 1.0x forward (`single.pred`,
    `single.aux`), the hierarchical fusion (`nscale_forward`) on {0.5, 1},
    {0.5, 1, 2} and {0.25, 0.5, 1, 2} (`h2.pred`, `h3.pred`, `h4.pred`; fused
    aux left out as in our inference), the per-scale attention of {0.5, 1, 2}
    (`h3.attn_0.5`, `h3.attn_1.0`), and explicit attention on {0.5, 1, 2}
    (`explicit.pred`). Weights as `state.NAME` and `explicit.state.NAME`."""
    cfg = json.load(open(cfg_path))
    g = torch.Generator().manual_seed(2)
    torch.manual_seed(0)
    net = Net(dict(cfg, fusion="hierarchical", scales=[0.5, 1.0]))
    randomize_bn(net, g)
    torch.manual_seed(1)
    ex = Net(dict(cfg, fusion="explicit", scales=[0.5, 1.0, 2.0]))
    randomize_bn(ex, g)
    net.eval()
    ex.eval()
    x = torch.randn(1, 3, 36, 60, generator=g)
    t = {"image": x.numpy()}
    with torch.no_grad():
        cls, aux, _ = net.fwd(x, with_attn=False)
        t["single.pred"], t["single.aux"] = cls.numpy(), aux.numpy()
        for name, scales in [("h2", [0.5, 1.0]), ("h3", [0.5, 1.0, 2.0]), ("h4", [0.25, 0.5, 1.0, 2.0])]:
            pred, _, per = net.hierarchical(x, scales, with_aux=False)
            t[name + ".pred"] = pred.numpy()
            if name == "h3":
                t["h3.attn_0.5"] = per[0.5][2].numpy()
                t["h3.attn_1.0"] = per[1.0][2].numpy()
        t["explicit.pred"] = ex.explicit(x, [0.5, 1.0, 2.0])[0].numpy()
    t.update({"state." + k: v for k, v in state(net).items()})
    t.update({"explicit.state." + k: v for k, v in state(ex).items()})
    save_safetensors(out, {k: np.ascontiguousarray(v) for k, v in t.items()}, {"torch": torch.__version__, "config": json.dumps(cfg)})
    print("torch %s: %d tensors; wrote %s" % (torch.__version__, len(t), out))
    return 0


def pth(listing_path, out):
    """tests/data/torch_zip.pth and torch_legacy.pth: a checkpoint as
    torch.save writes it in the zip layout and in the legacy one
    (`_use_new_zipfile_serialization=False`, as PyTorch 1.3 wrote the
    official files),
    laid out like the official files ({"state_dict": {"module.NAME": ...},
    "epoch", "mIoU"}), whose tensors are views as real training leaves
    them: half the convolutions with kernels over 1x1 in channels-last
    storage, every third other tensor an offset into one shared storage,
    every third matrix transposed. Tensor t of the
    listing (`hmsa-lab model --config tests/data/tiny.toml`), element j in
    row-major order, holds float32(sin(0.1 t + 0.01 j)); num_batches_tracked
    are int64 scalars."""
    names = []
    for line in open(listing_path):
        parts = line.split()
        if len(parts) == 0 or line.startswith(("parameters", "GFLOPs")):
            continue
        shape = [int(d) for d in parts[1].split(",")] if len(parts) > 1 else []
        names.append((parts[0], shape))
    shared = torch.zeros(sum(int(np.prod(s)) if s else 1 for _, s in names) + 64)
    at = 64
    sd = collections.OrderedDict()
    for t, (name, shape) in enumerate(names):
        if name.endswith("num_batches_tracked"):
            sd["module." + name] = torch.tensor(t, dtype=torch.int64)
            continue
        n = int(np.prod(shape)) if shape else 1
        vals = torch.from_numpy(np.sin(0.1 * t + 0.01 * np.arange(n)).astype(np.float32)).view(shape)
        if len(shape) == 4 and shape[2] > 1 and (t // 6) % 2 == 0:
            # channels-last storage: strides (h*w*c, 1, w*c, c)
            view = vals.contiguous(memory_format=torch.channels_last)
        elif t % 3 == 0:
            view = shared[at : at + n].view(shape)
            view.copy_(vals)
            at += n
        elif t % 3 == 1 and len(shape) == 2:
            view = vals.t().contiguous().t()
        else:
            view = vals
        sd["module." + name] = view
    ckpt = {"state_dict": sd, "epoch": 3, "mIoU": 0.5}
    torch.save(ckpt, out)
    legacy = out.replace("_zip", "_legacy")
    torch.save(ckpt, legacy, _use_new_zipfile_serialization=False)
    strided = sum(1 for v in sd.values() if v.dim() > 1 and not v.is_contiguous())
    print("torch %s: %d tensors (%d non-contiguous); wrote %s (zip) and %s (legacy)" % (torch.__version__, len(sd), strided, out, legacy))
    return 0


def parity(weights, inp, dump, cfg_path):
    cfg, net = build(cfg_path, weights)
    x = torch.from_numpy(load_safetensors(inp)["image"].copy())
    d = load_safetensors(dump)
    with torch.no_grad():
        pred, aux, per = net.hierarchical(x, [0.5, 1.0, 2.0])
    worst = 0.0
    # every tensor must be in the dump, but for the fused aux (our inference
    # fuses none: nothing reads it) and the top scale's attention (never
    # computed: the recurrence does not read it)
    checks = [("pred", pred)]
    for i, (s, (cls, ax, a)) in enumerate(sorted(per.items(), reverse=True)):
        key = ("%.1f" % s) if float(s).is_integer() else str(s)
        checks += [("pred_" + key, cls), ("aux_" + key, ax)] + ([("attn_" + key, a)] if i > 0 else [])
    missing = [name for name, _ in checks if name not in d]
    assert not missing, "not in the dump: %s" % missing
    for name, t in checks:
        ref = d[name]
        diff = float(np.abs(ref - t.numpy()).max())
        scale = float(np.abs(ref).max())
        worst = max(worst, diff / max(scale, 1e-6))
        print("%-10s shape %-18s max|ours - torch| %.3e (max|value| %.3e)" % (name, tuple(ref.shape), diff, scale))
    print("worst relative difference: %.3e" % worst)
    return 0 if worst < 1e-3 else 1


def bench(cfg_path, threads, h, w, scales, fusion):
    torch.set_num_threads(int(threads))
    cfg, net = build(cfg_path)
    x = torch.randn(1, 3, int(h), int(w))
    scales = [float(s) for s in scales.split(",")]
    with torch.no_grad():
        def run():
            # the prediction only, as our inference (no aux fusion)
            if fusion == "hierarchical":
                net.hierarchical(x, scales, with_aux=False)
            else:
                probs = []
                for s in scales:
                    cls, _, _ = net.fwd(resize_x(x, s) if s != 1.0 else x, False, False)
                    probs.append(F.softmax(up(cls, x.shape[-2:]), 1))
                torch.stack(probs).mean(0).log()
        run()
        times = []
        for _ in range(5):
            t = time.perf_counter()
            run()
            times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    print("torch %s threads=%s %sx%s %s %s: min %.1f ms, median %.1f ms" % (torch.__version__, threads, h, w, fusion, scales, times[0], times[len(times) // 2]))
    return times[0]


def train_step(cfg_path, batch, h, w, scales, fusion, dev=None, ctx=contextlib.nullcontext):
    """One training step as `hmsa-lab bench train` times it: the fusion's
    train-mode forward (under `ctx`, e.g. autocast), CE + 0.4 aux CE in
    f32 at the input size, backward, SGD with momentum and weight decay,
    on random images and zero labels."""
    cfg = json.load(open(cfg_path))
    cfg["fusion"], cfg["scales"] = fusion, scales
    torch.manual_seed(0)
    net = Net(cfg).train().to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch, 3, h, w, device=dev)
    y = torch.zeros(batch, h, w, dtype=torch.long, device=dev)

    def step():
        with ctx():
            if fusion == "hierarchical":
                pred, aux, _ = net.hierarchical(x, scales)
            elif fusion == "explicit":
                pred, aux = net.explicit(x, scales)
            else:
                pred, aux, _ = net.fwd(x, False)
            loss = F.cross_entropy(pred.float(), y, ignore_index=255) + 0.4 * F.cross_entropy(aux.float(), y, ignore_index=255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def train(cfg_path, threads, batch, h, w, scales, fusion):
    torch.set_num_threads(int(threads))
    scales = [float(s) for s in scales.split(",")]
    step = train_step(cfg_path, int(batch), int(h), int(w), scales, fusion)
    step()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        step()
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    print("torch %s threads=%s train batch %s %sx%s %s %s: min %.1f ms, median %.1f ms" % (torch.__version__, threads, batch, h, w, fusion, scales, times[0], times[len(times) // 2]))
    return times[0]


def compare(binary, threads):
    """Inference (batch 1) and training steps (batch 4, 128x256) on both
    sides; the configs in tools/configs are the presets (a test checks)."""
    import os
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    cfg = lambda p: os.path.join(here, "configs", p + ".json")
    cases = [
        ("infer", "small", "single", "1.0", (256, 512)),
        ("infer", "small", "hierarchical", "0.5,1.0", (256, 512)),
        ("infer", "small", "hierarchical", "0.5,1.0,2.0", (256, 512)),
        ("infer", "small", "average", "0.5,1.0,2.0", (256, 512)),
        ("infer", "w48", "single", "1.0", (512, 1024)),
        ("train", "small", "single", "1.0", (128, 256)),
        ("train", "small", "hierarchical", "0.5,1.0", (128, 256)),
        ("train", "small", "explicit", "0.5,1.0,2.0", (128, 256)),
    ]
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    best = {}
    for _ in range(2):
        for kind, preset, fusion, scales, (h, w) in cases:
            key = (kind, preset, fusion, scales, h, w)
            sc = [float(v) for v in scales.split(",")]
            reps = 1 if preset == "w48" else 5
            if kind == "infer":
                t = bench(cfg(preset), threads, h, w, scales, fusion)
                case = {"Forward": {"preset": preset, "fusion": fusion, "scales": sc, "size": [h, w], "reps": reps}}
            else:
                t = train(cfg(preset), threads, 4, h, w, scales, fusion)
                case = {"TrainStep": {"preset": preset, "fusion": fusion, "scales": sc, "crop": [h, w], "batch": 4, "reps": 3}}
            # PyTorch's OpenMP workers spin for a while after its last
            # parallel region: let them sleep before timing the other side
            time.sleep(1.0)
            out = subprocess.run([binary, "bench", "--case", json.dumps(case)], env=env, check=True, capture_output=True, text=True)
            ours = json.loads(out.stdout.strip().splitlines()[-1])["min_ms"]
            old = best.get(key, (float("inf"), float("inf")))
            best[key] = (min(old[0], t), min(old[1], ours))
    print("| step | preset | fusion | scales | size | PyTorch %s ms | hmsa-lab ms | ratio |" % torch.__version__)
    print("|---|---|---|---|---|---|---|---|")
    for (kind, preset, fusion, scales, h, w), (t, o) in best.items():
        print("| %s | %s | %s | %s | %dx%d | %.1f | %.1f | %.2fx |" % (kind, preset, fusion, scales, h, w, t, o, o / t))
    return 0


def gpu(precision, device="cuda"):
    """W48 on CUDA: inference as `bench model --full`, training steps as
    `bench train --full` (batch 1, 512x1024). `device` cpu runs the same
    cases on the CPU (slow; a check of this function)."""
    import os

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dtype = {"f32": None, "bf16": torch.bfloat16}[precision]
    here = os.path.dirname(os.path.abspath(__file__))
    cfg_path = os.path.join(here, "configs", "w48.json")

    def timed(f):
        f()
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            f()
            sync()
            times.append((time.perf_counter() - t) * 1e3)
        return min(times), (torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan"))

    def ctx():
        if dtype is None:
            return torch.autocast(dev.type, enabled=False)
        return torch.autocast(dev.type, dtype=dtype)

    rows = []
    for fusion, scales, (h, w) in [("single", [1.0], (512, 1024)), ("hierarchical", [0.5, 1.0, 2.0], (512, 1024)), ("hierarchical", [0.5, 1.0, 2.0], (1024, 2048))]:
        _, net = build(cfg_path)
        net = net.to(dev)
        x = torch.randn(1, 3, h, w, device=dev)

        def run():
            with torch.no_grad(), ctx():
                if fusion == "hierarchical":
                    net.hierarchical(x, scales, with_aux=False)
                else:
                    net.fwd(x, False, False)

        rows.append(("infer", fusion, scales, (h, w)) + timed(run))
        del net
    for fusion, scales in [("single", [1.0]), ("hierarchical", [0.5, 1.0]), ("explicit", [0.5, 1.0, 2.0])]:
        step = train_step(cfg_path, 1, 512, 1024, scales, fusion, dev, ctx)
        rows.append(("train", fusion, scales, (512, 1024)) + timed(step))
        del step
        if cuda:
            torch.cuda.empty_cache()
    print("| step | fusion | scales | size | PyTorch %s %s ms | peak MiB |" % (torch.__version__, precision))
    print("|---|---|---|---|---|---|")
    for kind, fusion, scales, (h, w), t, m in rows:
        print("| %s | %s | %s | %dx%d | %.1f | %.0f |" % (kind, fusion, ",".join(str(v) for v in scales), h, w, t, m))
    return 0


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "parity":
        sys.exit(parity(*sys.argv[2:6]))
    elif cmd == "bench":
        bench(*sys.argv[2:8])
    elif cmd == "train":
        train(*sys.argv[2:9])
    elif cmd == "compare":
        sys.exit(compare(sys.argv[2], int(sys.argv[3])))
    elif cmd == "gpu":
        sys.exit(gpu(*sys.argv[2:4]))
    elif cmd == "pth":
        sys.exit(pth(*sys.argv[2:4]))
    elif cmd == "inference":
        sys.exit(inference(*sys.argv[2:4]))
    elif cmd == "trainstep":
        sys.exit(trainstep(*sys.argv[2:4]))
    else:
        print(__doc__)
        sys.exit(2)
