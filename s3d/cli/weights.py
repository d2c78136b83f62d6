"""`s3d weights`: list, inspect, download and export pre-trained weights (thin wrapper over s3d.hub)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import click

_cache_option = click.option(
    "--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Hugging Face cache folder to use. Default: the HF cache (HF_HUB_CACHE / HF_HOME); converted "
         "nnssl checkpoints go to its s3d-converted/ subfolder.")


@click.group()
def weights() -> None:
    """Pre-trained weights: the registry of named checkpoints, Hub downloads and exports.

    Anything `s3d finetune --weights` accepts works here too: a registry name, a Hub repo id
    owner/name[@revision], or a local folder/file. With HF_HUB_OFFLINE=1 only the cache is used.
    """


LIST_WIDTH = 120


def _cell(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "~"


def registry_table(width: int = LIST_WIDTH) -> list[str]:
    """`s3d weights list` as lines of at most `width` characters: name, licence, pre-training data, Hub id."""
    from s3d.hub import REGISTRY

    entries = list(REGISTRY.values())
    head = ("name", "licence", "pre-training data", "hub id")
    rows = [(e.name, e.license_label(), e.data_summary or e.pretraining_data or "unknown", e.repo_id)
            for e in entries]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    # The data and hub columns give way (in that order) when the table would not fit.
    over = sum(widths) + 2 * 3 - width
    for i in (2, 3):
        if over > 0:
            cut = min(over, widths[i] - len(head[i]))
            widths[i] -= cut
            over -= cut
    lines = ["  ".join(_cell(c, w).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = {e.license: e.license_note() for e in entries if e.license_note()}
    if notes:
        lines.append("")
        for note in notes.values():
            lines += textwrap.wrap(f"(!) {note}", width, subsequent_indent="    ")
    return lines


@weights.command("list")
def list_() -> None:
    """Print the registry: name, licence, pre-training data and Hub repo of every entry."""
    for line in registry_table():
        click.echo(line)
    click.echo("\nDetails and sources: s3d weights info NAME. Any Hub repo id owner/name[@revision] works with "
               "--weights too.")


@weights.command()
@click.argument("name")
@_cache_option
def info(name: str, cache_dir: Path | None) -> None:
    """Show one registry entry with its model-card text (the Hub README too, when it is in the cache)."""
    from s3d.errors import S3DError
    from s3d.hub import REGISTRY, _cache_root

    entry = REGISTRY.get(name) or REGISTRY.get(name.lower())
    if entry is None:
        raise S3DError(f"weights '{name}': not in the registry; known: {', '.join(REGISTRY)}")
    click.echo(entry.card())
    readme = None
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # the registry text above is the card
        hf_hub_download = None
    for repo in (entry.repo_id, *entry.aliases) if hf_hub_download else ():
        try:
            readme = hf_hub_download(repo, "README.md", revision=entry.revision,
                                     cache_dir=str(_cache_root(cache_dir)), local_files_only=True)
            break
        except Exception:  # not cached under this id: the registry text above is the card
            continue
    if readme:
        click.echo(f"\n--- model card from the Hub ({readme}) ---\n")
        click.echo(Path(readme).read_text(errors="replace"))


@weights.command()
@click.argument("spec")
@_cache_option
def download(spec: str, cache_dir: Path | None) -> None:
    """Fetch weights into the cache ahead of time (and convert nnssl checkpoints to safetensors).

    Copy the cache folder to an offline machine and use it there with HF_HUB_OFFLINE=1.
    """
    from s3d.hub import _cache_root, resolve_weights

    resolved = resolve_weights(spec, cache_dir=cache_dir)
    n = len(resolved.state_dict)
    click.echo(f"{spec}: {n} tensors from {resolved.source}")
    if resolved.path is not None:
        click.echo(f"weights: {resolved.path}")
    click.echo(f"cache: {_cache_root(cache_dir)}")


@weights.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--encoder-only", is_flag=True,
              help="Keep only the encoder (encoder.stem.*, encoder.stages.*), which is what fine-tuning transfers. "
                   "Default: the model as stored in RUN_DIR (encoder + decoder).")
@click.option("--license", "license_", default="other", show_default=True,
              help="Licence written into the model card (a Hub licence id such as cc-by-4.0 or apache-2.0).")
@click.option("--title", default=None, help="Model-card title. Default: the run folder's name.")
def export(run_dir: Path, out_dir: Path, encoder_only: bool, license_: str, title: str | None) -> None:
    """Write OUT_DIR/{model.safetensors, config.json, README.md} from a run, ready for `hf upload`."""
    from s3d.hub import export_run

    out = export_run(run_dir, out_dir, encoder_only=encoder_only, license=license_, title=title)
    click.echo(f"exported {run_dir} to {out}; upload with: hf upload OWNER/NAME {out}")
