#!/usr/bin/env bash
# Side by side: this binary and the PyTorch reference (benches/torch_vae.py, its install line at
# its top) on the same data and recipe, alternating whole runs, on the CPU. Prints seconds per epoch of training for each,
# their ratio, both test -ELBO per epoch, and each side's peak resident memory.
#
#   benches/compare-pytorch.sh [EPOCHS] [ROUNDS] [VARIANT]   (default 10 epochs, 2 rounds, ref)
#
# VARIANT: ref (the pytorch/examples recipe), iwae5, iwae50, mc5 (K = 5 or 50 samples per image,
# importance-weighted or averaged), burda (784-200-200-50 tanh, batch 20, dynamic binarization),
# burda-iwae5 (the same with IWAE k = 5), burda2 and burda2-iwae5 (Burda et al.'s two stochastic
# layers, 784-200-200-100 and 100-100-100-50 tanh, chain wiring, batch 20, dynamic binarization;
# k = 1 and IWAE k = 5), conv (the peer's conv network: 4x4 stride-2 convolutions of 32 and 64
# channels, a dense layer of 256, z = 32, ReLU, batch 128, grey pixels as the reference recipe).
# PYTHON names an interpreter with torch (default: python3); PEER another PyTorch script taking the
# same flags (default benches/torch_vae.py); VAE_BIN a built vae binary to time instead of
# building target/release/vae.
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${1:-10}
ROUNDS=${2:-2}
VARIANT=${3:-ref}
PY=${PYTHON:-python3}
PEER=${PEER:-benches/torch_vae.py}
BURDA_VAE=(--set 'model.hidden=[200,200]' --set model.latent=50 --set model.activation=tanh
  --set train.batch_size=20 --set data.binarize=dynamic)
BURDA_PEER=(--hidden 200,200 --latent 50 --act tanh --batch 20 --binarize dynamic)
BURDA2_VAE=(--set 'model.latent=[100,50]' --set 'model.hidden=[[200,200],[100,100]]'
  --set model.activation=tanh --set train.batch_size=20 --set data.binarize=dynamic)
BURDA2_PEER=(--latent 100,50 --hidden 200,200:100,100 --act tanh --batch 20 --binarize dynamic)
case "$VARIANT" in
  ref) VAE=(); TORCH=() ;;
  iwae5) VAE=(--set train.iw_samples=5); TORCH=(--k 5 --objective iwae) ;;
  iwae50) VAE=(--set train.iw_samples=50); TORCH=(--k 50 --objective iwae) ;;
  mc5) VAE=(--set train.mc_samples=5); TORCH=(--k 5 --objective mc) ;;
  burda) VAE=("${BURDA_VAE[@]}"); TORCH=("${BURDA_PEER[@]}") ;;
  burda-iwae5) VAE=("${BURDA_VAE[@]}" --set train.iw_samples=5); TORCH=("${BURDA_PEER[@]}" --k 5 --objective iwae) ;;
  burda2) VAE=("${BURDA2_VAE[@]}"); TORCH=("${BURDA2_PEER[@]}") ;;
  burda2-iwae5) VAE=("${BURDA2_VAE[@]}" --set train.iw_samples=5); TORCH=("${BURDA2_PEER[@]}" --k 5 --objective iwae) ;;
  conv) VAE=(--set 'model.arch="conv"' --set 'model.conv=[[32,4,2],[64,4,2]]' --set 'model.hidden=[256]' --set model.latent=32)
    TORCH=(--arch conv --channels 32,64 --dense 256 --latent 32) ;;
  *) echo "error: unknown variant $VARIANT (ref, iwae5, iwae50, mc5, burda, burda-iwae5, burda2, burda2-iwae5, conv)" >&2; exit 2 ;;
esac
"$PY" -c 'import torch' 2>/dev/null || { echo "error: $PY has no torch; install it (python3 -m venv ~/.venvs/torch && ~/.venvs/torch/bin/pip install torch) and set PYTHON=~/.venvs/torch/bin/python" >&2; exit 1; }
[ -f "$PEER" ] || { echo "error: no peer script at $PEER; set PEER" >&2; exit 1; }
# VAE_BIN names a built binary to time (default: build target/release/vae now).
if [ -z "${VAE_BIN:-}" ]; then cargo build --release -q; VAE_BIN=target/release/vae; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for r in $(seq 1 "$ROUNDS"); do
  echo "round $r/$ROUNDS: vae $VARIANT" >&2
  /usr/bin/time -f '%M' -o "$tmp/vae-$r.rss" "$VAE_BIN" train -q --config mnist.toml \
    --set train.epochs="$EPOCHS" "${VAE[@]}" --run "$tmp/vae-$r" > "$tmp/vae-$r.log"
  echo "round $r/$ROUNDS: pytorch $VARIANT" >&2
  /usr/bin/time -f '%M' -o "$tmp/torch-$r.rss" "$PY" "$PEER" --data data/mnist \
    --epochs "$EPOCHS" "${TORCH[@]}" > "$tmp/torch-$r.log"
done
python3 - "$tmp" "$ROUNDS" "$EPOCHS" "$VARIANT" <<'PY'
import sys, csv, statistics as st
tmp, rounds, epochs, variant = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
vs, vt, ts, tt = {}, {}, {}, {}
for r in range(1, rounds + 1):
    for row in csv.DictReader(open(f"{tmp}/vae-{r}/metrics.csv")):
        e = int(row["epoch"])
        if e > 0:
            vs.setdefault(e, []).append(float(row["train_seconds"]))
            vt.setdefault(e, []).append(float(row["test_nelbo"]))
    for line in open(f"{tmp}/torch-{r}.log"):
        f = line.split()
        if f and f[0] == "epoch":
            e = int(f[1])
            ts.setdefault(e, []).append(float(f[3]))
            tt.setdefault(e, []).append(float(f[7]))
rss = lambda who: max(int(open(f"{tmp}/{who}-{r}.rss").read().split()[-1]) for r in range(1, rounds + 1)) / 1024
print(f"variant {variant}")
print(f"{'epoch':>5} {'vae s':>7} {'torch s':>8} {'ratio':>6} {'vae test -ELBO':>15} {'torch test -ELBO':>17}")
for e in range(1, epochs + 1):
    a, b = st.mean(vs[e]), st.mean(ts[e])
    print(f"{e:>5} {a:7.2f} {b:8.2f} {b / a:6.2f} {st.mean(vt[e]):15.2f} {st.mean(tt[e]):17.2f}")
a = st.mean(x for v in vs.values() for x in v)
b = st.mean(x for v in ts.values() for x in v)
print(f"mean seconds per epoch over {rounds} round(s): vae {a:.2f}, pytorch {b:.2f}; pytorch / vae = {b / a:.2f}")
print(f"test -ELBO after epoch {epochs}: vae {st.mean(vt[epochs]):.2f}, pytorch {st.mean(tt[epochs]):.2f} nats")
print(f"peak RSS: vae {rss('vae'):.0f} MB, pytorch {rss('torch'):.0f} MB")
PY
