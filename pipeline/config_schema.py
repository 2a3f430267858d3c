"""The parameters: one dataclass per ``params.yaml`` section, each field with its default, what values it
allows, and a one-line reason.

``_p`` declares a field: its default, bounds (``ge``/``gt``/``le``/``lt``), ``choices``, or a full-match
``pattern`` for a string, and ``help``. ``pipeline.config.load_params`` merges ``params.yaml`` over
``Params`` with OmegaConf (unknown keys and wrong types fail there), then checks every field's bounds,
choices and pattern, and the rules between fields. ``pipeline.config`` re-exports every name here, so
importers need only that module. Tested through it, in ``tests/pipeline/test_config.py`` and
``tests/pipeline/test_config_refusals.py`` (which walks every field of this schema).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _p(
    default: Any, *, ge=None, gt=None, le=None, lt=None, choices=None, pattern: str | None = None, help: str = ""
) -> Any:
    """A schema field with its allowed range, choices or (strings) full-match pattern, checked after merging
    (``pipeline.config``), and a one-line reason."""
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "pattern": pattern, "help": help}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# Upper bounds shared by several fields, each far beyond any sensible value and far below an overflow.
SEED_MAX = 2**32 - 1  # np.random.seed takes 0..2^32-1: a seed in that range means the same to every library
MAX_STEPS = 100_000_000  # optimiser steps: ~400x the longest recipe here (COCO, 240k)
MAX_GRAD_STATS_STEPS = 10_000  # steps of per-layer gradient statistics a tracked run keeps (the recipes: 20 to 240)
MAX_IMAGES = 100_000_000  # images in a split: ~50x Open Images (1.9 M)
MAX_BATCH = 4096  # images per forward pass on one worker: beyond any accelerator's memory at SSD sizes
MAX_PROCESSES = 256  # processes or threads on one machine (loader workers, intra-op threads)
MAX_WORKERS = 1024  # Ray Train workers (DDP ranks): 1024 GPUs at most
# A run folder name: starts with a letter or digit, at most 64 of [A-Za-z0-9._-], no "..": never a path.
RUN_NAME_PATTERN = r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
# Validation scores that can pick the best step: mAPs (higher is better) and the loss (lower is better).
SELECT_METRICS = ("val/map_voc07", "val/map_voc", "val/map_coco", "val/loss")


# --------------------------------------------------------------------------------------------- data
@dataclass
class SyntheticConfig:
    num_train: int = _p(1600, ge=1, le=MAX_IMAGES, help="images in the generated training split")
    num_val: int = _p(200, ge=1, le=MAX_IMAGES, help="images in the generated validation split")
    num_test: int = _p(0, ge=0, le=MAX_IMAGES, help="images in the generated test split (0: none)")
    image_size: int = _p(160, ge=32, le=4096, help="side of the square generated images, pixels")
    max_objects: int = _p(6, ge=1, le=50, help="upper bound on objects per image")
    seed: int = _p(0, ge=0, le=SEED_MAX, help="generator seed: one seed, one dataset")


@dataclass
class VocConfig:
    train_sets: list[str] = _p(["trainval"], help="ImageSets/Main lists that make the training split")
    val_sets: list[str] = _p(["test"], help="ImageSets/Main lists that make the validation split")
    test_sets: list[str] = _p([], help="ImageSets/Main lists that make the test split (e.g. [test]; none: [])")
    annotations_dir: str = _p("", help="flat layout: folder of XML files (empty: detect)")
    images_dir: str = _p("", help="flat layout: folder of images (empty: detect)")


@dataclass
class CocoConfig:
    train_json: str = _p("", help="instances JSON of the training split")
    train_images: str = _p("", help="image folder of the training split")
    val_json: str = _p("", help="instances JSON of the validation split")
    val_images: str = _p("", help="image folder of the validation split")


@dataclass
class DataConfig:
    source: str = _p("synthetic", choices=("synthetic", "voc", "coco"), help="where prepare reads from")
    root: Any = _p("", help="voc: a dataset root, or a list of roots to combine (VOC07+12)")
    tracked: str = _p(
        "",
        help="the raw data DVC tracks as prepare's input (dvc.yaml: ${data.tracked}): a folder holding every "
        "file prepare reads, so a changed annotation re-runs prepare ('' outside DVC)",
    )
    classes: list[str] = _p([], help="class names in label order (empty: discovered from the data)")
    strict_classes: bool = _p(False, help="fail on a class name not in data.classes instead of counting it")
    val_fraction: float = _p(0.1, gt=0.0, lt=1.0, help="seeded validation split when no split lists exist")
    test_fraction: float = _p(
        0.0, ge=0.0, lt=1.0, help="seeded share of the training images held out as the test split (0: none)"
    )
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    voc: VocConfig = field(default_factory=VocConfig)
    coco: CocoConfig = field(default_factory=CocoConfig)

    @property
    def roots(self) -> list[str]:
        """``root`` as a list, whether one path or several were given."""
        if isinstance(self.root, str):
            return [self.root] if self.root else []
        return [str(r) for r in self.root]


@dataclass
class PrepareConfig:
    max_bad_fraction: float = _p(0.05, ge=0.0, le=1.0, help="fail when more images than this are rejected")
    max_image_pixels: int = _p(
        89_478_485,
        ge=1,
        le=250_000_000,
        help="decompression-bomb guard (PIL's default limit); at most 250 Mpx, 750 MB decoded RGB per image",
    )


@dataclass
class ShardConfig:
    maxcount: int = _p(500, ge=1, le=1_000_000, help="samples per shard at most")
    maxsize: int = _p(256_000_000, ge=1_000_000, le=100_000_000_000, help="bytes per shard at most (<= 100 GB)")
    max_side: int = _p(
        0,
        ge=0,
        le=65_535,
        help="downscale images whose longer side exceeds this (0: never; 65,535 is JPEG's largest side)",
    )
    jpeg_quality: int = _p(95, ge=1, le=100, help="quality of re-encoded images")


@dataclass
class BoxesConfig:
    min_prior_recall: float = _p(
        0.6,
        ge=0.0,
        le=1.0,
        help="warn, by class and size, when fewer boxes than this reach train.iou_threshold with their best prior",
    )
    fit_trials: int = _p(400, ge=1, le=1_000_000, help="fit-priors: candidate changes scored by the search")
    fit_max_boxes: int = _p(
        20_000, ge=1, le=MAX_IMAGES, help="fit-priors: boxes the search scores (an even sample of larger sets)"
    )


# -------------------------------------------------------------------------------------------- model
@dataclass
class PriorSpecConfig:
    """``model.priors: custom``: the default boxes per source level, in pixels at the model's input side.

    The levels' count and feature maps are the network's (``pipeline.model_builder`` checks them); steps
    default to the preset's."""

    min_sizes: list[float] = _p([], help="per level: side of the small square box, input pixels")
    max_sizes: list[float] = _p([], help="per level: the extra square is sqrt(min * max), input pixels")
    aspect_ratios: list[Any] = _p([], help="per level: a list of ratios > 1, each added with its flip")
    steps: list[float] = _p([], help="per level: stride of the box centres, input pixels (empty: the preset's)")
    clip: bool = _p(False, help="clamp the priors to the image (the Caffe models do not)")


@dataclass
class ModelConfig:
    preset: str = _p("ssd_tiny", choices=("ssd_tiny", "ssd300_vgg16", "ssd512_vgg16"), help="architecture and priors")
    priors: str = _p(
        "voc",
        choices=("voc", "coco", "custom"),
        help="default boxes: the Caffe VOC or COCO model's (ssd_tiny: voc is its own), or custom: model.prior_spec",
    )
    prior_spec: PriorSpecConfig = field(default_factory=PriorSpecConfig)
    pretrained_backbone: str = _p("", help="path to an ImageNet VGG16 state dict (empty: random init)")
    init_from: str = _p(
        "",
        help="fine-tune: start from a model file, a checkpoint folder or a registered model (models:/NAME@ALIAS, "
        "models:/NAME/VERSION); class rows matched by name (empty: off)",
    )


@dataclass
class AugmentConfig:
    photometric: bool = _p(True, help="brightness, contrast, saturation, hue in random order")
    expand: bool = _p(True, help="zoom out onto a mean-filled canvas")
    expand_max_ratio: float = _p(
        4.0,
        le=16.0,
        help="largest canvas side / image side (>= 1: ssd_core.augment.AugmentOptions decides); "
        "the canvas grows with its square, 16 makes a 500 px image an 8000 px canvas",
    )
    crop: bool = _p(True, help="min-IoU random crop")
    flip: bool = _p(True, help="horizontal flip with probability 0.5")


# -------------------------------------------------------------------------------------------- train
@dataclass
class TrainConfig:
    num_workers: Any = _p(
        2,
        help="Ray Train workers (DDP ranks), 1..1024: a number, or [min, max] for an elastic run that goes on "
        "with as many as the cluster has (Ray Train restarts from the last checkpoint when that changes)",
    )
    threads_per_worker: int = _p(1, ge=1, le=MAX_PROCESSES, help="torch intra-op threads per worker")
    use_gpu: bool = _p(False, help="one GPU per worker, NCCL backend")
    loader_workers: int = _p(1, ge=0, le=MAX_PROCESSES, help="DataLoader worker processes per rank")
    batch_size: int = _p(
        32,
        ge=1,
        le=MAX_WORKERS * MAX_BATCH,
        help="images per optimiser step over all workers (the global batch); each worker trains on its share",
    )
    lr: float = _p(1e-3, gt=0.0, help="learning rate at lr_reference_batch global images per step")
    lr_reference_batch: int = _p(32, ge=1, le=1024 * MAX_BATCH, help="lr scales linearly with global batch / this")
    optimizer: str = _p("sgd", choices=("sgd", "adamw"), help="sgd (paper) or adamw (decoupled weight decay)")
    momentum: float = _p(0.9, ge=0.0, lt=1.0, help="SGD momentum (paper); adamw: beta1")
    weight_decay: float = _p(5e-4, ge=0.0, help="sgd: L2 weight decay (paper); adamw: decoupled decay")
    max_steps: int = _p(1000, ge=1, le=MAX_STEPS, help="optimiser steps in the whole run")
    warmup_steps: int = _p(100, ge=0, le=MAX_STEPS, help="linear warm-up from 0.001 x lr")
    schedule: str = _p("cosine", choices=("multistep", "cosine"), help="decay after warm-up")
    milestones: list[int] = _p(
        [], help="multistep: strictly increasing steps in 1..max_steps at which lr is multiplied by gamma"
    )
    gamma: float = _p(0.1, gt=0.0, le=1.0, help="multistep decay factor")
    grad_clip_norm: float = _p(10.0, ge=0.0, help="clip the global gradient norm (0: off)")
    precision: str = _p("fp32", choices=("fp32", "bf16", "fp16"), help="autocast dtype (fp16: GPU only)")
    channels_last: bool = _p(False, help="NHWC memory format for convolutions")
    compile: bool = _p(False, help="torch.compile (inductor) the forward pass, target assignment and loss")
    cuda_graphs: bool = _p(False, help="with compile and use_gpu: replay the step's kernels as CUDA graphs")
    max_boxes: int = _p(
        100, ge=1, le=4096, help="ground truth padded to this many boxes per image; records with more are skipped"
    )
    iou_threshold: float = _p(0.5, gt=0.0, le=1.0, help="prior/box IoU that makes a positive")
    neg_pos_ratio: int = _p(3, ge=1, le=1000, help="hard negatives per positive (paper: 3)")
    loss_normalize: str = _p("batch", choices=("batch", "per_image"), help="divide by N over the batch")
    checkpoint_every_steps: int = _p(200, ge=1, le=MAX_STEPS, help="rank 0 writes a checkpoint this often")
    keep_checkpoints: int = _p(2, ge=1, le=1000, help="newest checkpoints kept")
    max_failures: int = _p(3, ge=0, le=1000, help="worker-group restarts allowed")
    max_consecutive_skips: int = _p(20, ge=1, le=MAX_STEPS, help="non-finite steps in a row before the run stops")
    resume: bool = _p(True, help="continue from the newest checkpoint of the same run")
    run_name: str = _p(
        "ssd",
        pattern=RUN_NAME_PATTERN,
        help="Ray Train run name; with storage_path, the identity used to resume; a folder name, never a path",
    )
    storage_path: str = _p("runs", help="checkpoints: local path or s3:// URL; the run folder is <run_name>-<digest>")
    log_every_steps: int = _p(10, ge=1, le=MAX_STEPS, help="progress line and step metrics interval")
    freeze: list[str] = _p([], help="parameter-name prefixes kept fixed (e.g. vgg.), fine-tuning; [] trains all")
    unfreeze_at_step: int = _p(0, ge=0, le=MAX_STEPS, help="train.freeze holds until this step (0: for the whole run)")
    val_every_steps: int = _p(
        0, ge=0, le=MAX_STEPS, help="score the validation split every this many steps and at the last (0: off)"
    )
    ema_decay: float = _p(
        0.0, ge=0.0, lt=1.0, help="exponential moving average of the weights, kept per step (0: off; e.g. 0.999)"
    )
    select_metric: str = _p(
        "val/map_voc07", choices=SELECT_METRICS, help="the validation score that picks the best step (val/loss: lowest)"
    )
    patience: int = _p(
        0, ge=0, le=MAX_STEPS, help="stop after this many validations without a better select_metric (0: never)"
    )
    final_weights: str = _p(
        "last", choices=("best", "last", "ema"), help="what --model-out holds: best validated, last step's, or EMA"
    )

    @property
    def worker_range(self) -> tuple[int, int]:
        """``num_workers`` as ``(min, max)``; equal for a fixed number of workers."""
        if isinstance(self.num_workers, int):
            return self.num_workers, self.num_workers
        low, high = self.num_workers
        return int(low), int(high)


# --------------------------------------------------------------------------------------- evaluate
@dataclass
class EvalConfig:
    batch_size: int = _p(16, ge=1, le=MAX_BATCH, help="images per forward pass")
    num_workers: int = _p(1, ge=0, le=MAX_PROCESSES, help="loader worker processes for evaluation")
    score_threshold: float = _p(0.01, ge=0.0, lt=1.0, help="per-class score threshold (original: 0.01)")
    nms_iou: float = _p(0.45, gt=0.0, le=1.0, help="NMS IoU threshold (original: 0.45)")
    top_k: int = _p(
        400,
        ge=1,
        le=32_768,
        help="candidates per class before NMS (original: 400); "
        "32,768 is more than any preset's priors (SSD512: 24,564)",
    )
    max_detections: int = _p(200, ge=1, le=32_768, help="detections per image after NMS (original: 200)")
    num_sample_images: int = _p(16, ge=0, le=256, help="validation images drawn in the detection grid")


# --------------------------------------------------------------------------------------- tracking
@dataclass
class TrackingConfig:
    enabled: bool = _p(True, help="record runs in MLflow")
    experiment: str = _p("ssd", help="MLflow experiment name")
    uri: str = _p("", help="tracking URI (empty: MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow.db)")
    grad_stats_every: int = _p(50, ge=0, le=MAX_STEPS, help="per-layer gradient statistics interval (0: off)")
    connect_timeout_s: float = _p(10.0, gt=0.0, help="give up on an unreachable server after this long")
    register_model: bool = _p(True, help="register the final model in the MLflow registry")
    model_name: str = _p("ssd", help="registered model name")


@dataclass
class Params:
    seed: int = _p(0, ge=0, le=SEED_MAX, help="one seed for splits, initialisation, data order and augmentation")
    data: DataConfig = field(default_factory=DataConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    boxes: BoxesConfig = field(default_factory=BoxesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
