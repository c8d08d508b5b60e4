# tools/panel_sheet.py
# one picture of the panel data set: a row per defect type, a column per severity level; each cell shows a crop
# around the defect as written (left) and with its contrast stretched 8x, the mask outlined just outside (right)
import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from defectvad.data.panel_generator import DEFECT_TYPES, generate_panel_dataset, read_defects  # noqa: E402
from defectvad.data.panel_severity import LEVELS  # noqa: E402

CROP, ZOOM, STRETCH, LABEL = 96, 2, 8.0, 18
OUTLINE = np.array([255, 40, 40], np.uint8)


def read_rgb(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def crop_around(array, record):
    size = array.shape[0]
    x0 = int(np.clip(round(record["centroid_x"]) - CROP // 2, 0, size - CROP))
    y0 = int(np.clip(round(record["centroid_y"]) - CROP // 2, 0, size - CROP))
    return array[y0:y0 + CROP, x0:x0 + CROP]


def stretch(crop):
    values = crop.astype(np.float32)
    centred = values - np.median(values.reshape(-1, 3), axis=0)
    return np.clip(128 + STRETCH * centred, 0, 255).astype(np.uint8)


def outline(crop, mask):
    # the ring of pixels just outside the mask, so the outline never hides the defect
    ring = ndimage.binary_dilation(mask) & ~mask
    drawn = crop.copy()
    drawn[ring] = OUTLINE
    return drawn


def draw_cell(folder, record):
    image = crop_around(read_rgb(folder / record["image"]), record)
    mask = crop_around(read_rgb(folder / record["mask"])[..., 0] > 127, record)
    mask = mask.repeat(ZOOM, 0).repeat(ZOOM, 1)
    plain = image.repeat(ZOOM, 0).repeat(ZOOM, 1)
    return np.concatenate([plain, outline(stretch(image).repeat(ZOOM, 0).repeat(ZOOM, 1), mask)], axis=1)


def draw_sheet(folder):
    records = {(r["type"], r["level"]): r for r in read_defects(folder)}
    cell_w, cell_h, gap = 2 * CROP * ZOOM, CROP * ZOOM + LABEL, 8
    sheet = Image.new("RGB", (len(LEVELS) * (cell_w + gap) + 90, len(DEFECT_TYPES) * (cell_h + gap) + LABEL),
                      (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for column, level in enumerate(LEVELS):
        draw.text((90 + column * (cell_w + gap) + cell_w // 2 - 20, 2), f"level {level}", fill=(0, 0, 0))
    for row, defect_type in enumerate(DEFECT_TYPES):
        top = LABEL + row * (cell_h + gap)
        draw.text((4, top + cell_h // 2), defect_type, fill=(0, 0, 0))
        for column, level in enumerate(LEVELS):
            record = records.get((defect_type, level))
            if record is None:
                continue
            left = 90 + column * (cell_w + gap)
            sheet.paste(Image.fromarray(draw_cell(folder, record)), (left, top))
            text = (f"C {record['contrast_pct']:.1f}%  A {record['area_px']}px  SEMU {record['severity_index']:.2f}  "
                    f"{record['polarity']} {record['shape']}")
            draw.text((left + 2, top + CROP * ZOOM + 3), text, fill=(0, 0, 0))
    return sheet


def main(argv=None):
    parser = argparse.ArgumentParser(description="draw each defect type at each level of a panel category")
    parser.add_argument("--root", default="datasets/panel", help="the panel data set folder (written if missing)")
    parser.add_argument("--category", default="plain")
    parser.add_argument("--out", required=True, help="PNG file to write")
    args = parser.parse_args(argv)
    try:
        generate_panel_dataset(args.root, [args.category])
        draw_sheet(Path(args.root) / args.category).save(args.out)
    except Exception as error:
        from defectvad.errors import report_user_error

        return report_user_error(error)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
