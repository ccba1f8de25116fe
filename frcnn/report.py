"""The plain-text tables the tools print: metrics per class (evaluation) and detections per image file (inference).

Presentation only: the numbers come from :mod:`frcnn.evaluation` and :mod:`frcnn.inference`.
"""

import math

from frcnn.evaluation.metrics import COCO_STAT_NAMES


def format_report(metrics, class_names):
    """A plain-text table of :func:`evaluate`'s ``metrics``: the COCO summary numbers, then one row per class."""

    def fmt(v):
        # None / nan, and pycocotools' -1 ("no ground truth in this area range"), print as a dash.
        missing = v is None or (isinstance(v, float) and math.isnan(v)) or v == -1
        return "   -  " if missing else f"{100.0 * v:6.2f}"

    lines = []
    coco_keys = [k for k in COCO_STAT_NAMES if k in metrics]
    if coco_keys:
        lines.append("COCO bbox (pycocotools, %):")
        for row in (coco_keys[:6], coco_keys[6:]):
            if row:
                lines.append("  " + "  ".join(f"{k} {fmt(metrics[k]).strip()}" for k in row))
    if "voc07_mAP50" in metrics:
        lines.append(f"VOC07 11-point mAP@0.5 (%): {fmt(metrics['voc07_mAP50']).strip()}")
    per_ap = metrics.get("per_class_AP", {})
    per_ap50 = metrics.get("per_class_AP50", {})
    per_voc = metrics.get("voc07_per_class_AP50", {})
    width = max([len("class")] + [len(str(n)) for n in class_names])
    lines.append(f"{'class':<{width}}  {'AP':>6}  {'AP50':>6}  {'VOC07':>6}")
    lines.append("-" * (width + 26))
    for name in class_names:
        name = str(name)
        lines.append(
            f"{name:<{width}}  {fmt(per_ap.get(name))}  {fmt(per_ap50.get(name))}  {fmt(per_voc.get(name))}"
        )
    return "\n".join(lines)


def top_classes(result, k=3):
    """``'circle x2 (0.91), square (0.40)'``: the ``k`` most frequent classes with their best score."""
    stats = {}
    for name, score in zip(result.class_names, result.scores):
        count, best = stats.get(name, (0, 0.0))
        stats[name] = (count + 1, max(best, float(score)))
    ranked = sorted(stats.items(), key=lambda item: (-item[1][0], -item[1][1], item[0]))
    parts = [f"{name}{f' x{count}' if count > 1 else ''} ({best:.2f})" for name, (count, best) in ranked[:k]]
    if len(ranked) > k:
        parts.append(f"+{len(ranked) - k} more")
    return ", ".join(parts)


def format_table(results):
    """One line per image: file, number of detections, top classes."""
    if not results:
        return "no image processed"
    files = [r.file for r in results]
    width = min(max(len("file"), *(len(f) for f in files)), 60)

    def short(name):
        return name if len(name) <= width else "..." + name[-(width - 3):]

    lines = [f"{'file':<{width}}  {'#det':>5}  top classes", "-" * (width + 20)]
    for r in results:
        lines.append(f"{short(r.file):<{width}}  {len(r.scores):>5}  {top_classes(r) or '-'}")
    return "\n".join(lines)
