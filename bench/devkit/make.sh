#!/bin/bash
# Build .devkit/: what bench/run.py needs on a borrowed x86-64 machine that has Python, gcc and
# no network (the lent machine of bench/README.md, "On a borrowed machine"). Run it here, from the
# repository root, after `make setup` and `make bench-deps` (it copies the installed redis-server
# and redis-benchmark with their libraries, and the Cython C files of the last build):
#
#   bash bench/devkit/make.sh [PYTHON_VERSION]    # the target's Python, default 3.12
#
# .devkit/ then holds: whl/ (blake3 and crc32c wheels for that Python), uring/ (Debian's liburing
# headers and shared library), csrc/ (the generated C of every extension), libexec/ + lib/ + bin/
# (fio 3.33 built from Debian's source with no optional engines, so it needs only libc, libm and
# zlib; redis-server and redis-benchmark with their libraries but glibc's and the C++ runtime;
# bin/ holds wrappers that set LD_LIBRARY_PATH), loadgen (bench/loadgen.c built here), and
# run.sh (a copy of bench/devkit/run.sh). About 30 MB: carry it whole (`.devkit`).
set -euo pipefail
PYV=${1:-3.12}
ROOT=$(pwd)
K=$ROOT/.devkit
VPY=$ROOT/.venv/bin/python
[ -x "$VPY" ] || { echo "devkit: no .venv: run 'make setup' first" >&2; exit 2; }
ls cython/_uring.c >/dev/null 2>&1 || { echo "devkit: no cython/*.c: run 'make setup' first" >&2; exit 2; }
for b in redis-server redis-benchmark apt-get dpkg cc make; do
  command -v $b >/dev/null || { echo "devkit: $b is missing (make bench-deps installs Redis)" >&2; exit 2; }
done
rm -rf "$K"; mkdir -p "$K"/{whl,bin,libexec,lib,uring,csrc}
T=$(mktemp -d); trap 'rm -rf "$T"' EXIT

echo "devkit: wheels for Python $PYV"
pins=$("$VPY" -m pip list --format=freeze 2>/dev/null | grep -iE '^(blake3|crc32c)==')
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$K/whl" $pins

echo "devkit: liburing (Debian's liburing-dev and liburing2)"
(cd "$T" && apt-get download -q liburing-dev liburing2 >/dev/null && for f in *.deb; do dpkg -x "$f" x; done)
cp -a "$T"/x/usr/include "$K/uring/"
cp -a "$T"/x/usr/lib/x86_64-linux-gnu/liburing.so* "$K/uring/"

echo "devkit: fio from Debian's source"
mkdir -p "$T/src/parts" "$T/src/lists/partial"
cat > "$T/src/parts/src.sources" <<EOF
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
o="-o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts=$T/src/parts -o Dir::State::Lists=$T/src/lists"
apt-get $o update -q >/dev/null
(cd "$T/src" && apt-get $o source -q --download-only fio >/dev/null 2>&1 && tar xzf fio_*.orig.tar.gz)
(cd "$T"/src/fio-*/ && ./configure --disable-native >/dev/null && make -s -j"$(nproc)" >/dev/null 2>&1)
cp "$T"/src/fio-*/fio "$K/libexec/fio"

echo "devkit: redis-server and redis-benchmark with their libraries"
cp "$(command -v redis-server)" "$(command -v redis-benchmark)" "$K/libexec/"
for b in redis-server redis-benchmark; do ldd "$(command -v $b)" | awk '/=>/ {print $3}'; done | sort -u \
  | grep -vE '/(libc|libm|libstdc\+\+|libgcc_s)\.so' | xargs -I{} cp -L {} "$K/lib/"
for b in fio redis-server redis-benchmark; do
  printf '#!/bin/sh\nd=$(dirname "$(readlink -f "$0")")/..\nLD_LIBRARY_PATH="$d/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$d/libexec/%s" "$@"\n' \
    "$b" > "$K/bin/$b"
  chmod +x "$K/bin/$b"
done

echo "devkit: loadgen, the extensions' C, run.sh"
cc -O2 -Wall -Wextra -o "$K/loadgen" bench/loadgen.c
cp cython/*.c "$K/csrc/"
cp bench/devkit/run.sh "$K/run.sh"
du -sh "$K"
