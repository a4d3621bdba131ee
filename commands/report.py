"""Commands that report: ``doctor`` (what can run here) and ``inspect`` (an output folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from disco.pipeline.config import SAM2_MODELS, SAM_MODELS, PreprocessConfig
from disco.commands.terminal import choices, console, defaults, plain, say, usage_error

P = defaults(PreprocessConfig)
SamModel = choices("SAM model", SAM_MODELS)
Sam2Model = choices("SAM 2 model", SAM2_MODELS)


def print_summary(manifest: dict, title: str = "preprocess summary", to: Console | None = None) -> None:
    """The summary table of a run's manifest; on stderr with the run's own messages, unless ``to``."""
    counts, run = manifest["counts"], manifest["run"]
    table = Table(title=title, show_header=False)
    table.add_row("inputs", f"{counts['inputs']} ({counts['inputs_done']} done, {counts['inputs_failed']} of them "
                  f"failed; {counts['inputs_pending']} pending)")
    table.add_row("frames", str(counts["frames"]))
    table.add_row("rows written", str(counts["rows_written"]))
    skipped = ", ".join(f"{k}: {v}" for k, v in counts["rows_skipped"].items()) or "none"
    table.add_row("rows skipped", skipped)
    table.add_row("errors", str(counts["errors"]))
    if counts.get("ignored_files"):
        table.add_row("ignored files", f"{counts['ignored_files']} (not media of this source)")
    if manifest.get("filtered_at_listing"):
        table.add_row("left out at listing", ", ".join(f"{k}: {v}" for k, v in manifest["filtered_at_listing"].items()))
    if manifest.get("dataset"):
        dataset = manifest["dataset"]
        table.add_row("data set", f"{dataset['name']} ({dataset['manifest']}); split: {dataset['split_rule'][:60]}"
                      + ("..." if len(dataset["split_rule"]) > 60 else ""))
    if manifest.get("reject_shards"):
        table.add_row("rejects table", f"{sum(s['rows'] for s in manifest['reject_shards'])} rows in rejects/")
    fps = run.get("frames_per_s")
    table.add_row("this run", f"{run['frames_processed']} frames in {run['wall_time_s']:.1f} s"
                  + (f" ({fps:.1f} frames/s)" if fps else ""))
    table.add_row("shards", str(len(manifest["shards"])))
    (to or console).print(table)



def doctor(
    weights: Annotated[Optional[Path], typer.Option(envvar="DISCO_WEIGHTS", help="Weights folder to check (layout in the README).")] = None,
    sam_model: Annotated[SamModel, typer.Option(help="SAM variant to look for.")] = P.sam_model,
    sam2_model: Annotated[Sam2Model, typer.Option(help="SAM 2.1 size to look for.")] = P.sam2_model,
    hands: Annotated[bool, typer.Option("--hands/--no-hands", help="Look for the OpenPose hand model.")] = P.hands,
    face: Annotated[bool, typer.Option("--face/--no-face", help="Look for the OpenPose face model.")] = P.face,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Report CUDA, GPUs, which annotator backends can run here and which weights were found."""
    import json

    from disco.pipeline.doctor import diagnose

    sam_model = plain(sam_model)
    if weights is not None and not weights.is_dir():
        usage_error(f"--weights {weights} is not a folder")
    report = diagnose(weights, sam_model=sam_model, sam2_model=plain(sam2_model), hands=hands, face=face)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    out = Console()
    gpus = ", ".join(report["gpus"]) or "none"
    out.print(f"CUDA: {'yes' if report['cuda'] else 'no'}   GPUs: {gpus}   torch {report['torch']}")
    say(f"weights folder: {report['weights_dir'] or 'not set (--weights / $DISCO_WEIGHTS)'}", out)
    table = Table(title="annotator backends")
    for column in ("backend", "role", "can run", "why not"):
        table.add_column(column)
    for b in report["backends"]:
        table.add_row(b["name"], b["role"], "yes" if b["can_run"] else "no", "; ".join(b["problems"]))
    out.print(table)
    files = Table(title="weight files")
    for column in ("file", "for", "found"):
        files.add_column(column)
    for f in report["files"]:
        files.add_row(f["name"], f["purpose"], "yes" if f["present"] else f"no (expected at {f['path']})")
    out.print(files)


def print_temporal(out: Console, backends: dict, quality) -> None:
    """The steadiness of an output's video annotations, named by the backends that made them."""
    if not quality.pairs:
        out.print("temporal quality: no video clip with consecutive frames")
        return
    table = Table(title=f"temporal quality ({quality.pairs} pairs of consecutive frames, {quality.clips} clips)")
    for column in ("measure", "backend", "value", "meaning"):
        table.add_column(column)
    table.add_row("mask flicker", backends["matting"]["name"], f"{quality.mask_iou:.3f}",
                  "mean IoU of consecutive masks (1 = steady)")
    jitter = "n/a" if quality.pose_jitter is None else f"{quality.pose_jitter:.4f}"
    table.add_row("pose jitter", backends["pose"]["name"], jitter,
                  "mean joint displacement between consecutive frames / body size (0 = still)")
    out.print(table)


def inspect(
    output: Annotated[Path, typer.Argument(help="An output folder written by `disco-cli preprocess`.")],
    sheet: Annotated[Optional[Path], typer.Option(help="Where to write the contact sheet PNG (default OUTPUT/contact_sheet.png).")] = None,
    rows: Annotated[int, typer.Option(min=1, help="Rows to show on the contact sheet.")] = 8,
    temporal_frames: Annotated[int, typer.Option(
        min=0, help="Video frames read for mask flicker and pose jitter (0: skip that report).")] = 2000,
) -> None:
    """Print an output's manifest summary, schema, counts, mask flicker and pose jitter; write a contact sheet."""
    import pyarrow as pa

    from disco.pipeline.errors import ConfigError
    from disco.pipeline.contact_sheet import write_contact_sheet
    from disco.pipeline.errors import first_line
    from disco.pipeline.store.manifest import read_manifest
    from disco.pipeline.store.reader import open_errors, open_triplets
    from disco.pipeline.store.schema import MANIFEST_FILE
    from disco.pipeline.temporal_quality import temporal_quality

    if not (output / MANIFEST_FILE).exists():
        from disco.pipeline.store.output import unfinished_run

        usage_error(unfinished_run(output) or f"{output} holds no {MANIFEST_FILE}; is it a `disco-cli preprocess` output?")
    try:  # the manifest, and every shard's footer, checked here before anything is printed
        manifest = read_manifest(output / MANIFEST_FILE)
        triplets, errors = open_triplets(output), open_errors(output)
    except ConfigError as exc:
        usage_error(str(exc))
    if sheet is not None:  # checked before the summary: the sheet is written last
        from disco.pipeline.errors import output_file_problem
        from disco.pipeline.sources.generic import IMAGE_SUFFIXES, VIDEO_SUFFIXES

        if sheet.suffix.lower() not in (".png", ".jpg", ".jpeg"):
            usage_error(f"--sheet {sheet}: the contact sheet is a picture; give a .png (or .jpg) file name")
        # Not over a picture of the data the output was made from (a working-dir job's is gone); in
        # the output folder itself it is none, wherever that folder is (the listing skips it).
        import os

        source = str((manifest.get("parameters") or {}).get("input") or "")
        own = Path(os.path.realpath(sheet)).is_relative_to(os.path.realpath(output))
        problem = output_file_problem(sheet, "--sheet", inputs=(source,) if source.startswith("/") and not own else (),
                                      reads=IMAGE_SUFFIXES | VIDEO_SUFFIXES)
        if problem:
            usage_error(problem)
    out = Console()
    say(f"{output}  written by: {manifest['command']}", out)  # the command as typed: text, one line
    backends = manifest["backends"]
    # A filtered output ran no model: its rows' annotations are its source's (chains of filters included).
    made_by = backends
    while made_by.get("source_backends"):
        made_by = made_by["source_backends"]
    say(f"backends: matting={made_by['matting']['name']} pose={made_by['pose']['name']} ({backends['reason']})", out)
    backends = made_by
    print_summary(manifest, "filter-humans summary" if manifest.get("filter") else "preprocess summary", to=out)
    schema = Table(title="triplet schema")
    schema.add_column("column")
    schema.add_column("type")
    for field in triplets.schema:
        schema.add_row(field.name, str(field.type))
    out.print(schema)
    counts = Table(title="rows on disk")
    counts.add_column("table")
    counts.add_column("rows", justify="right")
    counts.add_column("files", justify="right")
    counts.add_row("triplets", str(triplets.count_rows()), str(len(triplets.files)))
    counts.add_row("errors", str(errors.count_rows()), str(len(errors.files)))
    out.print(counts)
    if errors.count_rows():
        try:
            by_type = errors.to_table(columns=["error_type"]).column("error_type").value_counts().to_pylist()
        except (OSError, pa.ArrowException) as exc:  # damaged pages, as above
            usage_error(f"an errors shard of {output} cannot be read ({first_line(exc)})")
        say("errors by type: " + ", ".join(f"{d['values']}: {d['counts']}" for d in by_type), out)
    if temporal_frames:
        try:
            print_temporal(out, backends, temporal_quality(triplets, temporal_frames))
        except (OSError, ValueError, pa.ArrowException) as exc:  # damaged pages or pictures
            usage_error(f"a shard of {output} cannot be read ({first_line(exc)})")
    target = sheet or output / "contact_sheet.png"
    try:
        shown = write_contact_sheet(triplets, target, rows)
    except (OSError, pa.ArrowException) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:  # the sheet could not be saved: not the shards' fault
            usage_error(f"the contact sheet cannot be written to {target}: {exc.strerror or exc}; give --sheet "
                        "a writable place")
        # pyarrow on damaged pages: an OSError without errno, or one of its own
        usage_error(f"a shard of {output} cannot be read ({first_line(exc)}); "
                     "the shards are damaged: write the output again with `disco-cli preprocess ... --overwrite`")
    say(f"contact sheet ({shown} rows): {target.resolve()}", out)
