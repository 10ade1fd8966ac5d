"""Parasitemia that can be trusted: the positive share corrected for the classifier's errors, with a 95%
interval that carries both the sampling of cells and the uncertainty of sensitivity and specificity.

The raw share of positive calls overstates a low parasitemia: at specificity 0.96 a smear at 1% reads
as ~5%. Rogan–Gladen inverts the confusion matrix: p = (q + Sp − 1) / (Se + Sp − 1), where q is the
positive share and Se, Sp were measured on validation (their counts are in the model card). The
interval comes from Monte Carlo over Jeffreys posteriors of q, Se and Sp (a fixed seed, so a result
is reproducible); the estimate and its bounds are clamped to [0, 100] %. With no positive call at all,
or no more than false positives explain, the upper bound is at least the rule of three divided by the
sensitivity: 3 / (n · Se).

A smear is one patient, and the classifier's rates differ from patient to patient more than the
sampling of their cells explains (validation: sensitivity 0.72–0.95 among patients with ≥ 10 infected
cells). Where the card has each validation patient's counts, the Monte Carlo draws this patient's Se
and Sp around the pooled ones with the between-patient variance they show (beta-binomial, method of
moments), so the interval also carries how far this patient's rates may lie from the average. In field
mode the rates differ between patients more than on their crops (the re-cut costs some patients more than
others); where the card has that spread, measured on synthetic fields of the validation patients
(`field_spread`), the larger of the two is drawn with.

Field mode also reads infected cells less often than their own crops: the crop it cuts from a field leaves
out the part of a touching cell the split gave to its neighbour, where a parasite on the rim often is.
Where the card has it (`field_spread`'s `recut`: on synthetic fields, how many of the found infected cells
field mode called and how many their own crops were called; for the shipped model cross-fitted over every
train/val patient, `benchmarks/crossfit.py`), sensitivity is scaled by that share, whose sampling is drawn
with the rest. Specificity is not scaled: on the real healthy slide field mode's false-positive rate is no
higher than the card's.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

RBC_PER_UL = 5_000_000  # a typical adult red-cell count; the user can give the patient's own
COUNT_KEYS = ("tp", "fn", "tn", "fp")


@dataclass
class Estimate:
    rbc_count: int
    positive_count: int
    raw_percent: float  # positive calls / red cells
    parasitemia_percent: float  # corrected, clamped to [0, 100]
    parasitemia_ci95: tuple[float, float]  # percent
    parasites_per_ul: float
    parasites_per_ul_ci95: tuple[float, float]
    rbc_per_ul: float
    sensitivity: float  # of the operating point, on validation
    specificity: float
    method: str
    sensitivity_used: float | None = None  # what the correction divided by: the above times what the re-cut keeps

    def as_dict(self) -> dict:
        d = asdict(self)
        d["parasitemia_ci95"] = list(self.parasitemia_ci95)
        d["parasites_per_ul_ci95"] = list(self.parasites_per_ul_ci95)
        return d


def sensitivity_specificity(counts: dict) -> tuple[float, float]:
    """The rates an operating point's confusion counts {tp, fn, tn, fp} give."""
    tp, fn, tn, fp = (int(counts[k]) for k in COUNT_KEYS)
    return tp / (tp + fn), tn / (tn + fp)


def check_recut(recut) -> tuple[int, int, int]:
    """The re-cut counts (field mode's calls, their own crops' calls, infected cells) as ints: all 0 (not
    scaled), or both calls counted among the infected cells."""
    called_field, called_crops, infected = r = tuple(int(v) for v in recut)
    if any(r) and not (0 < called_field <= infected and 0 < called_crops <= infected):
        raise ValueError(f"the re-cut counts {r} are not (field calls, crop calls, infected cells)")
    return r


def field_rates(counts: dict, recut: tuple[int, int, int] = (0, 0, 0)) -> tuple[float, float]:
    """(Se, Sp) the correction uses: the operating point's, Se scaled by what field mode's crops keep of it
    (recut: field mode's calls, their own crops' calls, infected cells; (0, 0, 0): not scaled)."""
    se, sp = sensitivity_specificity(counts)
    called_field, called_crops, _ = check_recut(recut)
    return (se * called_field / called_crops if called_crops else se), sp


def rogan_gladen(q, se, sp):
    """True prevalence from the apparent one (arrays broadcast), not clamped."""
    return (np.asarray(q, float) + sp - 1) / (se + sp - 1)


def between_patient_variance(successes, trials) -> float:
    """Variance of a rate across patients beyond the binomial sampling of each one's cells (the method of
    moments of the beta-binomial: Kleinman 1973); 0 when the patients agree as well as sampling allows."""
    x, n = np.asarray(successes, float), np.asarray(trials, float)
    x, n = x[n > 0], n[n > 0]
    if len(n) < 2:
        return 0.0
    N = n.sum()
    mu = x.sum() / N
    s = np.sum(n * (x / n - mu) ** 2)
    return float(max(0.0, (s - mu * (1 - mu) * (len(n) - 1)) / (N - np.sum(n ** 2) / N)))


def check_adds_up(counts: dict, by_patient) -> None:
    """Per-patient counts (where there are any) that do not add up to the pooled ones were measured for
    another rule."""
    if by_patient and any(sum(int(b[k]) for b in by_patient) != int(counts[k]) for k in COUNT_KEYS):
        raise ValueError("the per-patient counts do not add up to the operating point's counts")


def _patient_rates(mean_draws: np.ndarray, var: float, rng) -> np.ndarray:
    """One patient's rate per draw: Beta around each drawn mean with the between-patient variance."""
    if var <= 0:
        return mean_draws
    m = np.clip(mean_draws, 1e-6, 1 - 1e-6)
    k = np.maximum(m * (1 - m) / var - 1, 1.0)
    return rng.beta(m * k, (1 - m) * k)


def patient_variances(by_patient: list[dict] | tuple) -> tuple[float, float]:
    """Between-patient variance of (Se, Sp) beyond the sampling of each patient's cells, from each patient's
    confusion counts {tp, fn, tn, fp}."""
    c = {k: np.array([int(b[k]) for b in by_patient]) for k in COUNT_KEYS}
    return (between_patient_variance(c["tp"], c["tp"] + c["fn"]),
            between_patient_variance(c["tn"], c["tn"] + c["fp"]))


def estimate(positive: int, n: int, counts: dict, rbc_per_ul: float = RBC_PER_UL, draws: int = 20_000,
             seed: int = 0, by_patient: list[dict] | tuple = (), confirmed: bool = False,
             spread: tuple[float, float] = (0.0, 0.0), recut: tuple[int, int, int] = (0, 0, 0)) -> Estimate:
    """Corrected parasitemia of `positive` calls among `n` red cells. `counts` are the operating point's
    validation confusion counts {tp, fn, tn, fp}; `by_patient`, where given, the same per validation
    patient (they must add up to `counts`). spread: the least between-patient variance of (Se, Sp) to
    draw this patient's rates with (the card's `field_spread`: how far field mode's rates differ between
    validation patients, more than their crops' do). confirmed: the positives are calls a microscopist
    confirmed, so none is a false positive (Sp = 1) and only the infected cells the classifier missed are
    corrected for: p = q / Se. recut: (field mode's calls, their own crops' calls, infected cells) on
    synthetic fields (the card's field_spread): Se is scaled by the first over the second; (0, 0, 0): not."""
    if n < 0 or not 0 <= positive <= max(n, 0):
        raise ValueError(f"need 0 <= positive <= n, got {positive} of {n}")
    tp, fn, tn, fp = (int(counts[k]) for k in COUNT_KEYS)
    if tp + fn == 0 or tn + fp == 0:
        raise ValueError("the operating point's counts need both infected and uninfected validation cells")
    se_validation = sensitivity_specificity(counts)[0]
    se, sp = field_rates(counts, recut)
    called_field, called_crops, infected = check_recut(recut)
    if confirmed:
        sp = 1.0
    if se + sp <= 1:
        raise ValueError(f"sensitivity {se:.3f} + specificity {sp:.3f} <= 1: the classifier cannot be corrected for")
    if n == 0:
        return Estimate(0, 0, float("nan"), float("nan"), (0.0, 100.0), float("nan"), (0.0, rbc_per_ul), rbc_per_ul,
                        se_validation, sp, "no red cells counted", se)
    q = positive / n
    point = float(np.clip(rogan_gladen(q, se, sp), 0, 1))
    rng = np.random.default_rng(seed)
    q_s = rng.beta(positive + 0.5, n - positive + 0.5, draws)
    se_s = rng.beta(tp + 0.5, fn + 0.5, draws)
    if called_crops:
        se_s = np.minimum(1.0, se_s * rng.beta(called_field + 0.5, infected - called_field + 0.5, draws)
                          / rng.beta(called_crops + 0.5, infected - called_crops + 0.5, draws))
    sp_s = np.ones(draws) if confirmed else rng.beta(tn + 0.5, fp + 0.5, draws)
    var_se, var_sp = spread
    if by_patient:
        check_adds_up(counts, by_patient)
        var_se, var_sp = (max(a, b) for a, b in zip(spread, patient_variances(by_patient)))
    se_s = _patient_rates(se_s, var_se, rng)
    if not confirmed:
        sp_s = _patient_rates(sp_s, var_sp, rng)
    with np.errstate(divide="ignore", invalid="ignore"):
        sims = np.clip(rogan_gladen(q_s, se_s, sp_s), 0, 1)
    sims = sims[np.isfinite(sims)]
    lo, hi = (float(v) for v in np.percentile(sims, [2.5, 97.5]))
    method = "Rogan-Gladen; 95% interval: Monte Carlo over Jeffreys posteriors of the positive share, Se and Sp"
    drawn = (" with the validation patients' spread" + (" in field mode" if any(spread) else "")
             if by_patient or any(spread) else "")
    if drawn:
        method += ", this patient's Se and Sp drawn around them" + drawn
    if confirmed:
        method = ("confirmed calls over sensitivity, q/Se (a microscopist rejected the false positives); 95% "
                  "interval: Monte Carlo over Jeffreys posteriors of q and Se" + (", this patient's Se drawn"
                                                                                  + drawn if drawn else ""))
    if positive == 0:
        lo, hi = 0.0, min(1.0, 3.0 / (n * se))
        method = "no positive call: 0, upper bound by the rule of three over sensitivity, 3/(n*Se)"
    elif point == 0:  # no more positives than false positives explain: as uncertain as finding none
        hi = max(hi, min(1.0, 3.0 / (n * se)))
    if called_crops:
        method += (f"; Se scaled by {called_field / called_crops:.3f}, what field mode's crops keep of the cells' own "
                   "crops' calls on synthetic fields")
    lo, hi = min(lo, point), max(hi, point)
    pct = (100 * point, (100 * lo, 100 * hi))
    return Estimate(n, positive, 100 * q, pct[0], pct[1], point * rbc_per_ul, (lo * rbc_per_ul, hi * rbc_per_ul),
                    rbc_per_ul, se_validation, sp, method, se)


def confirmed_table(calls: int, n: int, counts: dict, by_patient: list[dict] | tuple = (), draws: int = 10_000,
                    spread: tuple[float, float] = (0.0, 0.0),
                    recut: tuple[int, int, int] = (0, 0, 0)) -> list[tuple[float, float, float]]:
    """(percent, low, high) for 0..calls of a session's positive calls confirmed by a microscopist among its
    n red cells: what the report's review shows as the reviewer confirms or rejects each call."""
    rows = []
    for k in range(calls + 1):
        e = estimate(k, n, counts, draws=draws, by_patient=by_patient, confirmed=True, spread=spread, recut=recut)
        rows.append((e.parasitemia_percent, *e.parasitemia_ci95))
    return rows
