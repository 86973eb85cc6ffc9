#!/usr/bin/env bash
# Redraws the pictures in docs/ that come from short runs, each with the command the README shows
# beside it (the long reproduction runs' curves are drawn by `vae curves --run DIR` from those
# runs; see docs/reproductions.md). Trains what it needs into a scratch folder (default: a new
# temporary one; about 5 minutes on 2 cores), never into runs/.
#
#     scripts/docs-pictures.sh [SCRATCH]
#
# Needs target/release/vae (cargo build --release), python3 for the colour data, and for the
# explorer's screenshot Chromium (apt-get install -y chromium; skipped without it).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
vae="${VAE_BIN:-$repo/target/release/vae}"
scratch="${1:-$(mktemp -d)}"
docs="$repo/docs"
mkdir -p "$scratch"
cd "$scratch"
ln -sfn "$repo/data" data
echo "scratch: $scratch"

train() { # CONFIG RUN [--set ...]
  local cfg="$1" run="$2"; shift 2
  [ -f "runs/$run/state.json" ] || "$vae" train --config "$repo/configs/$cfg" --run "runs/$run" -q "$@" >/dev/null
}
train mnist.toml mnist
train mnist-2d.toml mnist-2d
train mnist-ae.toml mnist-ae

"$vae" sample -n 64 --scale 2 --run runs/mnist -o "$docs/sample.png"
"$vae" manifold --dim 2 --run runs/mnist-2d -o "$docs/manifold-2d.png"
"$vae" scatter --run runs/mnist-2d -o "$docs/scatter-2d.png"
"$vae" reconstruct --scale 2 --run runs/mnist -o "$docs/reconstruction.png"
"$vae" interpolate --from 3 --to 2 --slerp --scale 2 --run runs/mnist -o "$docs/interpolation.png"
"$vae" curves --run runs/mnist -o "$docs/curves.png"
"$vae" sample -n 64 --scale 2 --run runs/mnist-ae -o "$docs/ae-sample.png"
"$vae" scatter --run runs/mnist-ae -o "$docs/ae-scatter.png"

# Colour MNIST (docs/own-data.md): the reference recipe on 2,352 inputs.
[ -f "$repo/data/colour-mnist.npz" ] || python3 "$repo/scripts/colour-mnist.py"
train mnist.toml colour-mnist --set "data.dir=$repo/data/colour-mnist.npz" --set name=colour-mnist
"$vae" sample -n 64 --scale 2 --run runs/colour-mnist -o "$docs/colour-sample.png"
"$vae" reconstruct --scale 2 --run runs/colour-mnist -o "$docs/colour-reconstruction.png"

# The explorer on the 2-D run, with a drag from (-1.2, 0.4) to (1.3, -0.8) drawn by its own
# pointer events (the page's #probe hook), screenshot by headless Chromium.
if command -v chromium >/dev/null; then
  "$vae" explore --run runs/mnist-2d -o explore.html
  probe='%7B%22drag%22%3A%5B%5B-1.2%2C0.4%5D%2C%5B1.3%2C-0.8%5D%5D%7D'
  chromium --headless --no-sandbox --disable-gpu --user-data-dir="$scratch/chromium" \
    --hide-scrollbars --window-size=1100,760 --screenshot="$docs/explore.png" \
    "file://$scratch/explore.html#probe=$probe" 2>/dev/null
else
  echo "no chromium: docs/explore.png left as it is"
fi
echo "docs pictures redrawn from $scratch"
