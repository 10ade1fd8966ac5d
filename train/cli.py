"""`malaria-edge`: the heavy side (data, train, evaluate, export, bench).

TensorFlow is imported only inside the subcommands that need it, so `--help` and `data` are fast.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from edge.card import CardError
from edge.images import ImageError

_USER_ERRORS = (CardError, ImageError, FileNotFoundError)


def _fail_cleanly(fn):
    """Turn the project's user-facing errors into one line and exit code 1, not a traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        from train.data import DataError
        try:
            return fn(*a, **kw)
        except (DataError, *_USER_ERRORS) as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="malaria-edge")
def main():
    """Train, evaluate, export and benchmark malaria blood-cell classifiers.

    \b
    Typical flow:
      malaria-edge data prepare ../shared/data/nih_malaria_dev --out data/prepared
      malaria-edge train --recipe cnn --data data/prepared --out runs/cnn
      malaria-edge evaluate runs/cnn/model.keras --data-dir data/prepared --split test
      malaria-edge export runs/cnn/model.keras --data data/prepared --out models/cnn
      malaria-edge bench models/cnn --data data/prepared
    """


@main.group()
def data():
    """Get the NIH cell images and turn them into a manifest, a patient split and a cache."""


@data.command("prepare")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=Path("data/prepared"), show_default=True,
              help="Output folder: manifest.csv, split.json, report.json, cache_<size>.npy.")
@click.option("--size", default=128, show_default=True, help="Square model input size of the cache.")
@click.option("--seed", default=0, show_default=True, help="Seed of the split.")
@click.option("--split", "split_kind", type=click.Choice(["patient", "random"]), default="patient", show_default=True,
              help="'random' splits images, not patients: it leaks and exists only to compare with published numbers.")
@click.option("--fractions", default="0.7,0.15,0.15", show_default=True, help="train,val,test fractions.")
@click.option("--workers", type=int, default=None, help="Decoding processes (default: all cores).")
@_fail_cleanly
def data_prepare(src, out, size, seed, split_kind, fractions, workers):
    """Decode SRC (Kaggle zip, its folder, or any folder with Parasitized/ and Uninfected/).

    Bad files (corrupt, empty, truncated, not images, absurdly large) are skipped and listed in
    report.json; exact duplicates (same pixels) are dropped. The split keeps each patient (or
    healthy slide) in one split.
    """
    from train.data import prepare
    fr = tuple(float(x) for x in fractions.split(","))
    rep = prepare(src, out, size=size, seed=seed, split_kind=split_kind, fractions=fr, workers=workers)
    _print_prepare_report(rep, out)


def _print_prepare_report(rep: dict, out: Path) -> None:
    click.echo(f"kept {rep['images_kept']} of {rep['images_found']} images in {rep['seconds']} s → {out}")
    for kind in ("skipped", "duplicates_dropped", "ignored"):
        if rep[kind]:
            click.echo(f"{kind.replace('_', ' ')}: {len(rep[kind])} (see {out / 'report.json'})")
            for r in rep[kind][:5]:
                click.echo(f"  {r['file']}: {r.get('reason') or 'same as ' + r['same_as']}")
    s = rep["split"]
    click.echo(f"split ({s['kind']}, seed {s['seed']}, hash {s['hash']}):")
    for name, v in s["summary"].items():
        click.echo(f"  {name:5s} {v['images']:6d} images  {v['groups']:4d} groups  "
                   f"Parasitized {v['Parasitized']:6d}  Uninfected {v['Uninfected']:6d}")


@data.command("download")
@click.option("--dest", type=click.Path(path_type=Path), default=Path("data/kaggle"), show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("data/prepared"), show_default=True)
@click.option("--size", default=128, show_default=True)
@click.option("--seed", default=0, show_default=True)
@_fail_cleanly
def data_download(dest, out, size, seed):
    """Download Kaggle's iarunava/cell-images-for-detecting-malaria, then prepare it.

    Credentials come from ~/.kaggle/kaggle.json or KAGGLE_USERNAME/KAGGLE_KEY.
    """
    from train.data import download_kaggle, prepare
    zip_path = download_kaggle(dest)
    _print_prepare_report(prepare(zip_path, out, size=size, seed=seed), out)


if __name__ == "__main__":
    main()
