"""Images drawn with Pillow for the corpus' vision models: text lines, pages, captchas, faces.

Everything is drawn from a seeded ``numpy.random.Generator`` (layout, words, colours), with
Pillow's built-in scalable font (``ImageFont.load_default(size=...)``), so no system fonts are
needed and the same seed gives the same pixels. Functions return ``uint8`` RGB arrays (H, W, 3).
"""

from __future__ import annotations

import math

import numpy as np

WORDS = (
    "invoice total amount date order number customer address street city phone email price "
    "quantity item description payment due balance account bank transfer reference receipt "
    "station platform departure arrival ticket seat coach window exit entrance open closed "
    "monday tuesday friday morning evening warning caution danger voltage model serial "
    "battery charge level speed limit parking hospital pharmacy market coffee bread milk "
    "water sugar salt apple orange lemon kitchen garden office school library museum"
).split()

ALNUM = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnpqrstuvwxyz23456789"


def font(size: int):
    """Pillow's built-in scalable font at ``size`` px."""
    from PIL import ImageFont
    return ImageFont.load_default(size=int(size))


def random_phrase(rng: np.random.Generator, min_words: int = 1, max_words: int = 4) -> str:
    """A short phrase of words, numbers and punctuation like printed labels and receipts."""
    parts = []
    for _ in range(int(rng.integers(min_words, max_words + 1))):
        pick = rng.random()
        if pick < 0.65:
            word = str(rng.choice(WORDS))
            parts.append(word.capitalize() if rng.random() < 0.4 else word)
        elif pick < 0.85:
            parts.append(str(int(rng.integers(1, 9999))))
        elif pick < 0.95:
            parts.append(f"{rng.integers(0, 999)}.{rng.integers(0, 99):02d}")
        else:
            parts.append(f"{rng.integers(1, 28):02d}/{rng.integers(1, 12):02d}/20{rng.integers(10, 30)}")
    return " ".join(parts)


def _light(rng: np.random.Generator) -> tuple[int, int, int]:
    base = int(rng.integers(205, 256))
    return tuple(int(np.clip(base + rng.integers(-15, 16), 0, 255)) for _ in range(3))


def _dark(rng: np.random.Generator) -> tuple[int, int, int]:
    base = int(rng.integers(0, 70))
    return tuple(int(np.clip(base + rng.integers(-20, 40), 0, 255)) for _ in range(3))


def text_line(rng: np.random.Generator, text: str | None = None, height: int | None = None,
              max_chars: int = 24) -> tuple[np.ndarray, str]:
    """A cropped line of dark text on a light background (like a detector's crop), and its text."""
    from PIL import Image, ImageDraw
    text = text if text is not None else random_phrase(rng, 1, 3)[:max_chars].strip() or "text"
    size = int(height or rng.integers(28, 56))
    fnt = font(size)
    left, top, right, bottom = fnt.getbbox(text)
    pad_x, pad_y = int(rng.integers(2, 10)), int(rng.integers(2, 8))
    img = Image.new("RGB", (right - left + 2 * pad_x, bottom - top + 2 * pad_y), _light(rng))
    ImageDraw.Draw(img).text((pad_x - left, pad_y - top), text, font=fnt, fill=_dark(rng))
    return np.asarray(img), text


def page(rng: np.random.Generator, size: int, lines: int | None = None) -> np.ndarray:
    """A document-like page: text lines of several sizes and colours, a box or rule, margins.

    ``lines=0`` draws blank paper. (PP-OCRv4's detector marks the inside of two stacked empty
    boxes as text, so blank pages carry no boxes.)
    """
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (size, size), _light(rng))
    draw = ImageDraw.Draw(img)
    scale = size / 640.0
    for _ in range(int(rng.integers(0, 3)) if lines != 0 else 0):  # boxes: structure, not text
        x0, y0 = int(rng.integers(0, size // 2)), int(rng.integers(0, size // 2))
        x1, y1 = x0 + int(rng.integers(size // 8, size // 2)), y0 + int(rng.integers(4, size // 3))
        draw.rectangle((x0, y0, x1, y1), outline=_dark(rng), width=max(1, int(2 * scale)))
    n_lines = int(rng.integers(4, 12)) if lines is None else lines
    y = int(rng.integers(8, 40) * scale)
    for _ in range(n_lines):
        height = int(rng.integers(14, 40) * scale) + 6
        fnt = font(height)
        text = random_phrase(rng, 1, 5)
        x = int(rng.integers(4, max(5, size // 4)))
        colour = _dark(rng) if rng.random() < 0.85 else (int(rng.integers(120, 200)), 20, 20)
        draw.text((x, y), text, font=fnt, fill=colour)
        y += int(height * rng.uniform(1.3, 2.2))
        if y > size - height:
            break
    return np.asarray(img)


def captcha(rng: np.random.Generator, width: int, height: int, n_chars: int | None = None
            ) -> tuple[np.ndarray, str]:
    """A text captcha: 4-6 jittered, rotated, coloured characters with arcs and dots drawn over."""
    from PIL import Image, ImageDraw
    n = int(rng.integers(4, 7)) if n_chars is None else int(n_chars)
    text = "".join(str(c) for c in rng.choice(list(ALNUM), size=n))
    img = Image.new("RGB", (width, height), _light(rng))
    draw = ImageDraw.Draw(img)
    step = width / (n + 0.6)
    for i, ch in enumerate(text):
        size = int(height * rng.uniform(0.55, 0.8))
        glyph = Image.new("RGBA", (size + 8, size + 8), (0, 0, 0, 0))
        colour = tuple(int(v) for v in rng.integers(0, 140, size=3)) + (255,)
        ImageDraw.Draw(glyph).text((4, 0), ch, font=font(size), fill=colour)
        glyph = glyph.rotate(float(rng.uniform(-25, 25)), resample=Image.BICUBIC, expand=False)
        x = int(step * (i + 0.3) + rng.uniform(-3, 3))
        y = int((height - size) / 2 + rng.uniform(-4, 4))
        img.paste(glyph, (x, y), glyph)
    for _ in range(int(rng.integers(1, 4))):  # interference arcs, as captchas draw them
        x0, y0 = int(rng.integers(-width // 4, width // 2)), int(rng.integers(-height, height // 2))
        box = (x0, y0, x0 + int(rng.integers(width // 2, width)), y0 + int(rng.integers(height, 2 * height)))
        draw.arc(box, float(rng.uniform(0, 180)), float(rng.uniform(180, 360)),
                 fill=tuple(int(v) for v in rng.integers(60, 200, size=3)), width=int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(10, 40))):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        draw.point((x, y), fill=tuple(int(v) for v in rng.integers(0, 200, size=3)))
    return np.asarray(img), text


def click_scene(rng: np.random.Generator, size: int, n_chars: int | None = None
                ) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """A click-captcha scene: a drawn landscape (sky, hills, sun) with a few large characters.

    Returns the image and each character's box (x0, y0, x1, y1).
    """
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(img)
    top, bottom = rng.integers(60, 200, size=3), rng.integers(120, 255, size=3)
    for y in range(size):  # vertical gradient sky
        t = y / size
        draw.line((0, y, size, y), fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom)))
    for _ in range(int(rng.integers(2, 5))):  # hills, a sun, houses
        cx, cy, r = int(rng.integers(0, size)), int(rng.integers(size // 3, size)), int(rng.integers(30, 160))
        draw.ellipse((cx - r, cy - r // 2, cx + r, cy + r), fill=tuple(int(v) for v in rng.integers(20, 200, size=3)))
    for _ in range(int(rng.integers(0, 3))):
        x, y, w = int(rng.integers(0, size - 60)), int(rng.integers(size // 2, size - 60)), int(rng.integers(30, 70))
        draw.rectangle((x, y, x + w, y + w), fill=tuple(int(v) for v in rng.integers(60, 220, size=3)))
    boxes = []
    n = int(rng.integers(3, 6)) if n_chars is None else int(n_chars)
    for _ in range(n):
        ch = str(rng.choice(list(ALNUM)))
        fsize = int(rng.integers(34, 56))
        glyph = Image.new("RGBA", (fsize + 16, fsize + 16), (0, 0, 0, 0))
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3)) + (255,)
        ImageDraw.Draw(glyph).text((8, 4), ch, font=font(fsize), fill=colour,
                                   stroke_width=2, stroke_fill=(255 - colour[0], 255 - colour[1], 255 - colour[2]))
        glyph = glyph.rotate(float(rng.uniform(-35, 35)), resample=Image.BICUBIC)
        for _try in range(20):
            x, y = int(rng.integers(0, size - glyph.width)), int(rng.integers(0, size - glyph.height))
            box = (x, y, x + glyph.width, y + glyph.height)
            if all(box[2] < b[0] or box[0] > b[2] or box[3] < b[1] or box[1] > b[3] for b in boxes):
                break
        img.paste(glyph, (x, y), glyph)
        boxes.append(box)
    return np.asarray(img), boxes


def face_scene(rng: np.random.Generator, size: int, face: bool = True,
               scale: tuple[float, float] = (0.45, 0.7)) -> np.ndarray:
    """A drawn portrait: background, shoulders, head with hair, eyes, brows, nose and mouth.

    The face is ``scale`` (a range) of the image wide. ``face=False`` draws the same kind of
    background with objects and no face.
    """
    from PIL import Image, ImageDraw
    bg = tuple(int(v) for v in rng.integers(40, 230, size=3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 4))):
        x, y = int(rng.integers(0, size)), int(rng.integers(0, size))
        r = int(rng.integers(size // 10, size // 3))
        draw.rectangle((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(20, 240, size=3)))
    if not face:
        return np.asarray(img)
    s = size * rng.uniform(*scale)  # face width
    cx = size / 2 + rng.uniform(-0.12, 0.12) * size
    cy = size / 2 + rng.uniform(-0.08, 0.1) * size
    skin_tones = [(241, 194, 160), (224, 172, 140), (198, 134, 98), (141, 85, 56), (255, 219, 190)]
    skin = skin_tones[int(rng.integers(0, len(skin_tones)))]
    hair = tuple(int(v) for v in rng.integers(10, 120, size=3))
    shirt = tuple(int(v) for v in rng.integers(0, 256, size=3))
    draw.ellipse((cx - s, cy + 0.9 * s, cx + s, cy + 2.2 * s), fill=shirt)  # shoulders
    draw.rectangle((cx - 0.18 * s, cy + 0.5 * s, cx + 0.18 * s, cy + 1.0 * s), fill=skin)  # neck
    draw.ellipse((cx - 0.55 * s, cy - 0.85 * s, cx + 0.55 * s, cy + 0.35 * s), fill=hair)  # hair
    draw.ellipse((cx - 0.62 * s, cy - 0.1 * s, cx - 0.42 * s, cy + 0.2 * s), fill=skin)  # ears
    draw.ellipse((cx + 0.42 * s, cy - 0.1 * s, cx + 0.62 * s, cy + 0.2 * s), fill=skin)
    for k in range(6):  # face, shaded darker towards its edge
        f = 1.0 - k / 6.0
        tone = tuple(int(min(255, c * (0.82 + 0.04 * k))) for c in skin)
        draw.ellipse((cx - 0.48 * s * f, cy - 0.6 * s * f + 0.05 * s * (1 - f),
                      cx + 0.48 * s * f, cy + 0.7 * s * f + 0.05 * s * (1 - f)), fill=tone)
    eye_y, eye_dx = cy - 0.05 * s, 0.2 * s
    for sign in (-1, 1):
        ex = cx + sign * eye_dx
        draw.ellipse((ex - 0.1 * s, eye_y - 0.045 * s, ex + 0.1 * s, eye_y + 0.045 * s), fill=(250, 250, 250))
        draw.ellipse((ex - 0.045 * s, eye_y - 0.045 * s, ex + 0.045 * s, eye_y + 0.045 * s), fill=(40, 30, 20))
        draw.line((ex - 0.11 * s, eye_y - 0.12 * s, ex + 0.11 * s, eye_y - 0.14 * s), fill=hair,
                  width=max(1, int(0.035 * s)))
    nose = tuple(max(0, c - 40) for c in skin)
    draw.line((cx, cy, cx - 0.05 * s, cy + 0.2 * s, cx + 0.03 * s, cy + 0.22 * s), fill=nose,
              width=max(1, int(0.02 * s)))
    mouth_y = cy + 0.38 * s
    draw.arc((cx - 0.17 * s, mouth_y - 0.1 * s, cx + 0.17 * s, mouth_y + 0.06 * s), 20, 160,
             fill=(150, 40, 50), width=max(1, int(0.03 * s)))
    light = np.linspace(rng.uniform(1.0, 1.15), rng.uniform(0.7, 0.9), size)[:, None, None]
    return np.clip(np.asarray(img, np.float32) * light, 0, 255).astype(np.uint8)  # top lighting


def rotate180(img: np.ndarray) -> np.ndarray:
    """The image turned upside down (what the text-orientation classifier detects)."""
    return np.ascontiguousarray(img[::-1, ::-1])


def resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear resize of a uint8 RGB array with Pillow."""
    from PIL import Image
    return np.asarray(Image.fromarray(img).resize((int(width), int(height)), Image.BILINEAR))


def fit_height(img: np.ndarray, height: int, max_width: int) -> np.ndarray:
    """Resize to ``height`` keeping the aspect ratio, at most ``max_width`` wide (PaddleOCR style)."""
    h, w = img.shape[:2]
    new_w = min(max_width, int(math.ceil(height * w / float(h))))
    return resize(img, new_w, height)
