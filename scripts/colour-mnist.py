#!/usr/bin/env python3
"""Colour MNIST as a NumPy archive, with nothing but the standard library.

Usage: python3 scripts/colour-mnist.py [MNIST_DIR] [OUT.npz]
       (defaults: data/mnist and data/colour-mnist.npz)
       python3 scripts/colour-mnist.py --png DIR [--count N] [MNIST_DIR]
       (a folder of PNG files instead: DIR/0/ to DIR/9/, the first N training digits,
       default 10000, as a user's own folder of images would be laid out)

Each digit of the shipped MNIST is painted in one of 12 hues, drawn at random with a fixed
seed and independent of the digit, on black. The result is the layout Keras' mnist.npz uses:
x_train (60000, 28, 28, 3) uint8, y_train (60000,) uint8, x_test, y_test. It is the worked
example of docs/own-data.md: a VAE has to put the colour in its latent code too.
"""

import argparse
import colorsys
import gzip
import os
import io
import random
import struct
import sys
import zipfile
import zlib

HUES = 12


def idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, n = struct.unpack(">II", data[:8])
    if magic == 2051:
        rows, cols = struct.unpack(">II", data[8:16])
        return n, data[16:], rows * cols
    return n, data[8:], 1


def npy(descr, shape, payload):
    """A version-1.0 .npy: magic, header length, the header dict padded to 64 bytes, data."""
    dims = ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "")
    header = "{'descr': '%s', 'fortran_order': False, 'shape': (%s), }" % (descr, dims)
    header += " " * ((64 - (10 + len(header) + 1) % 64) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + payload


def paint(images, n, size, rng):
    # One translation table per hue and channel: grey level v -> v * channel / 255.
    tables = []
    for h in range(HUES):
        rgb = colorsys.hsv_to_rgb(h / HUES, 0.85, 1.0)
        tables.append([bytes(round(v * c) for v in range(256)) for c in rgb])
    out = bytearray(n * size * 3)
    for i in range(n):
        img = images[i * size:(i + 1) * size]
        t = tables[rng.randrange(HUES)]
        o = i * size * 3
        for c in range(3):
            out[o + c:o + size * 3:3] = img.translate(t[c])
    return bytes(out)


def png(width, height, rgb):
    """An 8-bit RGB PNG: signature, IHDR, one zlib IDAT of filter-0 rows, IEND."""
    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))
    stride = width * 3
    rows = b"".join(b"\0" + rgb[y * stride:(y + 1) * stride] for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows, 6))
            + chunk(b"IEND", b""))


def write_folder(src, dst, count, rng):
    n, images, size = idx(f"{src}/train-images-idx3-ubyte.gz")
    _, labels, _ = idx(f"{src}/train-labels-idx1-ubyte.gz")
    count = min(count, n)
    colour = paint(images, count, size, rng)
    for d in range(10):
        os.makedirs(os.path.join(dst, str(d)), exist_ok=True)
    for i in range(count):
        path = os.path.join(dst, str(labels[i]), f"{i:05d}.png")
        with open(path, "wb") as f:
            f.write(png(28, 28, colour[i * size * 3:(i + 1) * size * 3]))
    print(f"wrote {count} images in {dst}/0 .. {dst}/9", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description="Colour MNIST as a .npz archive or a folder of PNGs.")
    ap.add_argument("src", nargs="?", default="data/mnist", help="MNIST IDX folder")
    ap.add_argument("dst", nargs="?", default="data/colour-mnist.npz", help="the .npz to write")
    ap.add_argument("--png", metavar="DIR", help="write a folder of PNG files, a subfolder per digit")
    ap.add_argument("--count", type=int, default=10000, help="with --png: how many images")
    a = ap.parse_args()
    rng = random.Random(1)
    if a.png:
        write_folder(a.src, a.png, a.count, rng)
        return
    src, dst = a.src, a.dst
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as z:
        for split, prefix in (("train", "train"), ("test", "t10k")):
            n, images, size = idx(f"{src}/{prefix}-images-idx3-ubyte.gz")
            _, labels, _ = idx(f"{src}/{prefix}-labels-idx1-ubyte.gz")
            z.writestr(f"x_{split}.npy", npy("|u1", (n, 28, 28, 3), paint(images, n, size, rng)))
            z.writestr(f"y_{split}.npy", npy("|u1", (n,), labels))
            print(f"{split}: {n} images", file=sys.stderr)
    print(f"wrote {dst}", file=sys.stderr)


if __name__ == "__main__":
    main()
