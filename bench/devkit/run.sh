#!/bin/bash
# bench/run.py on a borrowed x86-64 machine with no network, from the kit bench/devkit/make.sh
# builds (.devkit/, carried along): installs the wheels under /tmp/site, compiles the extensions
# from the carried C with the machine's Python and gcc (liburing linked by rpath), puts the
# carried fio and Redis first on PATH, checks io_uring, O_DIRECT (a work dir where fio's O_DIRECT
# reads run) and a store round trip, then runs what MODE says. From the repository root:
#
#   OUT=DIR bash .devkit/run.sh MODE
#
# MODE: check (set-up and checks only); bench (bench/run.py --repeat $REPEAT --duration $DURATION
# [--serve-flags "$SERVE_FLAGS"], results under $OUT/bench); ab (a 1 MiB PUT/GET A/B of --parallel-hash off/on, $AB_ORDER, and
# BLAKE3 timed on one thread and on its pool: $OUT/ab.txt, $OUT/micro.txt); abfull (ab, then
# bench with the mode whose 1 MiB PUTs ran faster). PY picks the Python (default python3), WHL
# another wheel folder (to try the kit here with this machine's Python).
set -u
MODE=${1:-check}
ROOT=$(pwd)
K=$ROOT/.devkit
PY=${PY:-python3}
: "${OUT:=/tmp/out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
t0=$(date +%s)
echo "== machine"; nproc; uname -r; $PY --version; (gcc --version | head -1) || echo "no gcc"
grep -m1 "model name" /proc/cpuinfo; free -g | head -2
cat /proc/sys/kernel/io_uring_disabled 2>/dev/null || echo "io_uring_disabled: n/a"
for d in "$ROOT" /var/tmp /root /tmp /mnt /data; do [ -d "$d" ] && echo "fs $d: $(stat -f -c %T "$d") $(df -h "$d" | tail -1)"; done
echo "== wheels"
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${WHL:-$K/whl}"/*.whl || exit 3
export PYTHONPATH=/tmp/site:$ROOT/daemon
echo "== extensions"
INC=$($PY -c "import sysconfig; print(sysconfig.get_paths()['include'])")
SUF=$($PY -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
ls "$INC/Python.h" || exit 4
build() {
  n=$1; extra=""
  [ "$n" = _uring ] && extra="-L$K/uring -luring -Wl,-rpath,$K/uring"
  gcc -O2 -g0 -fPIC -shared -fno-strict-aliasing -fwrapv -DNDEBUG -I"$INC" -I"$ROOT/cython" -I"$K/uring/include" \
      "$K/csrc/$n.c" -o "$ROOT/daemon/ringblob/$n$SUF" $extra 2>&1 | grep -v -i warning | head -5
}
export -f build; export K ROOT INC SUF
ls "$K"/csrc/*.c | xargs -n1 basename | sed 's/\.c$//' | xargs -P 16 -I{} bash -c 'build {}'
$PY - <<'EOF' || exit 5
import ringblob._uring, ringblob._storeput, ringblob._srvcore, blake3, crc32c, prometheus_client
print("imports ok")
try:
    import uvloop; print("uvloop", uvloop.__version__)
except ImportError:
    print("no uvloop")
EOF
export PATH=$K/bin:$PATH
fio --version && redis-server --version | head -1 && redis-benchmark --version | head -1 || exit 6
# a work dir on a real file system that takes O_DIRECT and refuses misaligned O_DIRECT
W=""
for d in "$ROOT/.bench-tmp" /var/tmp/rbbench /root/rbbench; do
  mkdir -p "$d" 2>/dev/null || continue
  if fio --name=od --filename="$d/od.dat" --size=8m --rw=randread --bs=4k --direct=1 --ioengine=io_uring \
        --iodepth=8 --runtime=1 --time_based --output-format=terse >/dev/null 2>"$d/od.err"; then
    echo "O_DIRECT ok in $d ($(stat -f -c %T "$d"))"; W=$d; rm -f "$d/od.dat"; break
  else
    echo "O_DIRECT refused in $d: $(tail -2 "$d/od.err")"
  fi
done
[ -n "$W" ] || exit 7
cp "$K/loadgen" "$W/loadgen" && touch "$W/loadgen"
$PY - <<EOF || exit 8
import asyncio, os
from ringblob.store import BlobStore
async def main():
    s = await BlobStore.create("$W/smoke.data", 64 << 20)
    await s.put(b"k", b"v" * 5000, sync=True)
    assert await s.get(b"k") == b"v" * 5000
    print("store smoke ok, engine:", s.stat()["engine"])
    await s.close()
asyncio.run(main())
os.unlink("$W/smoke.data")
EOF
echo "== setup took $(( $(date +%s) - t0 )) s"
if [ "$MODE" = bench ]; then
  fio --name=t --filename="$W/fio.chk" --size=1g --rw=randread --bs=4k --direct=1 --ioengine=io_uring --iodepth=32 \
      --runtime=3 --time_based --output-format=terse | awk -F';' '{print "randread 4k QD32 IOPS:", $8}'
  rm -f "$W/fio.chk"
  timeout "${BENCH_TIMEOUT:-460}" $PY bench/run.py --workdir "$W" --nice -10 --quiet-wait 0 --fresh \
      --repeat "${REPEAT:-2}" --duration "${DURATION:-3}" ${SERVE_FLAGS:+--serve-flags "$SERVE_FLAGS"} \
      --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log"
  echo "bench rc=${PIPESTATUS[0]} after $(( $(date +%s) - t0 )) s"
  for f in "$W"/ringblob-*.log; do [ -f "$f" ] && tail -c 20000 "$f" > "$OUT/$(basename "$f")"; done
fi
if [ "$MODE" = ab ] || [ "$MODE" = abfull ]; then
  $PY - <<'PYEOF' | tee "$OUT/micro.txt"
import os, time
from blake3 import blake3
print("blake3 one thread vs AUTO (us per digest)")
for size in (65536, 131072, 262144, 524288, 1 << 20, 4 << 20):
    buf = os.urandom(size); out = []
    for mt in (1, blake3.AUTO):
        n = max(100, 40_000_000 // size)
        for _ in range(2):
            t = time.perf_counter()
            for i in range(n): blake3(buf, max_threads=mt).digest()
            dt = (time.perf_counter() - t) / n * 1e6
        out.append(dt)
    print(size, " ".join(f"{x:.1f}" for x in out))
PYEOF
  AB=/tmp/ab; rm -rf $AB; mkdir -p $AB
  i=0
  for mode in ${AB_ORDER:-off on on off off on}; do
    i=$((i+1))
    timeout 120 $PY bench/run.py --workdir "$W" --nice -10 --quiet-wait 0 --only fio,uring \
        --workloads put_1m_c8,get_1m_c8 --repeat 1 --duration "${AB_DURATION:-3}" \
        --serve-flags "--parallel-hash $mode" --out "$AB/$i-$mode" > "$AB/$i-$mode.log" 2>&1
    echo "ab $i $mode rc=$? after $(( $(date +%s) - t0 )) s"
  done
  $PY - "$AB" <<'PYEOF' | tee "$OUT/ab.txt"
import json, os, sys, statistics
ab = sys.argv[1]; rows = {}
for d in sorted(os.listdir(ab)):
    f = os.path.join(ab, d, "run.json")
    if not os.path.exists(f): continue
    mode = d.split("-", 1)[1]
    for r in json.load(open(f))["results"]:
        key = (r["system"], r["workload"], mode)
        cpu = r.get("daemon_cpu_us_per_op")
        rows.setdefault(key, []).append((r.get("bytes_per_s", 0) / 2**20, cpu, r.get("p99_us")))
for k in sorted(rows):
    v = rows[k]
    print(k, "MiB/s", [round(x[0]) for x in v], "median", round(statistics.median(x[0] for x in v)),
          "cpu_us/op", [round(x[1]) if x[1] else None for x in v])
PYEOF
fi
if [ "$MODE" = abfull ]; then
  best=$($PY - /tmp/ab <<'PYEOF'
import json, os, sys, statistics
ab = sys.argv[1]; v = {"on": [], "off": []}
for d in os.listdir(ab):
    f = os.path.join(ab, d, "run.json")
    if os.path.exists(f):
        for r in json.load(open(f))["results"]:
            if r["workload"] == "put_1m_c8" and r["system"] == "ringblob-uring":
                v[d.split("-", 1)[1]].append(r.get("bytes_per_s", 0))
print("on" if v["on"] and v["off"] and statistics.median(v["on"]) > statistics.median(v["off"]) else "off")
PYEOF
)
  echo "full bench with --parallel-hash $best"
  timeout "${BENCH_TIMEOUT:-300}" $PY bench/run.py --workdir "$W" --nice -10 --quiet-wait 0 --fresh \
      --repeat "${REPEAT:-2}" --duration "${DURATION:-2.5}" --serve-flags "--parallel-hash $best" \
      --out "$OUT/bench" > "$OUT/bench.log" 2>&1
  echo "bench rc=$? after $(( $(date +%s) - t0 )) s"; tail -30 "$OUT/bench.log"
fi
