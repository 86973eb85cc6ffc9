#!/usr/bin/env bash
# The colour worked example of docs/own-data.md: an MLP against a conv network on colour MNIST
# resized to 32x32 (scripts/colour-mnist.py's data), the same latent size (32), recipe and 5
# epochs, then both models' samples and reconstructions side by side in docs/colour-mlp-conv.png.
# Trains into a scratch folder (default: a new temporary one; about 10 minutes on 2 cores).
#
#     scripts/colour-conv-example.sh [SCRATCH]
#
# Needs target/release/vae, and python3 with Pillow for the composite picture.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
vae="${VAE_BIN:-$repo/target/release/vae}"
scratch="${1:-$(mktemp -d)}"
mkdir -p "$scratch"
cd "$scratch"
[ -f "$repo/data/colour-mnist.npz" ] || python3 "$repo/scripts/colour-mnist.py"
D=(--set "data.dir=$repo/data/colour-mnist.npz" --set 'data.resize=[32,32]' --set model.latent=32
  --set train.epochs=5 --set out_dir=runs)
[ -f runs/colour-mlp/state.json ] || "$vae" train -q --config mnist.toml "${D[@]}" --set name=colour-mlp
[ -f runs/colour-conv/state.json ] || "$vae" train -q --config mnist.toml "${D[@]}" --set name=colour-conv \
  --set 'model.arch="conv"' --set 'model.hidden=[256]'
for m in mlp conv; do
  "$vae" sample -n 36 --scale 2 --run "runs/colour-$m" -o "$m-sample.png"
  "$vae" reconstruct -n 8 --scale 2 --run "runs/colour-$m" -o "$m-reconstruction.png"
done
python3 - "$repo/docs/colour-mlp-conv.png" <<'PY'
import sys
from PIL import Image, ImageDraw
cols = []
for m, title in [("mlp", "MLP (hidden 400, z = 32)"), ("conv", "conv (32-64 channels, dense 256, z = 32)")]:
    s, r = Image.open(f"{m}-sample.png").convert("RGB"), Image.open(f"{m}-reconstruction.png").convert("RGB")
    w = max(s.width, r.width)
    c = Image.new("RGB", (w, 24 + s.height + 12 + r.height), "white")
    ImageDraw.Draw(c).text((4, 6), title, fill="black")
    c.paste(s, (0, 24))
    c.paste(r, (0, 36 + s.height))
    cols.append(c)
out = Image.new("RGB", (sum(c.width for c in cols) + 16, max(c.height for c in cols)), "white")
x = 0
for c in cols:
    out.paste(c, (x, 0))
    x += c.width + 16
out.save(sys.argv[1])
print("wrote", sys.argv[1])
PY
