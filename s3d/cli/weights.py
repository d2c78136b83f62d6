"""`s3d weights`: list, inspect, download and export pre-trained weights (thin wrapper over s3d.hub)."""

from __future__ import annotations

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


@weights.command("list")
def list_() -> None:
    """Print the registry: name, Hub repo, pre-training method and licence."""
    from s3d.hub import REGISTRY

    rows = [("name", "hub id", "method", "licence")]
    rows += [(e.name, e.repo_id, e.method, e.license) for e in REGISTRY.values()]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3])
    click.echo("\nDetails: s3d weights info NAME. Any Hub repo id owner/name[@revision] works with --weights too.")


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
    try:
        from huggingface_hub import hf_hub_download

        readme = hf_hub_download(entry.repo_id, "README.md", revision=entry.revision,
                                 cache_dir=str(_cache_root(cache_dir)), local_files_only=True)
    except Exception:  # not cached (or no hub): the registry text above is the card
        readme = None
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
