#!/usr/bin/env bash
# predict --batch on a synthetic archive: wall time, rows/s and peak RSS (largest process, GNU time)
# for N rows, 1 and 2 processes. Usage: scripts/batch_bench.sh CHECKPOINT [ROWS...]   (default rows: 500 5000)
# The archive cycles through a synthetic Derm7pt's cases (sevenpoint synth), both images + metadata per row.
set -euo pipefail
CKPT=$1; shift
ROWS=${*:-500 5000}
PY=${PY:-.venv/bin/python}
WORK=$(mktemp -d)
$PY -m sevenpoint.cli synth "$WORK/d" --cases 60 --size 256 --seed 1 > /dev/null
for n in $ROWS; do
  $PY - "$WORK" "$n" <<'PY'
import csv, sys
from pathlib import Path
work, n = Path(sys.argv[1]), int(sys.argv[2])
root = next(work.glob("d/**/meta/meta.csv")).parent.parent
rows = [r for r in csv.DictReader(open(root / "meta" / "meta.csv")) if (root / "images" / r["derm"]).exists()]
with open(work / f"cases{n}.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["case_id", "derm", "clinic", "sex", "location", "elevation"])
    for i in range(n):
        r = rows[i % len(rows)]
        w.writerow([f"c{i}", root / "images" / r["derm"], root / "images" / r["clinic"], r["sex"], r["location"], r["elevation"]])
PY
  for dev in 1 2; do
    /usr/bin/time -f "%e %M" -o "$WORK/t" $PY -m sevenpoint.cli predict --checkpoint "$CKPT" --batch "$WORK/cases$n.csv" \
        --out "$WORK/r$n-$dev.csv" --devices $dev --no-progress --precision fp32 2> "$WORK/log" || true
    read -r wall rss < "$WORK/t"
    echo "rows=$n devices=$dev wall_s=$wall rows_per_s=$(echo "$n / $wall" | bc -l | cut -c1-6) peak_rss_MiB=$((rss / 1024)) $(tail -1 "$WORK/log")"
  done
done
rm -rf "$WORK"
