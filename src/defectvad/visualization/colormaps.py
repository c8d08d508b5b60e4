# src/defectvad/visualization/colormaps.py
import numpy as np


def create_jet_table(size=256):
    # the classic jet: dark blue, blue, cyan, yellow, red, dark red; (size, 3) uint8
    x = np.linspace(0.0, 1.0, size)
    channels = [np.clip(1.5 - np.abs(4 * x - centre), 0, 1) for centre in (3, 2, 1)]
    return (np.stack(channels, axis=1) * 255 + 0.5).astype(np.uint8)


JET = create_jet_table()


def colorize(values, low, high, table=JET):
    # values (H, W) -> (H, W, 3) uint8; one fixed scale [low, high] so colours compare across images
    values = np.asarray(values, dtype=np.float64)
    span = high - low if high > low else 1.0
    index = np.clip((values - low) / span, 0, 1) * (len(table) - 1)
    return table[np.rint(index).astype(np.int64)]
