#!/usr/bin/env bash
# Installs pskv's C library where a C or C++ build finds it:
#   PREFIX/lib/libpskv.so.VERSION (+ links: the soname libpskv.so.MAJOR,
#   or libpskv.so.0.MINOR before 1.0, and libpskv.so)
#   PREFIX/lib/libpskv.a
#   PREFIX/include/pskv.h
#   PREFIX/lib/pkgconfig/pskv.pc             pkg-config --cflags --libs pskv
#   PREFIX/lib/cmake/pskv/pskvConfig*.cmake  find_package(pskv 0.1)
#
#   scripts/install-c.sh [--prefix DIR] [--debug] [--no-build]
#
# --prefix defaults to /usr/local; --debug installs the debug build;
# --no-build installs what target/ already holds.
set -euo pipefail
cd "$(dirname "$0")/.."

prefix=/usr/local
profile=release
build=1
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) prefix="${2:?--prefix needs a directory}"; shift 2 ;;
        --prefix=*) prefix="${1#--prefix=}"; shift ;;
        --debug) profile=debug; shift ;;
        --no-build) build=0; shift ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "install-c.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
abi=$(sed -n 's/^#define PSKV_ABI_VERSION \([0-9]*\)/\1/p' include/pskv.h)
if [ -z "$version" ] || [ -z "$abi" ]; then
    echo "install-c.sh: could not read the version (Cargo.toml) or the ABI version (include/pskv.h)" >&2
    exit 1
fi
major=${version%%.*}
rest=${version#*.}
minor=${rest%%.*}
# The soname (build.rs): before 1.0 a minor release may change the ABI.
if [ "$major" = 0 ]; then soabi="0.$minor"; else soabi="$major"; fi

if [ "$build" = 1 ]; then
    if [ "$profile" = release ]; then
        cargo build --release --lib -p pskv
    else
        cargo build --lib -p pskv
    fi
fi
target="${CARGO_TARGET_DIR:-target}/$profile"
for f in libpskv.so libpskv.a; do
    if [ ! -f "$target/$f" ]; then
        echo "install-c.sh: $target/$f is missing (build it, or drop --no-build)" >&2
        exit 1
    fi
done

subst() {
    sed -e "s|@PREFIX@|$prefix|g" -e "s|@VERSION@|$version|g" -e "s|@ABI@|$abi|g" \
        -e "s|@MAJOR@|$major|g" -e "s|@MINOR@|$minor|g" -e "s|@SOABI@|$soabi|g" "$1"
}

mkdir -p "$prefix/lib/pkgconfig" "$prefix/lib/cmake/pskv" "$prefix/include"
install -m 0755 "$target/libpskv.so" "$prefix/lib/libpskv.so.$version"
ln -sf "libpskv.so.$version" "$prefix/lib/libpskv.so.$soabi"
ln -sf "libpskv.so.$soabi" "$prefix/lib/libpskv.so"
install -m 0644 "$target/libpskv.a" "$prefix/lib/libpskv.a"
install -m 0644 include/pskv.h "$prefix/include/pskv.h"
subst packaging/pskv.pc.in > "$prefix/lib/pkgconfig/pskv.pc"
subst packaging/pskvConfig.cmake > "$prefix/lib/cmake/pskv/pskvConfig.cmake"
subst packaging/pskvConfigVersion.cmake > "$prefix/lib/cmake/pskv/pskvConfigVersion.cmake"
echo "installed pskv $version (C ABI $abi, $profile) in $prefix"
