#!/usr/bin/env bash
# bash launch/get_fashion_mnist.sh DIR
#
# Puts Fashion-MNIST's four IDX files (train/t10k images and labels, gzipped) into DIR, from
# Debian's dataset-fashion-mnist package (MIT licence, Zalando SE): apt-get download + dpkg-deb -x,
# no root needed unless the package lists are missing (then run `apt-get update` as root first).
# Then: tvlars-train --config ... data.name=fashion-mnist data.path=DIR
# Debian recompressed the .gz files: upstream's .gz MD5s differ, the decompressed files match.
set -euo pipefail

if [ "$#" -ne 1 ]; then
  echo "usage: bash launch/get_fashion_mnist.sh DIR" >&2
  exit 2
fi
dest=$1
for tool in apt-get dpkg-deb; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "get_fashion_mnist: no $tool here (needs Debian/Ubuntu); use data.path=zalando-datasets/fashion_mnist (the hub) or copy the four IDX files into $dest" >&2
    exit 1
  fi
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if ! (cd "$work" && apt-get download -q dataset-fashion-mnist >/dev/null 2>"$work/apt.log"); then
  echo "get_fashion_mnist: apt-get download dataset-fashion-mnist failed ($(tail -n 1 "$work/apt.log")); run 'apt-get update' as root first?" >&2
  exit 1
fi
dpkg-deb -x "$work"/dataset-fashion-mnist_*.deb "$work/root"
mkdir -p "$dest"
mv "$work"/root/usr/share/datasets/fashion-mnist/*-ubyte.gz "$dest"/
ls -l "$dest"
