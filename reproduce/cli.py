"""`moesim reproduce`: simulate the catalogue of published measurements and compare."""

from __future__ import annotations

from pathlib import Path

import click

from moesim.options import out_option


@click.command(name="reproduce")
@click.option("--system", default=None, help="Only points of this system (substring of its name, or a preset).")
@click.option("--source", default=None, help="Only points of this source table (the catalogue's 'source').")
@click.option("--catalogue", "catalogue_path", default=None, type=click.Path(dir_okay=False),
              help="Catalogue CSV (default: the bundled reproduce/catalogue.csv).")
@out_option("file", "the Markdown report to write (default: validation/published.md when no filter is given).",
            dest="out_path")
def reproduce_command(system, source, catalogue_path, out_path):
    """Simulate every published point with its preset and machine; print published, predicted and ratio."""
    from moesim.reproduce.bounds import link_floors
    from moesim.reproduce.catalogue import CATALOGUE, read_catalogue
    from moesim.reproduce.report import (format_console, format_fits, format_floors, format_scores, write_markdown,
                                         write_plot)
    from moesim.reproduce.run import filtered, fit_and_run, score

    catalogue = catalogue_path or CATALOGUE
    points = filtered(read_catalogue(catalogue), system, source)
    outcomes, fits, held_out = fit_and_run(points)
    click.echo(format_console(outcomes))
    scores = score(outcomes)
    for line in format_fits(fits):
        click.echo(line)
    for line in format_scores(scores, held_out):
        click.echo(line)
    floors = link_floors(outcomes)
    for line in format_floors(outcomes, floors):
        click.echo(line)
    if out_path is None and system is None and source is None:
        out_path = str(Path("validation") / "published.md")
    if out_path:
        md = Path(out_path)
        md.parent.mkdir(parents=True, exist_ok=True)
        plot = md.with_suffix(".png")
        write_plot(plot, outcomes)
        write_markdown(md, outcomes, scores, held_out, fits, plot.name, catalogue, floors)
        click.echo(f"report: {md} (plot {plot})")
