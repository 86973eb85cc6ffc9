#!/usr/bin/env bash
# Side by side: this binary and the PyTorch peer (../shared/bench/torch_vae.py, the
# pytorch/examples recipe) on the same data and recipe, alternating whole runs, on the CPU.
# Prints seconds per epoch of training for each, their ratio, and both test -ELBO per epoch.
#
#   benches/compare-pytorch.sh [EPOCHS] [ROUNDS]      (default 10 epochs, 2 rounds)
#
# PYTHON names an interpreter with torch (default: python3); PEER the peer script.
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${1:-10}
ROUNDS=${2:-2}
PY=${PYTHON:-python3}
PEER=${PEER:-../shared/bench/torch_vae.py}
"$PY" -c 'import torch' 2>/dev/null || { echo "error: $PY has no torch; set PYTHON (see ../shared/bench/README.md)" >&2; exit 1; }
[ -f "$PEER" ] || { echo "error: no peer script at $PEER; set PEER" >&2; exit 1; }
cargo build --release -q
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for r in $(seq 1 "$ROUNDS"); do
  echo "round $r/$ROUNDS: vae" >&2
  target/release/vae train -q --config mnist.toml --set train.epochs="$EPOCHS" --run "$tmp/vae-$r" > "$tmp/vae-$r.log"
  echo "round $r/$ROUNDS: pytorch" >&2
  "$PY" "$PEER" --data data/mnist --epochs "$EPOCHS" > "$tmp/torch-$r.log"
done
python3 - "$tmp" "$ROUNDS" "$EPOCHS" <<'PY'
import sys, csv, statistics as st
tmp, rounds, epochs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
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
print(f"{'epoch':>5} {'vae s':>7} {'torch s':>8} {'ratio':>6} {'vae test -ELBO':>15} {'torch test -ELBO':>17}")
for e in range(1, epochs + 1):
    a, b = st.mean(vs[e]), st.mean(ts[e])
    print(f"{e:>5} {a:7.2f} {b:8.2f} {b / a:6.2f} {st.mean(vt[e]):15.2f} {st.mean(tt[e]):17.2f}")
a = st.mean(x for v in vs.values() for x in v)
b = st.mean(x for v in ts.values() for x in v)
print(f"mean seconds per epoch over {rounds} round(s): vae {a:.2f}, pytorch {b:.2f}; pytorch / vae = {b / a:.2f}")
print(f"test -ELBO after epoch {epochs}: vae {st.mean(vt[epochs]):.2f}, pytorch {st.mean(tt[epochs]):.2f} nats")
PY
