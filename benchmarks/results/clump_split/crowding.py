"""Detection recall/precision on the 4 real photos and on synthetic fields of one split at 3 densities, and the share
of detections holding two or more cells (recall counts a cell merged with its neighbour as found)."""
import sys, numpy as np, time
from pathlib import Path
from train.data import load_prepared
from train.synthetic import SynthParams, load_crops, make_field
from train.fieldscore import score, GTPoint, read_point_set, exif_orientation
from edge import detect
from edge.images import load_image

def real(fn=detect.detect):
    root = Path("../shared/data/nih_fields"); tot = np.zeros(5)
    for img in sorted(root.rglob("Img/*.jpg")):
        rgb = load_image(img)
        pts = read_point_set(img.parent.parent / "GT" / f"{img.stem}.txt", exif_orientation(img))
        det = fn(rgb); s = score(det.cells, pts, det.eyepiece, det.scale)
        tot += [s.gt, s.found, s.detections, s.correct, s.merged]
    return tot

_groups = {}
def synth(split, fn=detect.detect, dens=("normal", "crowded", "dense"), n_per=1):
    if split not in _groups:
        d = load_prepared(Path("data/prepared")); idx = d.indices(split)
        g = load_crops(Path("../shared/data/nih_malaria_dev"), [d.relpaths[i] for i in idx], [int(d.labels[i]) for i in idx], [d.groups[i] for i in idx])
        _groups[split] = {k: v for k, v in g.items() if v[0] and v[1]}
    out = {}
    kws = {"normal": {}, "crowded": dict(spacing=(0.75, 0.95), n_cells=400), "dense": dict(spacing=(0.7, 0.9), n_cells=400)}
    var = [dict(), dict(blur=2.0), dict(scale=0.5), dict(eyepiece=True)]
    for name in dens:
        tot = np.zeros(5); k = 0
        for g, (pos, neg) in sorted(_groups[split].items()):
            for j in range(n_per):
                f = make_field(pos, neg, SynthParams(parasitemia=0.05, seed=900 + k, **var[k % 4], **kws[name])); k += 1
                det = fn(f.rgb); s = score(det.cells, [GTPoint(t.x, t.y, t.label) for t in f.truth])
                tot += [s.gt, s.found, s.detections, s.correct, s.merged]
        out[name] = tot
    return out

def fmt(t): return f"recall {t[1]/t[0]:.4f} precision {t[3]/t[2]:.4f} merged {t[4]/t[2]:.4f} (gt {int(t[0])}, detections {int(t[2])})"

if __name__ == "__main__":
    split = sys.argv[1] if len(sys.argv) > 1 else "val"
    t0 = time.time()
    print("real", fmt(real()), flush=True)
    for k, v in synth(split).items(): print(split, k, fmt(v), flush=True)
    print("s", round(time.time() - t0))
