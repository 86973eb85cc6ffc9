#!/usr/bin/env python3
"""The PyTorch side of benches/compare-pytorch.sh: the networks and recipes of the README's speed
table, written the way a PyTorch user would write them (torch.nn modules, autograd, torch.optim),
so that the table reruns from a clone.

Install once (PyTorch from PyPI; it runs on the CPU, the wheel brings CUDA libraries too, ~5 GB):

    python3 -m venv ~/.venvs/torch && ~/.venvs/torch/bin/pip install torch

Run (what compare-pytorch.sh does for each variant):

    ~/.venvs/torch/bin/python benches/torch_vae.py --data data/mnist --epochs 10

Recipes (flags as the peer script of the project's bench folder takes them):
- default: pytorch/examples' vae/main.py, 784-400-20-400-784 ReLU, Bernoulli decoder, summed BCE
  plus the closed-form KL, Adam 1e-3, batch 128, grey pixels in [0, 1].
- `--hidden 200,200 --latent 50 --act tanh --batch 20 --binarize dynamic`: Burda et al.'s one
  stochastic layer (the decoder mirrors the encoder's widths).
- `--latent 100,50 --hidden 200,200:100,100 --act tanh`: two stochastic layers, Burda et al.'s
  chain: q(z1|x) q(z2|z1), p(z2) = N(0, I), p(z1|z2), p(x|z1); ':' separates the two layers' MLPs.
- `--arch conv --channels 32,64 --dense 256 --latent 32`: 4x4 stride-2 convolutions (padding 1,
  28 -> 14 -> 7), a dense layer, the heads; the decoder mirrors it with transposed convolutions.
- `--k K --objective mc|iwae`: K samples of z per image, averaged (mc) or importance-weighted
  (Burda et al. 2015); `--bf16`: the training forward under torch.autocast(bfloat16).
- `--iw K [--iw-limit N]`: at the end, -log p(x) by K importance samples on the test images.
- `--optimizer adamax`: torch.optim.Adamax instead of Adam (`train.optimizer = "adamax"`).
- `--ema D`: evaluate a moving average of the weights (`train.ema = D`).

Output, one line per epoch (compare-pytorch.sh reads fields 2, 4 and 8):

    epoch E train_s SECONDS train_nelbo NATS test_nelbo NATS

The test -ELBO draws one z per image. Losses are in nats per image.
"""

import argparse
import gzip
import math
import struct
import time

import torch
from torch import nn
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)


# ---------------------------------------------------------------- data

def read_idx(path):
    """An IDX file (.gz or raw) as a uint8 tensor of its shape."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8).reshape(shape)


def load_split(folder, prefix):
    for suffix in (".gz", ""):
        try:
            return read_idx(f"{folder}/{prefix}-images-idx3-ubyte{suffix}")
        except FileNotFoundError:
            continue
    raise SystemExit(f"error: no {prefix}-images-idx3-ubyte(.gz) in {folder}")


# ---------------------------------------------------------------- networks

def mlp(widths, act, last_act):
    """Linear layers through `widths`, `act` after each but (unless last_act) the last."""
    layers = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(a, b))
        if last_act or i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


class Gaussian(nn.Module):
    """An MLP to the mean and log-variance of a diagonal Gaussian: two heads (pytorch/examples'
    fc21 / fc22), or with joint=True one head of both, split (fewer small ops at batch 20)."""

    def __init__(self, widths, out, act, joint=False):
        super().__init__()
        self.body = mlp(widths, act, last_act=True)
        if joint:
            self.head = nn.Linear(widths[-1], 2 * out)
        else:
            self.mu = nn.Linear(widths[-1], out)
            self.logvar = nn.Linear(widths[-1], out)
        self.joint = joint

    def forward(self, h):
        h = self.body(h)
        if self.joint:
            return self.head(h).chunk(2, -1)
        return self.mu(h), self.logvar(h)


def log_normal(z, mu, logvar):
    """log N(z; mu, exp(logvar)) summed over the last dimension."""
    return -0.5 * (LOG_2PI + logvar + (z - mu) ** 2 * torch.exp(-logvar)).sum(-1)


def log_std_normal(z):
    return -0.5 * (LOG_2PI + z ** 2).sum(-1)


def bernoulli_ll(logits, x):
    """log p(x|z) of Bernoulli logits, summed over pixels: x l - softplus(l)."""
    return -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").flatten(2).sum(-1)


class ConvEncoder(nn.Module):
    def __init__(self, channels, dense, latent):
        super().__init__()
        layers, c = [], 1
        for co in channels:
            layers += [nn.Conv2d(c, co, 4, 2, 1), nn.ReLU()]
            c = co
        self.convs = nn.Sequential(*layers)
        side = 28 // 2 ** len(channels)
        self.feat = c * side * side
        self.head = Gaussian([self.feat, dense], latent, nn.ReLU)

    def forward(self, x):
        return self.head(self.convs(x.view(-1, 1, 28, 28)).flatten(1))


class ConvDecoder(nn.Module):
    def __init__(self, channels, dense, latent):
        super().__init__()
        side = 28 // 2 ** len(channels)
        self.shape = (channels[-1], side, side)
        layers = []
        rev = channels[::-1] + [1]
        for i, (a, b) in enumerate(zip(rev, rev[1:])):
            layers.append(nn.ConvTranspose2d(a, b, 4, 2, 1))
            if i < len(rev) - 2:
                layers.append(nn.ReLU())
        # Made before the dense layers: the order the generator draws the initial weights in.
        self.deconvs = nn.Sequential(*layers)
        self.dense = mlp([latent, dense, channels[-1] * side * side], nn.ReLU, last_act=True)

    def forward(self, z):
        lead = z.shape[:-1]
        h = self.dense(z).view(-1, *self.shape)
        return self.deconvs(h).view(*lead, 784)


class OneLayerVae(nn.Module):
    """q(z|x) = N(mu, sigma^2), p(z) = N(0, I), p(x|z) Bernoulli: MLP or conv networks."""

    def __init__(self, a, act):
        super().__init__()
        z = a.latents[0]
        if a.arch == "conv":
            ch = [int(c) for c in (a.channels or "32,64").split(",")]
            dense = a.dense or 256
            self.enc = ConvEncoder(ch, dense, z)
            self.dec = ConvDecoder(ch, dense, z)
        else:
            h = a.widths[0]
            self.enc = Gaussian([784] + h, z, act)
            self.dec = mlp([z] + h[::-1] + [784], act, last_act=False)

    def log_weights(self, x, k):
        """(k, B) one-sample terms: log p(x|z) and log p(z) - log q(z|x), and the closed-form KL (B)."""
        mu, logvar = self.enc(x)
        eps = torch.randn((k,) + mu.shape, dtype=mu.dtype)
        z = mu + (0.5 * logvar).exp() * eps
        ll = bernoulli_ll(self.dec(z).float(), x)
        mu, logvar, z = mu.float(), logvar.float(), z.float()
        prior_minus_q = log_std_normal(z) - log_normal(z, mu, logvar)
        kl = 0.5 * (mu ** 2 + logvar.exp() - logvar - 1).sum(-1)
        return ll, prior_minus_q, kl


class TwoLayerVae(nn.Module):
    """Burda et al.'s two stochastic layers: q(z1|x) q(z2|z1), p(z2) p(z1|z2) p(x|z1)."""

    def __init__(self, a, act):
        super().__init__()
        (z1, z2), (h1, h2) = a.latents, a.widths
        self.q1 = Gaussian([784] + h1, z1, act, joint=True)
        self.q2 = Gaussian([z1] + h2, z2, act, joint=True)
        self.p1 = Gaussian([z2] + h2[::-1], z1, act, joint=True)
        self.px = mlp([z1] + h1[::-1] + [784], act, last_act=False)

    def log_weights(self, x, k):
        mu1, lv1 = self.q1(x)
        z1 = mu1 + (0.5 * lv1).exp() * torch.randn((k,) + mu1.shape, dtype=mu1.dtype)
        mu2, lv2 = self.q2(z1)
        z2 = mu2 + (0.5 * lv2).exp() * torch.randn(mu2.shape, dtype=mu2.dtype)
        pm, plv = self.p1(z2)
        ll = bernoulli_ll(self.px(z1).float(), x)
        if z1.dtype != torch.float32:  # under autocast: the densities in f32
            z1, mu1, lv1, z2, mu2, lv2, pm, plv = (
                u.float() for u in (z1, mu1, lv1, z2, mu2, lv2, pm, plv))
        prior_minus_q = (log_std_normal(z2) + log_normal(z1, pm, plv)
                         - log_normal(z1, mu1, lv1) - log_normal(z2, mu2, lv2))
        return ll, prior_minus_q, None


def objective(model, x, k, kind):
    """The batch's summed -ELBO (mc: the K-sample average; iwae: the importance-weighted bound)."""
    ll, pmq, kl = model.log_weights(x, k)
    if kind == "iwae" and k > 1:
        bound = torch.logsumexp(ll + pmq, 0) - math.log(k)
    elif kl is not None:
        bound = ll.mean(0) - kl  # closed-form KL where the model has one, as pytorch/examples
    else:
        bound = (ll + pmq).mean(0)
    return -bound.sum()


# ---------------------------------------------------------------- the run

def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="folder of MNIST's IDX files")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--latent", default="20", help="z size; 100,50 for two stochastic layers")
    ap.add_argument("--hidden", default="400", help="widths, e.g. 200,200; two layers: 200,200:100,100")
    ap.add_argument("--act", default="relu", choices=["relu", "tanh"])
    ap.add_argument("--arch", default="mlp", choices=["mlp", "conv"])
    ap.add_argument("--channels", help="conv: channels per stride-2 layer (default 32,64)")
    ap.add_argument("--dense", type=int, help="conv: the dense layer's width (default 256)")
    ap.add_argument("--k", type=int, default=1, help="samples of z per training image")
    ap.add_argument("--objective", default="mc", choices=["mc", "iwae"])
    ap.add_argument("--binarize", default="none", choices=["none", "dynamic"])
    ap.add_argument("--bf16", action="store_true", help="training forward under torch.autocast(bfloat16)")
    ap.add_argument("--optimizer", default="adam", choices=["adam", "adamax"])
    ap.add_argument("--ema", type=float, default=0.0, help="evaluate a moving average of the weights, decay D")
    ap.add_argument("--iw", type=int, default=0, help="importance samples for a final -log p(x)")
    ap.add_argument("--iw-limit", type=int, default=0, help="--iw on the first N test images (0: all)")
    ap.add_argument("--limit", type=int, default=0, help="train on the first N images (0: all)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    a.latents = [int(v) for v in a.latent.split(",")]
    a.widths = [[int(v) for v in part.split(",")] for part in a.hidden.split(":")]
    if len(a.latents) != len(a.widths) or len(a.latents) > 2:
        ap.error("--latent and --hidden: one list of widths per stochastic layer (at most two)")
    if len(a.latents) == 2 and a.arch != "mlp":
        ap.error("two stochastic layers are MLPs here")
    return a


def main():
    a = parse()
    torch.manual_seed(a.seed)
    if a.threads:
        torch.set_num_threads(a.threads)
    act = {"relu": nn.ReLU, "tanh": nn.Tanh}[a.act]
    model = (TwoLayerVae if len(a.latents) == 2 else OneLayerVae)(a, act)
    opt = {"adam": torch.optim.Adam, "adamax": torch.optim.Adamax}[a.optimizer](model.parameters(), lr=a.lr)

    xtr = load_split(a.data, "train").reshape(-1, 784)
    xte = load_split(a.data, "t10k").reshape(-1, 784)
    if a.limit:
        xtr = xtr[:a.limit]
    xtr = xtr.float() / 255
    xte = xte.float() / 255
    if a.binarize == "dynamic":
        # The test set binarized once, from its own generator, so every epoch scores the same bits.
        xte = torch.bernoulli(xte, generator=torch.Generator().manual_seed(a.seed + 1))

    # train.ema: e = D e + (1 - D) w after every step, from the initial weights; the evaluations
    # run on the average (swapped in and out).
    ema = [p.detach().clone() for p in model.parameters()] if a.ema else None

    def swap():
        if ema:
            with torch.no_grad():
                for e, p in zip(ema, model.parameters()):
                    t = p.detach().clone()
                    p.copy_(e)
                    e.copy_(t)

    def test_nelbo():
        swap()
        model.eval()
        total = 0.0
        with torch.no_grad():
            for i in range(0, len(xte), 1000):
                total += objective(model, xte[i:i + 1000], 1, "mc").item()
        model.train()
        swap()
        return total / len(xte)

    n = len(xtr)
    for epoch in range(1, a.epochs + 1):
        t0 = time.perf_counter()
        total = 0.0
        for idx in torch.randperm(n).split(a.batch):
            x = xtr[idx]
            if a.binarize == "dynamic":
                x = torch.bernoulli(x)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):
                loss = objective(model, x, a.k, a.objective)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema:
                with torch.no_grad():
                    for e, p in zip(ema, model.parameters()):
                        e.lerp_(p, 1 - a.ema)
            total += loss.item()
        dt = time.perf_counter() - t0
        print(f"epoch {epoch} train_s {dt:.2f} train_nelbo {total / n:.2f} test_nelbo {test_nelbo():.2f}", flush=True)

    if a.iw:
        swap()
        t0 = time.perf_counter()
        x = xte[:a.iw_limit] if a.iw_limit else xte
        model.eval()
        nll = elbo = 0.0
        chunk = max(1, 50_000 // a.iw)  # images per pass: about 50,000 samples at a time
        with torch.no_grad():
            for i in range(0, len(x), chunk):
                xb = x[i:i + chunk]
                ll, pmq, _ = model.log_weights(xb, a.iw)
                w = ll + pmq  # (K, B)
                nll -= (torch.logsumexp(w, 0) - math.log(a.iw)).sum().item()
                elbo -= w.mean(0).sum().item()
        print(f"iw K={a.iw}: test NLL {nll / len(x):.2f}  (-ELBO, K-sample mean {elbo / len(x):.2f})  "
              f"{time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
