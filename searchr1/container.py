"""The slime container image as a DAG step of its own, and the absolute-path checks of every container command.

The first ``apptainer exec docker://...`` converts the whole image (tens of GB) to a SIF before running
anything, which does not fit inside the Ray head's start-up wait. So the workflow pulls it once, in rule
``container_image``, to a file under ``<work_dir>/images/`` that every later step runs from:

* apptainer: ``apptainer pull <file>.partial docker://<image>``, renamed to ``<file>.sif`` when complete.
  Layers are cached in ``<work_dir>/images/apptainer-cache`` (``APPTAINER_CACHEDIR``), so a pull killed half
  way resumes from the layers it already has; the conversion's scratch space is ``<work_dir>/images/tmp``
  (``APPTAINER_TMPDIR``: /tmp is often too small). Apptainer prints its own progress to the job's log.
* docker: ``docker pull <image>`` (the daemon resumes layers itself and keeps them in its own data root, not
  under work_dir), then the image id is written to ``<file>.docker-id``; the train and evaluation
  containers run that id, so they run exactly what was pulled.
* an image that is already a local ``.sif`` file (``train.slime.image: /path/slime.sif``) is linked.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

RUNTIMES = ("apptainer", "docker", "none")


class ContainerError(RuntimeError):
    """A container command cannot be built or the image cannot be fetched; the message names the setting."""


def is_local_sif(image: str) -> bool:
    return image.endswith(".sif") or image.startswith("/")


def image_slug(image: str) -> str:
    """A file name for an image reference: ``slimerl/slime:v0.3.1-cu129`` -> ``slimerl_slime_v0.3.1-cu129``."""
    ref = image.split("://", 1)[-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", ref).strip("_")


def image_file(slime_cfg: Mapping[str, Any], work_dir: str | Path) -> str | None:
    """The file the ``container_image`` step writes (None for container_runtime ``none``)."""
    runtime = slime_cfg["container_runtime"]
    if runtime == "none":
        return None
    if runtime not in RUNTIMES:
        raise ContainerError(f"train.slime.container_runtime {runtime!r}: expected one of {', '.join(RUNTIMES)}")
    image = slime_cfg["image"]
    if runtime == "apptainer" and is_local_sif(image):
        stem = Path(image).name.removesuffix(".sif")
    else:
        stem = image_slug(image)
    suffix = ".sif" if runtime == "apptainer" else ".docker-id"
    return f"{str(work_dir).rstrip('/')}/images/{stem}{suffix}"


def pull_command(slime_cfg: Mapping[str, Any], out: str | Path) -> tuple[list[str], dict[str, str]]:
    """The command (argument list) and extra environment that fetch the image to ``out``'s partial file."""
    runtime, image = slime_cfg["container_runtime"], slime_cfg["image"]
    out = Path(os.path.abspath(out))
    if runtime == "apptainer":
        images = out.parent
        env = {"APPTAINER_CACHEDIR": str(images / "apptainer-cache"), "APPTAINER_TMPDIR": str(images / "tmp")}
        ref = image if "://" in image else f"docker://{image}"
        return ["apptainer", "pull", "--force", str(out) + ".partial", ref], env
    if runtime == "docker":
        return ["docker", "pull", image], {}
    raise ContainerError(f"no image to pull for container_runtime {runtime!r}")


def fetch_image(slime_cfg: Mapping[str, Any], out: str | Path, *, run=subprocess.run, log=None) -> Path:
    """Pull (apptainer: and convert) the image once to ``out``; resumable (see the module docstring)."""
    from searchr1.fsutil import publish_file, write_text_atomic

    out = Path(os.path.abspath(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    runtime, image = slime_cfg["container_runtime"], slime_cfg["image"]
    if runtime == "apptainer" and is_local_sif(image):
        src = Path(image).resolve()
        if not src.is_file():
            raise ContainerError(f"train.slime.image {image!r} is not a file")
        out.unlink(missing_ok=True)
        out.symlink_to(src)
        return out
    command, env = pull_command(slime_cfg, out)
    for d in env.values():
        Path(d).mkdir(parents=True, exist_ok=True)
    if log:
        log(f"pulling {image}: {' '.join(command)}")
    proc = run(command, env={**os.environ, **env}, check=False)
    if proc.returncode != 0:
        raise ContainerError(f"{' '.join(command)} exited with status {proc.returncode} (rerun resumes the pull)")
    if runtime == "apptainer":
        publish_file(str(out) + ".partial", out)
    else:
        inspect = run(
            ["docker", "image", "inspect", "--format", "{{.Id}}", image], capture_output=True, text=True, check=False
        )
        image_id = (inspect.stdout or "").strip()
        if inspect.returncode != 0 or not image_id:
            raise ContainerError(f"docker image inspect {image} failed after the pull: {inspect.stderr}")
        write_text_atomic(out, image_id + "\n")
    return out


def image_ref(slime_cfg: Mapping[str, Any], image_path: str | Path | None) -> str:
    """What ``apptainer exec`` / ``docker run`` runs: the pulled file (id) when given, else the config's image."""
    runtime, image = slime_cfg["container_runtime"], slime_cfg["image"]
    if image_path is None:
        if runtime == "apptainer":
            return image if is_local_sif(image) or "://" in image else f"docker://{image}"
        return image
    if runtime == "apptainer":
        return os.path.abspath(image_path)
    text = Path(image_path).read_text().strip() if Path(image_path).is_file() else ""
    return text or image  # the dry-run preview, before the pull: the image name


def check_absolute(command: Sequence[str], binds: Sequence[str]) -> None:
    """Refuse a container command with a relative bind or a relative path argument that exists on the host
    (inside a container the working directory differs, so such a path would point elsewhere)."""
    for d in binds:
        if not os.path.isabs(d):
            raise ContainerError(f"container bind {d!r} is not an absolute path")
    for arg in command:
        if isinstance(arg, str) and arg and not arg.startswith("-") and not os.path.isabs(arg) and "/" in arg:
            if os.path.exists(arg):
                raise ContainerError(f"container command argument {arg!r} is a relative path; pass it absolute")
