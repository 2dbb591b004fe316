"""Training data: photo crops, the emoji text-image pairs, inpainting masks and SR degradations.

Preparation writes compact uint8 arrays (plus a JSON manifest) to an ignored folder once; the
loops then draw batches from memory with a seeded `torch.Generator`, so a checkpoint that saves
the generator's state resumes on exactly the same batches. Batches are float tensors in [-1, 1],
NCHW, as everywhere else in latentgen.
"""

import functools
import hashlib
import io
import json
import random
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from latentgen import metrics
from latentgen.errors import LatentgenError

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")
EMOJI_VERSION = "16.0.0"


class EmojiSource(NamedTuple):
    """One drawing of the emoji: the npm package (and version; None: prepare_emoji's), the folder
    of its images, the style word its captions add, so that a prompt can ask for one look or
    another, and the vendor whose has_img_<vendor> flags in an emoji-datasource emoji.json list the
    images (None: the file names are the code points)."""

    package: str
    version: Optional[str]
    images: str
    style: str
    vendor: Optional[str] = None


EMOJI_SETS = {
    "google": EmojiSource("emoji-datasource-google", None, "img/google/64", "noto emoji style", "google"),
    "twitter": EmojiSource("emoji-datasource-twitter", None, "img/twitter/64", "twemoji style", "twitter"),
    # Noto before Android 8 (2017), Apache-2.0 like today's: other drawings of the same emoji
    # (the "blobs"), so that a name is seen drawn three ways rather than two.
    "blob": EmojiSource("emoji-datasource-google", "3.0.0", "img/google/64", "blob emoji style", "google"),
    # Microsoft's Fluent Emoji (MIT) in their shaded "3D" look, 256 px WebP named by code points:
    # a fourth drawing, and one with volume and light.
    "fluent": EmojiSource("@lobehub/fluent-emoji-3d", "1.1.0", "assets", "fluent 3d emoji style"),
    # The same designs flat (MIT, SVG drawn by resvg): a fifth drawing, with outlines and no shading.
    "fluent-flat": EmojiSource("@lobehub/fluent-emoji-flat", "1.1.0", "assets", "fluent flat emoji style"),
    # The same designs with gradients (MIT, SVG): a sixth look, shaded like the 3D ones but drawn in 2-D.
    "fluent-modern": EmojiSource("@lobehub/fluent-emoji-modern", "1.0.0", "assets", "fluent modern emoji style"),
    # EmojiOne 2 (artwork CC-BY 4.0, Ranks.com; 3.0 and later are not free): 64 px PNGs named by code
    # points, a seventh design of its own, for the names that five or six drawings have not taught.
    "emojione": EmojiSource("emojione", "2.2.7", "assets/png", "emojione style"),
}
# The package whose emoji.json (at prepare_emoji's version) names and sorts every set's drawings.
EMOJI_TABLE = "emoji-datasource-google"
# CLDR names and keywords (MIT): emoji-datasource has only the legacy Unicode names, where
# "HEAVY BLACK HEART" is the red heart.
EMOJI_KEYWORDS = "emojilib@4.0.3"
SKIN_TONES = {"1F3FB": "light", "1F3FC": "medium-light", "1F3FD": "medium", "1F3FE": "medium-dark", "1F3FF": "dark"}
# Legacy Unicode names say "black"/"white" for filled/outlined shapes ("HEAVY BLACK HEART" is red);
# emojilib keeps them as keywords, which would teach the wrong colours.
LEGACY_COLOUR_WORDS = frozenset({"black", "white"})
COLOUR_WORDS = frozenset({"red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink", "brown", "black",
                          "white", "grey", "gray", "light"})
# The hues a hue-rotated copy may be turned to (named as metrics.HUE_RANGES names them).
ROTATION_COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink")
# Only things whose colour is arbitrary are hue-turned: hearts, shapes, objects, vehicles. A frog,
# a banana, a face or a star is drawn in its own colour, and "a frog" must not get a mixture of hues.
ROTATION_CATEGORIES = ("objects", "activities", "symbols")
ROTATION_SUBCATEGORIES = ("heart", "emotion", "transport ground", "transport water")
# What a mirror image would make wrong: flags, letters, digits, arrows and signs (symbols), and
# anything whose name says a side or reads a time.
NO_MIRROR_CATEGORIES = ("flags", "symbols")
SIDED_WORDS = frozenset({"left", "right", "leftwards", "rightwards", "arrow", "clock", "o’clock", "letter", "text"})


# ---- photos ---------------------------------------------------------------------------------


def list_photos(folder: Path) -> list[Path]:
    photos = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES)
    if not photos:
        raise LatentgenError(f"no photos ({', '.join(PHOTO_SUFFIXES)}) under {folder}")
    return photos


def prepare_photos(src: Path, dst: Path, size: int = 128, count: int = 6000,
                   scales: Sequence[float] = (0.35, 0.5, 0.75, 1.0), seed: int = 0) -> Path:
    """`count` seeded square crops of `size` px: a random photo, a random scale (the crop covers
    size / scale source pixels, resized with Lanczos) at a random place, flipped half the time.
    Writes photos-<size>.npy (uint8 [N, size, size, 3]) and a manifest saying where each came from."""
    files = list_photos(src)
    photos = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    rng = np.random.default_rng(seed)
    crops = np.empty((count, size, size, 3), dtype=np.uint8)
    records = []
    for i in range(count):
        index = int(rng.integers(len(photos)))
        photo = photos[index]
        height, width = photo.shape[:2]
        side = min(round(size / float(rng.choice(scales))), height, width)
        top, left = int(rng.integers(height - side + 1)), int(rng.integers(width - side + 1))
        flip = bool(rng.random() < 0.5)
        crop = Image.fromarray(photo[top:top + side, left:left + side]).resize((size, size), Image.LANCZOS)
        crops[i] = np.asarray(crop)[:, ::-1] if flip else np.asarray(crop)
        records.append([files[index].relative_to(src).as_posix(), left, top, side, flip])
    dst.mkdir(parents=True, exist_ok=True)
    out = dst / f"photos-{size}.npy"
    np.save(out, crops)
    manifest = {"source": str(src), "size": size, "seed": seed, "scales": list(scales),
                "fields": ["file", "left", "top", "side", "flipped"], "crops": records}
    (dst / f"photos-{size}.json").write_text(json.dumps(manifest))
    return out


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2).float() / 127.5 - 1


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NHWC."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def emoji_at(images: np.ndarray, size: int) -> torch.Tensor:
    """Emoji as [N, 3, size, size] in [-1, 1], bicubic-resized from their native size."""
    x = to_tensor(images)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)
    return x


def random_views(x: torch.Tensor, generator: torch.Generator, flip: torch.Tensor, scale: tuple[float, float] = (0.75, 1.05),
                 degrees: float = 15.0, shift: float = 0.1) -> torch.Tensor:
    """Emoji [N, 3, H, W] in [-1, 1], each seen anew: scaled, turned by up to `degrees`, shifted by up
    to `shift` of the frame and, where `flip`, mirrored, on the white they were composited on. More
    views of each of an emoji's few drawings than the mirror alone gives."""
    n = len(x)
    zoom = torch.empty(n).uniform_(*scale, generator=generator)
    angle = torch.empty(n).uniform_(-degrees, degrees, generator=generator).deg2rad()
    offset = torch.empty(n, 2).uniform_(-2 * shift, 2 * shift, generator=generator)  # the frame spans [-1, 1]
    cos, sin = angle.cos() / zoom, angle.sin() / zoom
    mirror = 1.0 - 2.0 * flip.float()
    theta = torch.stack([torch.stack([cos * mirror, -sin, offset[:, 0]], 1),
                         torch.stack([sin * mirror, cos, offset[:, 1]], 1)], 1)  # output -> input coordinates
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x - 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 1


@dataclass
class ImageBatches:
    """Random batches from a uint8 [N, H, W, 3] array: random `crop` px windows, random
    horizontal flips (`flip`; off for emoji, whose arrows and letters have a direction)."""

    images: np.ndarray
    crop: Optional[int] = None
    flip: bool = True

    def __len__(self) -> int:
        return len(self.images)

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(images [B, 3, crop, crop] in [-1, 1], their indices)."""
        indices = torch.randint(len(self.images), (batch,), generator=generator)
        x = to_tensor(self.images[indices.numpy()])
        if self.crop is not None and self.crop < x.shape[-1]:
            top, left = (int(v) for v in torch.randint(x.shape[-1] - self.crop + 1, (2,), generator=generator))
            x = x[..., top:top + self.crop, left:left + self.crop]
        if self.flip:
            flipped = torch.rand(batch, generator=generator) < 0.5
            x = torch.where(flipped[:, None, None, None], x.flip(-1), x)
        return x, indices


# ---- emoji ----------------------------------------------------------------------------------


def npm_pack(specs: Sequence[str], workdir: Path) -> list[Path]:
    """`npm pack` each package spec into `workdir` (the registry's tarball, no install scripts run)."""
    try:
        subprocess.run(["npm", "pack", "--silent", *specs], cwd=workdir, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise LatentgenError("npm is not installed; it is needed to fetch the emoji packages") from None
    except subprocess.CalledProcessError as error:
        raise LatentgenError(f"npm pack {' '.join(specs)} failed: {error.stderr.strip().splitlines()[-1:]}") from None
    return sorted(workdir.glob("*.tgz"))


def _tarball_name(package: str, version: str) -> str:
    """The file `npm pack` writes: a scope's @ dropped and its / a dash."""
    return f"{package.removeprefix('@').replace('/', '-')}-{version}.tgz"


def _tar_member(tar: tarfile.TarFile, name: str) -> Optional[bytes]:
    try:
        return tar.extractfile(f"package/{name}").read()
    except KeyError:
        return None


def emoji_char(unified: str) -> str:
    return "".join(chr(int(code, 16)) for code in unified.split("-"))


def _cldr_entry(keywords: dict, record: dict, unified: str) -> Optional[list]:
    for code in (unified, record.get("non_qualified") or "", unified.replace("-FE0F", "")):
        if code and emoji_char(code) in keywords:
            return keywords[emoji_char(code)]
    return None


def _tone_words(tone_key: str) -> str:
    tones = [SKIN_TONES[t] for t in tone_key.split("-") if t in SKIN_TONES]
    return f"{' and '.join(dict.fromkeys(tones))} skin tone" if tones else ""


def describe_emoji(record: dict, keywords: dict, tone_key: str = "") -> dict:
    """Name, keywords and category of one emoji (or one skin-tone variant of it): the CLDR name
    from emojilib where it has one, else the lower-cased Unicode name. Colour keywords that the
    name does not carry are dropped (they come from legacy names, like "black" for the red heart)."""
    unified = record["unified"] if not tone_key else record["skin_variations"][tone_key]["unified"]
    entry = _cldr_entry(keywords, record, record["unified"]) or []
    name = entry[0].replace("_", " ").strip() if entry else ""
    if name in ("", "keycap"):
        name = record["name"].lower()
    name_words = set(name.split())
    extra = [k.replace("_", " ") for k in entry[1:] if k not in name_words and k not in LEGACY_COLOUR_WORDS]
    tone = _tone_words(tone_key)
    return {"unified": unified, "name": f"{name}, {tone}" if tone else name, "keywords": extra,
            "short_names": [s.replace("_", " ") for s in record["short_names"]],
            "category": record["category"].lower(), "subcategory": record["subcategory"].replace("-", " ")}


CAPTION_TEMPLATES = (
    "an emoji of {a} {name}",
    "{name}, {style}",
    "{a} {name} emoji, {style}",
    "{name}",
    "{name} emoji",
    "{a} {name}",
    "{style} {name}",
    "{a} {name} in {style}",
    "an icon of {a} {name}, {keyword}",
    "{name}, {keyword}, {keyword2}",
    "{short_name}, {style}",
    "{a} {name}, a {subcategory} emoji",
    "{category}: {name}, {style}",
    "a picture of {a} {name} on a white background",
)


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def coloured_name(info: dict, colour: str) -> str:
    """The name with its measured colour: "blue heart", but "hash key on a cyan square" for a
    square tile, whose colour is the tile's, not the symbol's."""
    return f"{info['name']} on {_article(colour)} {colour} square" if info.get("tile") else f"{colour} {info['name']}"


def emoji_captions(info: dict, style: str, rng: random.Random, count: int) -> list[str]:
    """`count` different captions from varied templates; about half name the style. When the
    pixels have a colour the name does not say (`info["colour"]`), every other caption says it."""
    keywords = info["keywords"] or [info["subcategory"]]
    templates = rng.sample(CAPTION_TEMPLATES, k=min(count, len(CAPTION_TEMPLATES)))
    colour = info.get("colour")
    captions = []
    for i, template in enumerate(templates):
        name = coloured_name(info, colour) if colour and i % 2 == 0 else info["name"]
        picked = rng.sample(keywords, k=min(2, len(keywords)))
        captions.append(template.format(
            a=_article(name), name=name, style=style, keyword=picked[0],
            keyword2=picked[-1], short_name=rng.choice(info["short_names"]), category=info["category"],
            subcategory=info["subcategory"],
        ))
    return captions


def measured_colour(image: np.ndarray, min_share: float = 0.6, min_coverage: float = 0.05) -> Optional[str]:
    """The named hue (metrics.HUE_RANGES) of an emoji when one hue holds `min_share` of its
    colourful pixels and those cover `min_coverage` of the image; None for mixed or colourless ones."""
    hues = metrics.colourful_hues(to_tensor(image[None]))
    counts = metrics.hue_counts(hues)
    name = max(counts, key=counts.get)
    if len(hues) < min_coverage * image.shape[0] * image.shape[1] or counts[name] < min_share * len(hues):
        return None
    return name


def fills_corners(image: np.ndarray, inset: float = 0.1, min_fill: float = 0.9) -> bool:
    """Whether an emoji is a square tile (keycaps, buttons, signs, scenes): patches near its four
    corners are `min_fill` non-white. A tile's one hue is its background's."""
    size = image.shape[0]
    start, end = round(inset * size), round(2 * inset * size)
    corners = [image[start:end, start:end], image[start:end, -end:-start],
               image[-end:-start, start:end], image[-end:-start, -end:-start]]
    return float(np.mean([(patch.min(-1) < 230).mean() for patch in corners])) >= min_fill


def _range_centre(name: str) -> float:
    start, end = metrics.HUE_RANGES[name]
    return ((start + end + (360 if end < start else 0)) / 2) % 360


def rotate_hue(image: np.ndarray, degrees: float) -> np.ndarray:
    """The image with every hue turned by `degrees` (HSV; whites and greys have no hue and stay)."""
    hsv = np.array(Image.fromarray(image).convert("HSV"))
    hsv[..., 0] = (hsv[..., 0].astype(np.int64) + round(degrees / 360 * 256)) % 256
    return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))


def _rotatable(info: dict, colour: Optional[str]) -> bool:
    """One clear hue, a thing whose colour is arbitrary (ROTATION_CATEGORIES), not a square tile (a
    turned tile would caption its symbol with the background's colour: "a yellow star" on a yellow
    square), and a name whose colour word (if any) is that hue."""
    if colour is None or info.get("tile") or "skin tone" in info["name"]:
        return False
    if info["category"] not in ROTATION_CATEGORIES and info["subcategory"] not in ROTATION_SUBCATEGORIES:
        return False
    said = set(info["name"].split()) & COLOUR_WORDS
    return not said or said == {colour}


def hue_variants(image: np.ndarray, info: dict, count: int, rng: random.Random) -> list[tuple[np.ndarray, dict]]:
    """Up to `count` hue-rotated copies of a one-hue emoji, each to another of ROTATION_COLOURS,
    with the colour word of its name rewritten (or added) to the hue measured on the new pixels:
    colour words then bind to colours, not to the shapes that happen to wear them."""
    colour = measured_colour(image) if count > 0 else None
    if not _rotatable(info, colour):
        return []
    hues = metrics.colourful_hues(to_tensor(image[None]))
    radians = torch.deg2rad(hues)
    mean = float(torch.rad2deg(torch.atan2(radians.sin().mean(), radians.cos().mean()))) % 360
    variants = []
    for target in rng.sample([c for c in ROTATION_COLOURS if c != colour], k=count):
        rotated = rotate_hue(image, _range_centre(target) - mean)
        if measured_colour(rotated) != target:
            continue
        words = info["name"].split()
        name = " ".join(target if w == colour else w for w in words) if colour in words else f"{target} {info['name']}"
        variants.append((rotated, {**info, "name": name, "colour": None, "hue_shift": round(_range_centre(target) - mean, 1)}))
    return variants


def mirrorable(record: dict) -> bool:
    """Whether the emoji's mirror image is still what its captions say (a cat, a pizza), so that
    training may show it flipped left to right: not a flag, symbol or tile, no side or time in its name."""
    if record["category"] in NO_MIRROR_CATEGORIES or record.get("tile"):
        return False
    return not set(record["name"].replace(",", " ").split()) & SIDED_WORDS


def _emoji_image(payload: bytes, size: int) -> np.ndarray:
    """An emoji image (PNG, WebP, or SVG drawn at `size` by resvg) composited over white, uint8
    RGB, `size` pixels square."""
    if payload.lstrip().startswith((b"<svg", b"<?xml")):
        try:
            import resvg_py
        except ImportError:
            raise LatentgenError("drawing SVG emoji needs resvg-py: pip install 'latentgen[train]'") from None
        payload = bytes(resvg_py.svg_to_bytes(svg_string=payload.decode(), width=size, height=size))
    image = Image.open(io.BytesIO(payload)).convert("RGBA")
    canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
    image = Image.alpha_composite(canvas, image).convert("RGB")
    return np.asarray(image if image.size == (size, size) else image.resize((size, size), Image.LANCZOS))


def _bare(unified: str) -> str:
    """A code point sequence without variation selectors, which old and new tables spell differently."""
    return unified.upper().replace("-FE0F", "")


def _image_files(tar: tarfile.TarFile, source: EmojiSource) -> dict[str, str]:
    """The image of every emoji and skin-tone variant a package draws, by bare code point sequence:
    listed by emoji-datasource's emoji.json, or named by its code points."""
    if source.vendor is None:
        folder = f"package/{source.images}/"
        return {_bare(PurePosixPath(name).stem): name.removeprefix("package/")
                for name in tar.getnames() if name.startswith(folder)}
    return {_bare(entry["unified"]): f"{source.images}/{entry['image']}"
            for record in json.loads(_tar_member(tar, "emoji.json"))
            for entry in [record, *record.get("skin_variations", {}).values()]
            if entry.get(f"has_img_{source.vendor}", True)}


def read_emoji_package(tgz: Path, set_name: str, keywords: dict, size: int, captions: int,
                       rng: random.Random, variants: int = 0, skin_tones: Optional[int] = None,
                       table: Optional[list[dict]] = None) -> tuple[list[np.ndarray], list[dict]]:
    """Every emoji image of one emoji-datasource tarball with its captions, and `variants`
    hue-rotated copies of each one-hue emoji (hue_variants). Names and categories come from
    `table` (the current emoji.json; default the tarball's own), so that an old package's drawings
    are described like the new ones. Of an emoji's skin-tone variants, `skin_tones` picked at
    random are kept (all for None): they differ in colour alone, and all five (25 for two people)
    would give people a third of the set and every other shape less."""
    images, records = [], []
    source = EMOJI_SETS[set_name]

    def add(image: np.ndarray, info: dict, file: str) -> None:
        images.append(image)
        records.append({"set": set_name, "style": source.style, "image": file, **info,
                        "captions": emoji_captions(info, source.style, rng, captions)})

    with tarfile.open(tgz) as tar:
        files = _image_files(tar, source)
        for record in table or json.loads(_tar_member(tar, "emoji.json")):
            tones = list(record.get("skin_variations", {}))
            if skin_tones is not None:
                tones = rng.sample(tones, k=min(skin_tones, len(tones)))
            for tone_key in ["", *tones]:
                entry = record if not tone_key else record["skin_variations"][tone_key]
                member = files.get(_bare(entry["unified"]))
                payload = _tar_member(tar, member) if member else None
                if payload is None:
                    continue
                file = PurePosixPath(member).name
                image = _emoji_image(payload, size)
                info = {**describe_emoji(record, keywords, tone_key), "tile": fills_corners(image)}
                colour = measured_colour(image)
                said = set(info["name"].split()) & COLOUR_WORDS
                add(image, {**info, "colour": colour if not said and "skin tone" not in info["name"] else None},
                    file)
                for rotated, rotated_info in hue_variants(image, info, variants, rng):
                    add(rotated, rotated_info, file)
    return images, records


def prepare_emoji(dst: Path, version: str = EMOJI_VERSION, size: int = 64, captions: int = 2, seed: int = 0,
                  variants: int = 2, encoder: Optional[Callable[[list[str]], torch.Tensor]] = None, batch: int = 64,
                  progress: Optional[Callable[[int, int], None]] = None, skin_tones: Optional[int] = 1,
                  sets: Sequence[str] = tuple(EMOJI_SETS)) -> Path:
    """Fetch the emoji `sets` (EMOJI_SETS) with npm and write emoji.npz (uint8 [N, size, size, 3])
    and emoji.json (name, style, keywords, measured colour and `captions` per image), `variants`
    hue-rotated copies of each one-hue emoji and `skin_tones` skin-tone variants of each emoji
    included (read_emoji_package), every set described by the `version` table; with an `encoder`,
    also the text contexts of every caption as emoji-contexts.npy (fp16 [N * captions, L, D],
    image-major) and of the empty prompt as emoji-empty-context.npy."""
    unknown = set(sets) - set(EMOJI_SETS)
    if unknown:
        raise LatentgenError(f"unknown emoji sets {sorted(unknown)}; known: {', '.join(EMOJI_SETS)}")
    rng = random.Random(seed)
    packages = {name: (EMOJI_SETS[name].package, EMOJI_SETS[name].version or version) for name in sets}
    pinned = sorted({*packages.values(), (EMOJI_TABLE, version)})
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        npm_pack([f"{package}@{pin}" for package, pin in pinned] + [EMOJI_KEYWORDS], folder)
        tarballs = {(package, pin): folder / _tarball_name(package, pin) for package, pin in pinned}
        with tarfile.open(next(folder.glob("emojilib-*.tgz"))) as tar:
            keywords = json.loads(_tar_member(tar, "dist/emoji-en-US.json"))
        with tarfile.open(tarballs[EMOJI_TABLE, version]) as tar:
            table = json.loads(_tar_member(tar, "emoji.json"))
        images, records = [], []
        for set_name in sets:
            set_images, set_records = read_emoji_package(tarballs[packages[set_name]], set_name, keywords, size,
                                                         captions, rng, variants, skin_tones, table)
            images += set_images
            records += set_records
    dst.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(dst / "emoji.npz", images=np.stack(images))
    (dst / "emoji.json").write_text(json.dumps({"version": version, "seed": seed, "size": size,
                                                "captions_per_image": captions, "hue_variants": variants,
                                                "skin_tones": skin_tones, "sets": list(sets),
                                                "emoji": records}))
    if encoder is not None:
        texts = [caption for record in records for caption in record["captions"]]
        np.save(dst / "emoji-contexts.npy", encode_texts(encoder, texts, batch, progress))
        np.save(dst / "emoji-empty-context.npy", encode_texts(encoder, [""], 1)[0])
    return dst / "emoji.npz"


def encode_texts(encoder: Callable[[list[str]], torch.Tensor], texts: list[str], batch: int = 64,
                 progress: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
    """Contexts of `texts` in fp16, `batch` at a time."""
    out = None
    for start in range(0, len(texts), batch):
        with torch.no_grad():
            context = encoder(texts[start:start + batch]).to(torch.float16).cpu().numpy()
        if out is None:
            out = np.empty((len(texts), *context.shape[1:]), dtype=np.float16)
        out[start:start + len(context)] = context
        if progress is not None:
            progress(min(start + batch, len(texts)), len(texts))
    return out


@dataclass
class EmojiSet:
    """The prepared emoji: images, one caption list per image, cached contexts when prepared,
    which images may be shown mirrored (`mirrors`, by `mirrorable`; None: none) and each image's
    CLDR category (None: not known)."""

    images: np.ndarray
    captions: list[list[str]]
    contexts: Optional[np.ndarray] = None
    empty_context: Optional[np.ndarray] = None
    mirrors: Optional[np.ndarray] = None
    categories: Optional[list[str]] = None

    @classmethod
    def load(cls, folder: Path, use_contexts: bool = True) -> "EmojiSet":
        if not (folder / "emoji.npz").is_file():
            raise LatentgenError(f"{folder} has no emoji.npz: run `latentgen train prepare-emoji` first")
        images = np.load(folder / "emoji.npz")["images"]
        records = json.loads((folder / "emoji.json").read_text())["emoji"]
        contexts = empty = None
        if use_contexts and (folder / "emoji-contexts.npy").is_file():
            contexts = np.load(folder / "emoji-contexts.npy", mmap_mode="r")
            empty = np.load(folder / "emoji-empty-context.npy")
        return cls(images, [r["captions"] for r in records], contexts, empty,
                   np.array([mirrorable(r) for r in records], dtype=bool), [r["category"] for r in records])

    def fingerprint(self) -> str:
        """A hash of the images, so that what was computed from them (cached latents) is not
        mistaken for another set's."""
        return hashlib.blake2b(np.ascontiguousarray(self.images).tobytes(), digest_size=6).hexdigest()

    def draw(self, batch: int, generator: torch.Generator, category_power: float = 1.0) -> torch.Tensor:
        """`batch` random image indices. A category of n images is drawn in proportion to
        n ** `category_power`: 1 draws every image equally often, 0 every category, and between them
        the large categories (people, flags, objects) give way to the small ones users ask for most
        (food, animals), as XLM's exponent smooths its language mix (Conneau & Lample 2019)."""
        if category_power == 1.0 or self.categories is None:
            return torch.randint(len(self.images), (batch,), generator=generator)
        weights = self._category_sizes ** (category_power - 1.0)
        return torch.multinomial(weights, batch, replacement=True, generator=generator)

    @functools.cached_property
    def _category_sizes(self) -> torch.Tensor:
        """The number of images in each image's category, counted once rather than every step."""
        _, inverse, counts = np.unique(np.array(self.categories), return_inverse=True, return_counts=True)
        return torch.from_numpy(counts[inverse].astype(np.float64))

    def pick_captions(self, indices: torch.Tensor, generator: torch.Generator) -> tuple[list[str], list[int]]:
        """One random caption per image, and its row in `contexts`."""
        per_image = len(self.captions[0])
        choice = torch.randint(per_image, (len(indices),), generator=generator).tolist()
        rows = [int(i) * per_image + c for i, c in zip(indices.tolist(), choice)]
        return [self.captions[int(i)][c] for i, c in zip(indices.tolist(), choice)], rows


def emoji_mosaic(images: np.ndarray, batch: int, tiles: int, generator: torch.Generator) -> torch.Tensor:
    """[B, 3, tiles * s, tiles * s] grids of random emoji at their native size s: sharp-edged
    high-resolution targets for super-resolution, never upsampled."""
    indices = torch.randint(len(images), (batch, tiles * tiles), generator=generator)
    x = to_tensor(images[indices.reshape(-1).numpy()])
    size = x.shape[-1]
    x = x.reshape(batch, tiles, tiles, 3, size, size).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(batch, 3, tiles * size, tiles * size)


# ---- inpainting masks -----------------------------------------------------------------------

MASK_COVERAGE = (0.05, 0.6)


def _stroke(height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """A thick random polyline (LaMa's irregular masks): 1-5 segments, width 1/16 to 1/5 of the side."""
    side = min(height, width)
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    radius = side * (1 / 32 + torch.rand((), generator=generator) * (1 / 10 - 1 / 32))
    point = torch.rand(2, generator=generator) * torch.tensor([height, width], dtype=torch.float32)
    angle = torch.rand((), generator=generator) * 2 * torch.pi
    mask = torch.zeros(height, width, dtype=torch.bool)
    for _ in range(int(torch.randint(1, 6, (), generator=generator))):
        angle = angle + (torch.rand((), generator=generator) - 0.5) * torch.pi
        length = side * (0.1 + 0.3 * torch.rand((), generator=generator))
        end = point + length * torch.stack([torch.sin(angle), torch.cos(angle)])
        direction = end - point
        along = (((ys - point[0]) * direction[0] + (xs - point[1]) * direction[1]) / direction.square().sum()).clamp(0, 1)
        distance = (ys - point[0] - along * direction[0]).square() + (xs - point[1] - along * direction[1]).square()
        mask |= distance <= radius**2
        point = end
    return mask


def _box(height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """A random rectangle, 10% to 50% of each side."""
    h, w = (int(s * (0.1 + 0.4 * float(torch.rand((), generator=generator)))) for s in (height, width))
    top = int(torch.randint(height - h + 1, (), generator=generator))
    left = int(torch.randint(width - w + 1, (), generator=generator))
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[top:top + h, left:left + w] = True
    return mask


def random_mask(height: int, width: int, generator: torch.Generator,
                coverage: tuple[float, float] = MASK_COVERAGE) -> torch.Tensor:
    """A LaMa-style training mask [1, H, W] (1 = fill): thick strokes and boxes, redrawn until the
    covered fraction lies in `coverage`."""
    while True:
        mask = torch.zeros(height, width, dtype=torch.bool)
        for _ in range(int(torch.randint(1, 4, (), generator=generator))):
            mask |= _stroke(height, width, generator)
        for _ in range(int(torch.randint(0, 3, (), generator=generator))):
            mask |= _box(height, width, generator)
        if coverage[0] <= float(mask.float().mean()) <= coverage[1]:
            return mask[None].float()


def random_masks(batch: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    return torch.stack([random_mask(height, width, generator) for _ in range(batch)])


# ---- super-resolution degradation (the paper's "bsr-light") ---------------------------------


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(3 * sigma + 0.5))
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-taps.square() / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    x = F.pad(x, (radius,) * 4, mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)


def jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """A JPEG round trip of one [3, H, W] image in [-1, 1]."""
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(x[None])[0]).save(buffer, format="JPEG", quality=quality)
    return to_tensor(np.asarray(Image.open(buffer).convert("RGB"))[None])[0].to(x)


def downsample(image: torch.Tensor, factor: int) -> torch.Tensor:
    """A clean antialiased bicubic x`factor` downsample (the SR benchmarks' protocol), in [-1, 1]."""
    return F.interpolate(image, scale_factor=1 / factor, mode="bicubic", antialias=True).clamp(-1, 1)


def degrade(hr: torch.Tensor, factor: int, generator: torch.Generator) -> torch.Tensor:
    """Low-resolution inputs for SR training, per image: Gaussian blur (sigma 0.2-1.2, half the
    time), bicubic antialiased downsampling by `factor`, Gaussian noise (std up to 0.04, half the
    time) and JPEG (quality 60-95, half the time); [B, 3, H/f, W/f] in [-1, 1]."""
    out = []
    for image in hr:
        image = image[None]
        if torch.rand((), generator=generator) < 0.5:
            image = gaussian_blur(image, 0.2 + float(torch.rand((), generator=generator)))
        size = (hr.shape[-2] // factor, hr.shape[-1] // factor)
        image = F.interpolate(image, size=size, mode="bicubic", antialias=True, align_corners=False)
        if torch.rand((), generator=generator) < 0.5:
            std = 0.04 * float(torch.rand((), generator=generator))
            image = image + std * torch.randn(image.shape, generator=generator).to(image)
        image = image.clamp(-1, 1)
        if torch.rand((), generator=generator) < 0.5:
            image = jpeg(image[0], int(torch.randint(60, 96, (), generator=generator)))[None]
        out.append(image)
    return torch.cat(out)
