"""The self-contained HTML comparison report: inline CSS, thumbnails as base64 data URIs, every
caption escaped. Opens from a file with no network and no JavaScript."""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import math
from collections.abc import Mapping, Sequence

import pandas as pd

THUMB_PX = 160
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d1d1f;background:#fafafa}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px}
.meta{color:#666;font-size:13px;margin-bottom:16px}
table{border-collapse:collapse;background:#fff;font-size:13px}
th,td{border:1px solid #ddd;padding:6px 8px;vertical-align:top;text-align:left}
th{background:#f0f0f3}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.cap{max-width:360px;white-space:pre-wrap;word-wrap:break-word}
td.err{color:#b00020;font-style:italic;max-width:360px}
td.img{width:{cell}px;text-align:center} img{max-width:{thumb}px;max-height:{thumb}px}
.noimg{color:#999;font-size:12px} .id{font-family:ui-monospace,monospace;font-size:12px;word-break:break-all}
""".replace("{cell}", str(THUMB_PX + 8)).replace("{thumb}", str(THUMB_PX))


def thumbnail_data_uri(source, px: int = THUMB_PX) -> str | None:
    """A small JPEG of the image as a data URI, or None when it cannot be read (broken files,
    decompression bombs: Pillow's own pixel limit stays in force here)."""
    if not isinstance(source, str) or not source:
        return None
    try:
        from PIL import Image, ImageOps

        with Image.open(source) as im:
            im.draft("RGB", (px * 2, px * 2))  # JPEG: decode at reduced scale
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                im = im.convert("I").point(lambda v: v / 256).convert("L")
            if im.mode in ("RGBA", "LA", "P", "PA"):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im)
            im = im.convert("RGB")
            im.thumbnail((px, px))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=80)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    except Exception:
        return None


def _e(x) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _fmt(v: float) -> str:
    return "–" if math.isnan(v) else f"{v:.3f}"


_STAT_NAMES = {
    "rows": "rows",
    "captions": "captions",
    "errors": "errors",
    "mean_words": "mean words",
    "mean_new_tokens": "mean new tokens",
    "mean_latency_s": "mean latency (s)",
    "backend": "backend",
    "images_per_s": "images/s",
    "output_tokens_per_s": "output tokens/s",
    "max_running_seen": "most sequences in a step",
    "mean_batch": "mean decode batch",
    "busy_fraction": "engine busy",
    "load_s": "load (s)",
    "peak_vram_bytes": "peak VRAM (MiB)",
    "reclaim_residual_bytes": "reclaim residual (MiB)",
    "restarts": "restarts",
}


def _stat_cell(col: str, v) -> str:
    if hasattr(v, "item"):
        v = v.item()
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if col.endswith("_bytes"):
        return "–" if (col == "peak_vram_bytes" and not v) else f"{v / (1 << 20):,.1f}"
    if isinstance(v, float):
        if col == "busy_fraction":
            return f"{v:.0%}"
        return f"{v:,.2f}" if col in ("images_per_s", "load_s", "output_tokens_per_s", "mean_batch") else f"{v:.3f}"
    return _e(v)


def _stats_table(stats: pd.DataFrame) -> str:
    cols = list(stats.columns)
    head = "".join(f"<th>{_e(_STAT_NAMES.get(c, c))}</th>" for c in ["model", *cols])
    body = []
    for m, row in stats.iterrows():
        cells = "".join(f'<td class="num">{_stat_cell(c, row[c])}</td>' for c in cols)
        body.append(f"<tr><td>{_e(m)}</td>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _agreement_table(name: str, mat: pd.DataFrame) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in ["", *mat.columns])
    body = []
    for a, row in mat.iterrows():
        cells = []
        for v in row:
            shade = "" if math.isnan(v) else f' style="background:rgba(46,125,50,{0.1 + 0.5 * v:.2f})"'
            cells.append(f'<td class="num"{shade}>{_fmt(float(v))}</td>')
        body.append(f"<tr><th>{_e(a)}</th>{''.join(cells)}</tr>")
    return f"<h3>{_e(name)}</h3><table><tr>{head}</tr>{''.join(body)}</table>"


def _captions_table(table: pd.DataFrame, models: Sequence[str], max_images: int) -> tuple[str, int]:
    head = "".join(f"<th>{_e(m)}</th>" for m in ["image", "prompt", *models])
    rows = []
    shown = 0
    for image_id, grp in table.groupby("image_id", sort=False):
        if shown >= max_images:
            break
        shown += 1
        uri = thumbnail_data_uri(grp["source"].iloc[0])
        img = f'<img alt="{_e(image_id)}" src="{uri}">' if uri else '<span class="noimg">no preview</span>'
        first = True
        for _, r in grp.iterrows():
            cells = []
            for m in models:
                err = r[f"{m}.error"]
                if err is not None and not (isinstance(err, float) and math.isnan(err)):
                    cells.append(f'<td class="err">error: {_e(err)}</td>')
                else:
                    cells.append(f'<td class="cap">{_e(r[m])}</td>')
            lead = (
                f'<td class="img" rowspan="{len(grp)}">{img}<div class="id">{_e(image_id)}</div></td>' if first else ""
            )
            first = False
            rows.append(f"<tr>{lead}<td>{_e(r['prompt_id'])}</td>{''.join(cells)}</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>", shown


def render_report(
    *,
    title: str,
    table: pd.DataFrame,
    models: Sequence[str],
    stats: pd.DataFrame,
    agreement: Mapping[str, pd.DataFrame],
    max_images: int,
    meta: Mapping,
) -> str:
    n_images = table["image_id"].nunique()
    captions, shown = _captions_table(table, models, max_images)
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    meta_line = " · ".join(f"{_e(k)}: {_e(v)}" for k, v in meta.items())
    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<div class="meta">{len(models)} model(s) · {n_images} image(s) · generated {when}'
        + (f" · {meta_line}" if meta_line else "")
        + "</div>",
        "<h2>Per-model statistics</h2>",
        _stats_table(stats),
    ]
    if agreement:
        parts.append("<h2>Pairwise agreement between models' captions</h2>")
        parts.append(
            '<div class="meta">word_similarity: 1 − normalized word-level edit distance; '
            "token_set: bag-of-words overlap (rapidfuzz token_set_ratio). Mean over images both "
            "models captioned.</div>"
        )
        parts += [_agreement_table(k, v) for k, v in agreement.items()]
    parts.append("<h2>Captions</h2>")
    if shown < n_images:
        parts.append(
            f'<div class="meta">showing the first {shown} of {n_images} images; '
            "comparison.parquet has all of them</div>"
        )
    parts += [captions, "</body></html>"]
    return "\n".join(parts)
