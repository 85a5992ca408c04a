"""One static HTML page per run: metric tables and the run's pictures, linked relatively."""

from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path

from anomax.errors import InputError
from anomax.files import write_text_atomic
from anomax.evaluation.thresholds import AnomalyThresholds

_STYLE = """body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse;margin:0.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:0.2em 0.6em;text-align:right}th{background:#eee}
figure{display:inline-block;margin:0.5em;vertical-align:top}img{max-width:32em}"""


def write_html_report(run_dir, metrics: Mapping, pictures: Mapping[str, str | Path], *,
                      thresholds: AnomalyThresholds | Mapping[str, float] | None = None,
                      title: str = "anomax evaluation", notes: Sequence[str] = ()) -> Path:
    """Write run_dir/index.html from evaluate_dl_model's metrics and pictures (name -> PNG inside run_dir);
    ``notes`` are sentences shown under the title (e.g. that the dataset has no masks)."""
    run_dir = Path(run_dir).resolve()
    sections = [f"<h1>{escape(title)}</h1>", *(f"<p class='note'>{escape(note)}</p>" for note in notes),
                _table(["images", "good", "defective"],
                       [[metrics["num_images"], metrics["num_good"], metrics["num_defective"]]])]
    groups = {"all": metrics, **metrics["per_defect_type"]}
    sections += ["<h2>Image metrics</h2>", _table(
        ["defect type", "AUROC", "AUPR", "F1-max", "F1 threshold"],
        [[name, *(group["image"][key] for key in ("auroc", "aupr", "f1_max", "f1_threshold"))]
         for name, group in groups.items()])]
    if metrics["pixel"] is not None:
        pixel = metrics["pixel"]
        resolution = ", ".join(f"{key} {value}" for key, value in pixel["resolution"].items())
        where = ("at the original mask resolution (maps upsampled to it)" if pixel.get("native_resolution")
                 else "at the model's map resolution")
        sections += [f"<h2>Pixel metrics</h2><p>Pixels counted {where}; AUPRO integrated to FPR "
                     f"{pixel['fpr_limit']:g} and normalised; {escape(resolution)}.</p>", _table(
                         ["defect type", "AUROC", "F1-max", "F1 threshold", "AUPRO", "regions"],
                         [[name, *(group["pixel"][key] for key in ("auroc", "f1_max", "f1_threshold", "aupro",
                                                                   "num_regions"))]
                          for name, group in groups.items() if group["pixel"] is not None])]
    if thresholds is not None:
        named = thresholds.to_dict() if isinstance(thresholds, AnomalyThresholds) else dict(thresholds)
        sections += ["<h2>Thresholds</h2>", _table(["name", "value"], [[k, v] for k, v in named.items()])]
    for name, measures in metrics["at_thresholds"].items():
        matrix = measures["absolute_confusion_matrix"]
        relative = measures["relative_confusion_matrix"]
        sections += [f"<h3>At classification threshold '{escape(name)}' = {measures['threshold']:.6g}</h3>",
                     _table(["predicted \\ ground truth", "ok", "nok", "precision"],
                            [[cls, f"{matrix[row][0]} ({relative[row][0]:.1%})",
                              f"{matrix[row][1]} ({relative[row][1]:.1%})", measures["precision"][cls]]
                             for row, cls in enumerate(("ok", "nok"))]
                            + [["recall", measures["recall"]["ok"], measures["recall"]["nok"], ""]])]
    sections.append("<h2>Pictures</h2>")
    for name, path in pictures.items():
        source = _relative(run_dir, path)
        sections.append(f'<figure><img src="{escape(source)}" alt="{escape(name)}">'
                        f"<figcaption>{escape(name)}</figcaption></figure>")
    page = run_dir / "index.html"
    write_text_atomic(page, f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{escape(title)}</title>"
                            f"<style>{_STYLE}</style></head><body>\n" + "\n".join(sections) + "\n</body></html>\n")
    return page


def _relative(run_dir: Path, path) -> str:
    path = Path(path) if Path(path).is_absolute() else run_dir / path
    try:
        return path.resolve().relative_to(run_dir).as_posix()
    except ValueError:
        raise InputError(f"picture {path} lies outside the run folder {run_dir}; write pictures inside it so the "
                         "report's relative links keep working when the folder moves") from None


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{escape(str(cell))}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(_format(cell))}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _format(value) -> str:
    if value is None:
        return "–"
    return f"{value:.4f}" if isinstance(value, float) else str(value)
