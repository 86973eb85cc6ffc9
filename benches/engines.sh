#!/usr/bin/env bash
# The fused CPU step against candle's autograd on the same config over several seeds: test -ELBO
# after the last epoch per seed and engine, their means and the seed-to-seed spread, and seconds
# per epoch. Both engines draw the same numbers from the seed, so their runs differ only by
# floating-point order; the comparison to make is the gap of the means against the spread.
#
#   benches/engines.sh EPOCHS "SEEDS" [--set KEY=VALUE ...]
#   e.g. benches/engines.sh 3 "1 2 3" --set train.iw_samples=5
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=$1
SEEDS=$2
shift 2
# VAE_BIN names a built binary to time (default: build target/release/vae now).
if [ -z "${VAE_BIN:-}" ]; then cargo build --release -q; VAE_BIN=target/release/vae; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for seed in $SEEDS; do
  for engine in fused autograd; do
    echo "seed $seed: $engine" >&2
    "$VAE_BIN" train -q --config mnist.toml --set train.epochs="$EPOCHS" --set seed="$seed" \
      --set train.engine="$engine" "$@" --run "$tmp/$engine-$seed" > /dev/null
  done
done
python3 - "$tmp" "$SEEDS" <<'PY'
import sys, csv, statistics as st
tmp, seeds = sys.argv[1], sys.argv[2].split()
res = {}
for e in ["fused", "autograd"]:
    for s in seeds:
        rows = list(csv.DictReader(open(f"{tmp}/{e}-{s}/metrics.csv")))
        secs = [float(r["train_seconds"]) for r in rows if r["epoch"] != "0"]
        res.setdefault(e, []).append((float(rows[-1]["test_nelbo"]), st.mean(secs)))
print(f"{'seed':>6} {'fused test -ELBO':>17} {'autograd test -ELBO':>20}")
for i, s in enumerate(seeds):
    print(f"{s:>6} {res['fused'][i][0]:17.2f} {res['autograd'][i][0]:20.2f}")
for e in ["fused", "autograd"]:
    v = [x[0] for x in res[e]]
    sd = st.stdev(v) if len(v) > 1 else float("nan")
    print(f"{e:>8}: mean {st.mean(v):.2f}, seed-to-seed sd {sd:.2f}, {st.mean(x[1] for x in res[e]):.2f} s/epoch")
PY
