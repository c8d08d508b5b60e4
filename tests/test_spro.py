# tests/test_spro.py
import numpy as np
import pytest

from defectvad.metrics.spro import SproCurves, saturation_area


def direct_au_spro(images, fpr_limit):
    # the official evaluation's definition, threshold by threshold: every distinct score (anomalous: score > t),
    # sPRO = mean over regions of min(overlap / saturation area, 1), FPR over the pixels outside every region
    scores = np.unique(np.concatenate([m.ravel() for m, _ in images]))
    outside = [~np.any([mask for mask, _ in regions], axis=0) if regions else np.ones(m.shape, bool)
               for m, regions in images]
    n_neg = sum(int(o.sum()) for o in outside)
    points = []
    for t in np.concatenate([[np.inf], scores[::-1], [-np.inf]]):
        fp = sum(int(((m > t) & o).sum()) for (m, _), o in zip(images, outside))
        spros = [min(((m > t) & mask).sum() / area, 1.0) for m, regions in images for mask, area in regions]
        points.append((fp / n_neg, float(np.mean(spros))))
    total = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        total += (x1 - x0) * (y0 + y1) / 2
    return total / fpr_limit


def square(size, top, left, side):
    mask = np.zeros((size, size), bool)
    mask[top:top + side, left:left + side] = True
    return mask


def test_saturation_area_follows_the_defects_config_rules():
    # relative: a share of the region, rounded down; absolute: pixels, at most the region; scaled to a resolution
    assert saturation_area(100, 0.5, True) == 50
    assert saturation_area(101, 0.5, True) == 50
    assert saturation_area(100, 40, False) == 40
    assert saturation_area(30, 40, False) == 30
    assert saturation_area(100, 40, False, scale=0.25) == 10
    assert saturation_area(1, 0.5, True) == 1


def test_a_half_covered_region_saturated_at_half_its_area_counts_whole():
    region = square(8, 2, 2, 4)
    anomaly_map = np.zeros((8, 8), np.float32)
    anomaly_map[2:6, 2:4] = 1.0  # the left half of the region, nothing outside it
    curves = SproCurves()
    curves.add(anomaly_map, [(region, saturation_area(16, 0.5, True))], "structural_anomalies")
    # at threshold 0.5 the overlap is 8 pixels = the saturation area, so sPRO is 1 at FPR 0
    assert curves.area("structural_anomalies", 0.05) == pytest.approx(1.0)
    # saturated only at its whole area: sPRO 0.5 at FPR 0, then a straight line to (1, 1) when all pixels are positive
    curves = SproCurves()
    curves.add(anomaly_map, [(region, saturation_area(16, 1.0, True))], "structural_anomalies")
    limit = 0.05
    expected = limit * (0.5 + (0.5 + 0.5 * limit)) / 2 / limit
    assert curves.area("structural_anomalies", limit) == pytest.approx(expected)
    assert expected == pytest.approx(0.5125)


def test_false_positives_of_good_images_lower_the_curve():
    # a good image whose every pixel scores above the defect: at FPR up to 1/2 nothing of the region is found
    region = square(4, 0, 0, 2)
    defect_map = np.zeros((4, 4), np.float32)
    defect_map[0:2, 0:2] = 1.0
    good_map = np.full((4, 4), 2.0, np.float32)
    curves = SproCurves()
    curves.add(defect_map, [(region, 4)], "logical_anomalies")
    curves.add(good_map)
    # negatives: 16 good pixels at 2 and 12 defect-free pixels at 0, so FPR jumps 0 -> 16/28 with sPRO 0
    assert curves.area("logical_anomalies", 0.3) == pytest.approx(0.0)
    assert curves.area("logical_anomalies", 1.0) == pytest.approx(direct_au_spro(
        [(defect_map, [(region, 4)]), (good_map, [])], 1.0))
    # another group's curve has no regions of its own
    assert np.isnan(curves.area("structural_anomalies", 0.05))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_curve_matches_the_threshold_by_threshold_definition(seed):
    rng = np.random.default_rng(seed)
    size = 12
    images = {"logical_anomalies": [], "structural_anomalies": [], None: []}
    for group in images:
        for _ in range(3):
            # scores on a grid of 1/16 with many ties, which the binning keeps exact
            anomaly_map = (rng.integers(0, 40, (size, size)) / 16).astype(np.float32)
            regions = []
            if group is not None:
                for _ in range(rng.integers(1, 4)):
                    # regions may overlap, as LOCO's mask files of one image may
                    mask = square(size, *rng.integers(0, size - 4, 2), rng.integers(2, 5))
                    anomaly_map[mask] += np.float32(rng.integers(0, 20) / 16)
                    area = saturation_area(int(mask.sum()), float(rng.choice([0.3, 0.5, 1.0])), True) \
                        if rng.random() < 0.5 else saturation_area(int(mask.sum()), int(rng.integers(1, 12)), False)
                    regions.append((mask, area))
            images[group].append((anomaly_map, regions))
    curves = SproCurves()
    for group, entries in images.items():
        for anomaly_map, regions in entries:
            curves.add(anomaly_map, regions, group)
    for group in ("logical_anomalies", "structural_anomalies"):
        subset = images[group] + images[None]
        for limit in (0.05, 0.3, 1.0):
            assert curves.area(group, limit) == pytest.approx(direct_au_spro(subset, limit), abs=1e-12)
    # a wrong saturation rule (overlap / region area, no saturation) gives another value
    plain = [(m, [(mask, mask.sum()) for mask, _ in regions]) for m, regions in images["logical_anomalies"]]
    assert direct_au_spro(plain + images[None], 0.3) != pytest.approx(
        direct_au_spro(images["logical_anomalies"] + images[None], 0.3), abs=1e-6)


def test_errors():
    curves = SproCurves()
    with pytest.raises(ValueError, match="does not match"):
        curves.add(np.zeros((4, 4)), [(np.zeros((3, 3), bool), 1)], "logical_anomalies")
    with pytest.raises(ValueError, match="NaN"):
        curves.add(np.full((2, 2), np.nan))
    with pytest.raises(ValueError, match="fpr_limit"):
        curves.area("logical_anomalies", 0)
