"""Thresholds (HALCON's rules), image and pixel metrics, pictures and an HTML report per run."""

from anomax.evaluation.evaluate import evaluate_dl_model
from anomax.evaluation.metrics import PixelAccumulator, aupro, auroc, average_precision, f1_max
from anomax.evaluation.pictures import (plot_anomaly_overlay, plot_pro_curve, plot_roc_curves, plot_score_histogram,
                                        plot_worst_cases, write_evaluation_pictures)
from anomax.evaluation.report import write_html_report
from anomax.evaluation.thresholds import AnomalyThresholds, compute_dl_anomaly_thresholds, threshold_dl_anomaly_results

__all__ = [
    "AnomalyThresholds", "PixelAccumulator", "aupro", "auroc", "average_precision", "compute_dl_anomaly_thresholds",
    "evaluate_dl_model", "f1_max", "plot_anomaly_overlay", "plot_pro_curve", "plot_roc_curves",
    "plot_score_histogram", "plot_worst_cases", "threshold_dl_anomaly_results", "write_evaluation_pictures",
    "write_html_report",
]
