"""SSD training augmentation and evaluation preprocessing on uint8 ``[3, H, W]`` RGB tensors.

``train_transform`` runs the original SSD chain (Caffe SSD / ssd.pytorch ``SSDAugmentation``):

1. photometric distortion (:mod:`ssd_core.augment.photometric`);
2. expansion ("zoom out", probability 1/2) onto a canvas filled with the dataset mean colour;
3. min-IoU random crop (one of seven options, up to 50 trials; boxes kept by their centre, then clipped);
4. resize to ``size x size`` (bilinear, ``align_corners=False``, no antialiasing, like the original
   ``cv2.resize``), rounded back to uint8;
5. horizontal flip with probability 1/2.

It is split in two: a plan draws every random number and does all the box geometry from the image size
alone, then rendering makes the pixels from the plan. The modules:

- :mod:`~ssd_core.augment.options`: :class:`AugmentOptions` (which steps run) and the chain's constants;
- :mod:`~ssd_core.augment.plan`: :func:`plan_augmentation`, one image, the readable reference (the draws,
  expansion and crop rules are described there);
- :mod:`~ssd_core.augment.batch`: :func:`plan_augmentations`, a batch in one vectorised pass, exactly the
  plans of :func:`plan_augmentation`;
- :mod:`~ssd_core.augment.render`: :func:`render_augmentation` (a plan's pixels, also from a source decoded
  at reduced size), :func:`train_transform` (plan + render) and :func:`eval_transform` (resize only);
- :mod:`~ssd_core.augment.photometric`: brightness, contrast, saturation and hue, drawn and applied apart;
- :mod:`~ssd_core.augment.normalize`: :func:`normalize_images`, uint8 images to the model's float input.

The chain written out literally, slow and obviously correct, is :func:`ssd_core.reference.reference_train_transform`.
Randomness comes only from the ``torch.Generator`` argument; one seed gives one result.
"""

from ssd_core.augment.batch import plan_augmentations
from ssd_core.augment.normalize import IMAGE_MEAN, IMAGE_STD, normalize_images
from ssd_core.augment.options import (
    CROP_ASPECT_RANGE,
    CROP_MIN_IOUS,
    CROP_MIN_SCALE,
    CROP_TRIALS,
    AugmentOptions,
)
from ssd_core.augment.photometric import (
    PHOTOMETRIC_DRAWS,
    PhotometricParams,
    apply_photometric,
    colour_matrix,
    photometric_distort,
    photometric_from_uniforms,
    sample_photometric,
)
from ssd_core.augment.plan import AugmentPlan, CropChoice, Expansion, plan_augmentation, sample_crop, sample_expansion
from ssd_core.augment.render import (
    FILL_COLOUR,
    Sample,
    eval_transform,
    reduced_size,
    render_augmentation,
    train_transform,
)

__all__ = [
    "CROP_ASPECT_RANGE",
    "CROP_MIN_IOUS",
    "CROP_MIN_SCALE",
    "CROP_TRIALS",
    "FILL_COLOUR",
    "IMAGE_MEAN",
    "IMAGE_STD",
    "PHOTOMETRIC_DRAWS",
    "AugmentOptions",
    "AugmentPlan",
    "CropChoice",
    "Expansion",
    "PhotometricParams",
    "Sample",
    "apply_photometric",
    "colour_matrix",
    "eval_transform",
    "normalize_images",
    "photometric_distort",
    "photometric_from_uniforms",
    "plan_augmentation",
    "plan_augmentations",
    "reduced_size",
    "render_augmentation",
    "sample_crop",
    "sample_expansion",
    "sample_photometric",
    "train_transform",
]
