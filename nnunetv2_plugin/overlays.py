"""PNG overlays of reference and predicted label maps on their images (one slice per case)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from nnunetv2_plugin.image_files import read_array


def write_overlays(image_dir: Path, reference_dir: Path, prediction_dir: Path, output_dir: Path,
                   max_cases: Optional[int] = None) -> list[Path]:
    """For each predicted case, the axial slice with the most reference foreground: image, reference
    and prediction side by side. Images are ``<case>_0000.nii.gz``; labels ``<case>.nii.gz``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    predictions = sorted(prediction_dir.glob("*.nii.gz"))[:max_cases]
    if not predictions:
        raise FileNotFoundError(f"no *.nii.gz predictions in {prediction_dir}")
    for prediction_path in predictions:
        case = prediction_path.name[: -len(".nii.gz")]
        image_path, reference_path = image_dir / f"{case}_0000.nii.gz", reference_dir / f"{case}.nii.gz"
        for needed in (image_path, reference_path):
            if not needed.is_file():
                raise FileNotFoundError(f"{needed} is missing for prediction {prediction_path}")
        image, reference, prediction = (read_array(p) for p in (image_path, reference_path, prediction_path))
        z = int(np.argmax((reference > 0).reshape(reference.shape[0], -1).sum(1)))
        n_labels = int(max(reference.max(), prediction.max(), 1))
        figure, axes = plt.subplots(1, 3, figsize=(9, 3.3))
        for axis, (title, label) in zip(axes, (("image", None), ("reference", reference), ("prediction", prediction))):
            axis.imshow(image[z], cmap="gray")
            if label is not None:
                axis.imshow(np.ma.masked_equal(label[z], 0), cmap="tab10", vmin=0, vmax=max(n_labels, 9),
                            alpha=0.45, interpolation="nearest")
            axis.set_title(f"{title} (slice {z})", fontsize=9)
            axis.axis("off")
        figure.suptitle(case, fontsize=10)
        figure.tight_layout()
        path = output_dir / f"{case}.png"
        figure.savefig(path, dpi=90)
        plt.close(figure)
        written.append(path)
    return written
