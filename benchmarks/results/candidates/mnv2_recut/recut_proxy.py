"""Proxy: each model at its own counting threshold (Sp>=0.995 on val NIH crops): Se/Sp on val NIH crops,
on val re-cut crops (by contact), and false positives among the real slide's found cells."""
import sys, glob
from pathlib import Path
import numpy as np, keras
from train.data import load_prepared
from edge.images import load_image
from edge.detect import detect, crop, DetectParams
from edge.preprocess import resize_rgb

d = load_prepared("data/prepared")
va = d.indices("val")
xv, yv = np.asarray(d.images[va]), d.labels[va]
z = np.load("/tmp/scratch/rt/recut_val.npz")
real = Path("/tmp/scratch/rt/real_crops.npy")
if not real.exists():
    cs = []
    for f in sorted(glob.glob("../shared/data/nih_fields/239C12NThinF/Img/*.jpg")):
        rgb = load_image(f)
        det = detect(rgb, DetectParams())
        cs += [resize_rgb(crop(rgb, c), 128) for c in det.cells if c.status == "ok"]
    np.save(real, np.stack(cs))
xr = np.load(real)
for path in sys.argv[1:]:
    m = keras.models.load_model(path, compile=False)
    pr = lambda x: m.predict(x.astype(np.float32), batch_size=128, verbose=0)[:, 0]
    pv, pz, prl = pr(xv), pr(z["x"]), pr(xr)
    neg = np.sort(pv[yv == 0])
    thr = neg[int(np.ceil(0.995 * len(neg))) - 1] + 1e-7
    se = np.mean(pv[yv == 1] >= thr); sp = np.mean(pv[yv == 0] < thr)
    from sklearn.metrics import roc_auc_score
    zy, sh = z["y"], z["shared"]
    cz = pz >= thr
    line = (f"{path}: thr {thr:.4f} | val crops Se {se:.3f} Sp {sp:.4f} AUC {roc_auc_score(yv, pv):.4f} acc@.5 {np.mean((pv>=.5)==yv):.4f}"
            f" | val recut Se {np.mean(cz[zy==1]):.3f} Sp {np.mean(~cz[zy==0]):.4f} AUC {roc_auc_score(zy, pz):.4f}")
    for lo, hi in ((0, 1e-9), (1e-9, .05), (.05, .1), (.1, 2)):
        s = (sh >= lo) & (sh < hi)
        line += f" | sh[{lo:.2f},{hi:.2f}) Se {np.mean(cz[s & (zy==1)]):.3f} Sp {np.mean(~cz[s & (zy==0)]):.4f}"
    line += f" | real FP {int(np.sum(prl >= thr))}/{len(prl)}"
    print(line, flush=True)
