"""Writes the preprocessing test images with Pillow (and a few hand-built PNGs): every format,
mode and awkward size the parity test covers. Usage: make_images.py OUT_DIR; prints the names."""
import io
import json
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

rng = np.random.default_rng(0)


def photo(w, h, channels=3):
    """Smooth gradients, a hard edge, a disc and some noise: what resizing must get right."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    planes = []
    for c in range(channels):
        v = 127 + 80 * np.sin(x / max(w, 1) * (3 + c) * np.pi) * np.cos(y / max(h, 1) * (2 + c) * np.pi)
        v += np.where(x > w * (0.3 + 0.2 * c), 40, -40)
        v += np.where((x - w / 2) ** 2 + (y - h / 2) ** 2 < (min(w, h) / 4) ** 2, 60, 0)
        v += rng.normal(0, 12, size=(h, w))
        planes.append(np.clip(v, 0, 255))
    return np.stack(planes, -1).astype(np.uint8)


def png_raw(w, h, bit_depth, color_type, rows):
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    raw = b"".join(b"\x00" + r for r in rows)
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    files = {}

    def save(name, image, **kw):
        image.save(out / name, **kw)
        files[name] = image.mode

    rgb = Image.fromarray(photo(320, 240))
    save("baseline.jpg", rgb, quality=90)
    save("progressive.jpg", rgb, quality=85, progressive=True)
    save("subsampled_444.jpg", rgb, quality=95, subsampling=0)
    save("cmyk.jpg", rgb.convert("CMYK"), quality=92)
    save("gray.jpg", rgb.convert("L"), quality=90)
    save("rgb.png", rgb)
    rgba = np.concatenate([photo(200, 150), photo(200, 150, 1)], -1)
    rgba[:, :40, 3] = 0  # fully transparent strip: hidden colour must not leak
    save("rgba.png", Image.fromarray(rgba, "RGBA"))
    save("la.png", Image.fromarray(rgba[:, :, [0, 3]], "LA"))
    save("palette.png", rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64))
    pal_t = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal_t.info["transparency"] = 3
    save("palette_transparent.png", pal_t, transparency=3)
    save("gray.png", rgb.convert("L"))
    save("onebit.png", rgb.convert("1"))
    save("color.gif", rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=32))
    save("gray.gif", rgb.convert("L"))
    save("rgb.webp", rgb, quality=90)
    save("rgba.webp", Image.fromarray(rgba, "RGBA"), lossless=True)
    save("rgb.bmp", rgb)
    save("palette.bmp", rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64))
    save("gray.bmp", rgb.convert("L"))
    save("onebit.bmp", rgb.convert("1"))
    save("tiny_1x1.png", Image.fromarray(photo(1, 1)))
    save("tiny_1x1.jpg", Image.fromarray(photo(1, 1)), quality=95)
    save("wide_3000x20.jpg", Image.fromarray(photo(3000, 20)), quality=90)
    save("tall_20x3000.png", Image.fromarray(photo(20, 3000)))
    save("odd_7x5.png", Image.fromarray(photo(7, 5)))
    save("upscale_50x37.jpg", Image.fromarray(photo(50, 37)), quality=90)

    # 16-bit PNGs (Pillow cannot write 16-bit RGB): gray as I;16, RGB as high bytes.
    g16 = (photo(64, 48, 1)[:, :, 0].astype(np.uint16) * 3)  # some values above 255, some below
    (out / "gray16.png").write_bytes(png_raw(64, 48, 16, 0, [r.astype(">u2").tobytes() for r in g16]))
    files["gray16.png"] = "I;16"
    c16 = photo(64, 48).astype(np.uint16) * 257 + rng.integers(0, 256, (48, 64, 3)).astype(np.uint16)
    (out / "rgb16.png").write_bytes(png_raw(64, 48, 16, 2, [r.astype(">u2").tobytes() for r in c16]))
    files["rgb16.png"] = "RGB"
    g4 = (photo(33, 21, 1)[:, :, 0] >> 4).astype(np.uint8)
    rows = [bytes((int(r[i]) << 4) | (int(r[i + 1]) if i + 1 < len(r) else 0) for i in range(0, len(r), 2)) for r in g4]
    (out / "gray4.png").write_bytes(png_raw(33, 21, 4, 0, rows))
    files["gray4.png"] = "L"
    json.dump(files, sys.stdout)


if __name__ == "__main__":
    main()
