"""What ``python -m pipeline predict`` reads and where it may write, decided before any image is read.

Inputs are files and folders. A folder contributes the files directly inside it (not its subfolders) whose
extension is one of ``IMAGE_EXTENSIONS`` (any case), sorted by name; a file named on the command line is
always tried, whatever its extension. A path given twice is read once (``collect_inputs``).

``--out`` is checked before any work starts (``check_output``): it may be neither an input folder nor
inside one, and no input may lie where outputs go (``--out/images/``, the two JSON files), resolving
symbolic links. A new or empty ``--out`` becomes predict's own (marker file ``.ssd-pipeline``,
``pipeline.artifacts.output_folder``), and a later run replaces its outputs there; in any other existing
folder predict only creates files and refuses, before starting, when one of its output names is taken
(the drawn copies' names come from ``drawn_names``).

``predict --ray`` also takes object-store locations (``s3://bucket/photos``, through ``pipeline.storage``): a
prefix gives the images directly under it, sorted by name, and an ``--out`` prefix gets the same checks, by
key (``check_output_url``; its marker is an object). Without ``--ray`` such a location is refused.

``--device`` becomes a torch device in ``resolve_device``. Every refusal is an ``InputError`` naming the
path or value; ``pipeline.stages.predict`` turns it into exit status 2.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import torch

from pipeline import storage
from pipeline.artifacts.output_folder import MARKER_NAME, owns

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
DETECTIONS_NAME = "detections.json"
RESULTS_NAME = "results.json"
TABLE_NAME = "detections.parquet"  # predict --ray: one row per detection (pipeline.stages.predict_ray)
DRAWN_FOLDER = "images"
PREDICT_STAGE = "predict"  # the marker of an output folder predict made (pipeline.artifacts.output_folder)


class InputError(ValueError):
    """A usage error: no inputs, a missing path, nothing to read, a bad option value."""


def is_object_url(location: str | Path) -> bool:
    """Whether ``location`` names an object store (``s3://...``) rather than a local file or folder."""
    return storage.is_url(location) and not storage.is_local(location)


def collect_inputs(inputs: Sequence[str | Path], *, urls: bool = False) -> list[Path | str]:
    """The image files named by ``inputs`` (files and folders), in order, each once.

    A folder gives its direct children with an extension in ``IMAGE_EXTENSIONS`` (any case), sorted by
    name; a file is taken as it is (reading it decides whether it is an image). With ``urls`` (``predict
    --ray``), an object-store URL (``s3://bucket/photos``) is a folder when objects lie under it, else an
    object; its images come back as URL strings (``s3://bucket/photos/a.jpg``), local ones as ``Path``.

    Raises:
        InputError: ``inputs`` is empty, a path does not exist or is neither file nor folder, a URL is given
            without ``urls``, or no image was found at all.
    """
    if not inputs:
        raise InputError("predict: expected at least one image file or folder, got none")
    paths: list[Path | str] = []
    seen: set[Path | str] = set()
    for given in inputs:
        found: list[Path] | list[str]
        if is_object_url(given):
            if not urls:
                raise InputError(f"predict: {storage.describe(str(given))}: object-store inputs need --ray")
            found = _objects(str(given))
            keys: list[Path | str] = [u.rstrip("/") for u in found]
        else:
            found = _files(Path(given))
            keys = [p.resolve() for p in found]
        for p, key in zip(found, keys, strict=True):
            if key not in seen:
                seen.add(key)
                paths.append(p)
    if not paths:
        raise InputError(f"predict: no images found in {[str(i) for i in inputs]}")
    return paths


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        found = sorted(
            (p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
            key=lambda p: p.name,
        )
        if not found:
            _no_images_in(path)
        return found
    if path.is_file():
        return [path]
    if path.exists():
        raise InputError(f"predict: {path} is neither a file nor a folder")
    raise InputError(f"predict: {path}: no such file or folder")


def _objects(url: str) -> list[str]:
    """The image objects directly under the prefix ``url`` (sorted by name), or ``[url]`` for an object."""
    if storage.is_dir(url):
        found = [
            storage.join(url, e.name)
            for e in storage.list_folder(url)
            if not e.is_dir and PurePosixPath(e.name).suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not found:
            _no_images_in(storage.describe(url))
        return found
    if storage.exists(url):
        return [url]
    raise InputError(f"predict: {storage.describe(url)}: no such object or prefix")


def _no_images_in(where: Path | str) -> None:
    logger.warning(
        "%s: no images in this folder (extensions %s; subfolders are not read)",
        where,
        ", ".join(sorted(IMAGE_EXTENSIONS)),
    )


def drawn_names(paths: Sequence[Path]) -> list[str]:
    """File name of each input's drawn copy: its stem with ``.png`` for ``.png`` inputs, ``.jpg`` otherwise.

    Names are unique without regard to case (case-insensitive file systems): a name an earlier input took
    gets ``-2``, ``-3``, ... before the extension. Computed from the paths alone, so the names do not
    depend on which images fail.
    """
    taken: set[str] = set()
    names = []
    for path in paths:
        ext = ".png" if path.suffix.lower() == ".png" else ".jpg"
        name, n = f"{path.stem}{ext}", 1
        while name.lower() in taken:
            n += 1
            name = f"{path.stem}-{n}{ext}"
        taken.add(name.lower())
        names.append(name)
    return names


def check_output(
    out: Path | str,
    inputs: Sequence[str | Path],
    paths: Sequence[Path | str],
    *,
    draw: bool,
    extra: Sequence[str] = (),
) -> bool:
    """Refuse an ``--out`` that could overwrite an input or a file the pipeline did not make, before any work.

    ``inputs``: the files and folders as given; ``paths``: the images ``collect_inputs`` found in them;
    ``extra``: names of further output files (``predict --ray``'s Parquet table). ``out`` may be an
    object-store prefix (``check_output_url``). Returns whether ``out`` is predict's own (new, empty, or
    carrying its marker), where earlier outputs may be replaced; otherwise only new files may be written.

    Raises:
        InputError: ``out`` is, or lies inside, an input folder; an input folder or file lies in
            ``out/images`` or is one of the output files; ``out`` is a file; or ``out`` is not predict's and
            already holds one of the files this run would write (all named, with their resolved paths).
    """
    names = [DETECTIONS_NAME, RESULTS_NAME, *extra]
    if is_object_url(out):
        return check_output_url(str(out), inputs, paths, names=names)
    out = Path(out)
    real_out = out.resolve()
    real_drawn = (out / DRAWN_FOLDER).resolve()
    outputs = {(out / name).resolve() for name in names}
    for given in inputs:
        if is_object_url(given):
            continue  # an object-store input cannot be a local output
        path = Path(given)
        real = path.resolve()
        if path.is_dir() and (real_out == real or real_out.is_relative_to(real)):
            where = "is the input folder" if real_out == real else "lies inside the input folder"
            raise InputError(
                f"predict: --out {out} ({real_out}) {where} {path} ({real}); its outputs could overwrite the "
                "images or mix with them. Choose an output folder outside every input folder"
            )
        if real.is_relative_to(real_drawn) or real in outputs:  # is_relative_to: equal, or inside
            raise InputError(
                f"predict: the input {path} ({real}) lies where --out {out} ({real_out}) writes its outputs "
                f"({DRAWN_FOLDER}/, {', '.join(names)}); choose another --out"
            )
    if out.exists() and not out.is_dir():
        raise InputError(f"predict: --out {out} is a file; expected a folder")
    if not out.exists() or owns(out, PREDICT_STAGE) or not any(out.iterdir()):
        return True
    targets = [out / name for name in names]
    if draw:
        targets += [out / DRAWN_FOLDER / name for name in drawn_names(paths)]
    _refuse_taken(out, [t for t in targets if t.exists() or t.is_symlink()])
    return False


def check_output_url(
    out: str, inputs: Sequence[str | Path], paths: Sequence[Path | str], *, names: Sequence[str]
) -> bool:
    """``check_output`` for an object-store prefix ``out``: the same refusals, by key instead of resolved path.

    A prefix is predict's own when nothing lies under it or it holds predict's marker object; elsewhere the
    output objects ``names`` must not exist yet (an object store replaces an object without asking).
    """
    prefix = out.rstrip("/")
    outputs = {storage.join(prefix, name) for name in names}
    for given in [str(i) for i in inputs if is_object_url(i)]:
        folder = given.rstrip("/")
        if prefix == folder or prefix.startswith(folder + "/"):
            where = "is the input folder" if prefix == folder else "lies inside the input folder"
            raise InputError(
                f"predict: --out {storage.describe(out)} {where} {storage.describe(given)}; choose an output "
                "prefix outside every input folder"
            )
    clash = [str(p) for p in paths if str(p).rstrip("/") in outputs]
    if clash:
        raise InputError(
            f"predict: the input {storage.describe(clash[0])} is one of the files --out {storage.describe(out)} "
            f"writes ({', '.join(names)}); choose another --out"
        )
    if storage.exists(prefix) and not storage.is_dir(prefix):
        raise InputError(f"predict: --out {storage.describe(out)} is an object; expected a prefix (a folder)")
    if not storage.list_folder(prefix) or owns(prefix, PREDICT_STAGE):
        return True
    _refuse_taken(out, [t for t in sorted(outputs) if storage.exists(t)])
    return False


def _refuse_taken(out: Path | str, taken: Sequence[Path | str]) -> None:
    if taken:
        shown = ", ".join(str(t) for t in taken[:3]) + (f" and {len(taken) - 3} more" if len(taken) > 3 else "")
        raise InputError(
            f"predict: --out {out} was not made by predict (no {MARKER_NAME} marker) and already holds {shown}; "
            "predict writes only new files there. Choose a new or empty --out, or move those files away"
        )


def resolve_device(spec: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N`` -> a torch device.

    Raises:
        InputError: another value, or CUDA asked for where there is none (or not that many devices).
    """
    spec = str(spec).strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or (spec.startswith("cuda:") and spec[5:].isdigit()):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(spec[5:]) if ":" in spec else 0
        if index >= count:
            raise InputError(f"predict: --device {spec}: this machine has {count} CUDA device(s)")
        return torch.device(spec)
    raise InputError(f"predict: --device: expected auto, cpu, cuda or cuda:N, got {spec!r}")
