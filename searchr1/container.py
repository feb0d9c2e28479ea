"""The slime container image as a DAG step of its own, and the absolute-path checks of every container command.

The first ``apptainer exec docker://...`` converts the whole image (tens of GB) to a SIF before running
anything, which does not fit inside the Ray head's start-up wait. So the workflow pulls it once, in rule
``container_image``, to a file under ``<work_dir>/images/`` that every later step runs from:

* apptainer: ``apptainer pull <file>.partial docker://<image>``, renamed to ``<file>.sif`` when complete.
  Layers are cached in ``<work_dir>/images/apptainer-cache`` (``APPTAINER_CACHEDIR``), so a pull killed half
  way resumes from the layers it already has; the conversion's scratch space is ``<work_dir>/images/tmp``
  (``APPTAINER_TMPDIR``: /tmp is often too small). Apptainer prints its own progress to the job's log.
* docker: ``docker pull <image>`` (the daemon resumes layers itself and keeps them in its own data root, not
  under work_dir), then the image's registry digest reference (``slimerl/slime@sha256:...``) is written to
  ``<file>.docker-ref``; the train and evaluation containers run that reference with ``--pull missing``.
  A digest names the exact content that was pulled and, unlike an image *id*, any node can pull it from the
  registry, so a compute node that lacks the image fetches the same bytes (its daemon caches the layers).
  The alternative, a ``docker save`` tarball on the shared filesystem, was not chosen: every job on a fresh
  node would ``docker load`` tens of GB, and docker has no "load unless present" by content. A cluster
  whose compute nodes cannot reach the registry should use apptainer: its image is one ``.sif`` file on the
  shared filesystem. On SLURM the docker step runs as a job on a compute node (where docker runs), the
  apptainer pull on the submit host (which usually has the network).
* an image that is already a local ``.sif`` file (``train.slime.image: /path/slime.sif``) is linked.

GPUs inside the container are the ones the job was given, never all of the node's: apptainer's ``--nv``
keeps the host's ``CUDA_VISIBLE_DEVICES`` (apptainer passes the host environment), and docker gets
``--gpus "device=<ids>"`` from the launching process's ``CUDA_VISIBLE_DEVICES`` (``gpu_devices``), which
SLURM sets to the job's GPUs and which a caller may narrow further (e.g. to keep slime's Ray head off the
retriever's GPUs). The cluster-network environment (``train.slime.env``: NCCL_SOCKET_IFNAME and the like)
enters the container as ``--env`` (apptainer) or ``-e`` (docker) arguments: ``env_args``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

RUNTIMES = ("apptainer", "docker", "none")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


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
    suffix = ".sif" if runtime == "apptainer" else ".docker-ref"
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
        write_text_atomic(out, docker_digest_ref(image, run=run) + "\n")
    return out


def docker_digest_ref(image: str, *, run=subprocess.run) -> str:
    """The registry digest reference (``repo@sha256:...``) of a pulled docker image: pullable by any node."""
    inspect = run(
        ["docker", "image", "inspect", "--format", "{{json .RepoDigests}}", image],
        capture_output=True,
        text=True,
        check=False,
    )
    if inspect.returncode != 0:
        raise ContainerError(f"docker image inspect {image} failed after the pull: {inspect.stderr.strip()}")
    digests = json.loads(inspect.stdout or "null") or []
    repo = image.split("@", 1)[0]
    repo = repo.rsplit(":", 1)[0] if ":" in repo.rsplit("/", 1)[-1] else repo
    # The digest of the repository asked for, when the image has several names.
    for ref in digests:
        if ref.split("@", 1)[0] in (repo, f"docker.io/{repo}", f"docker.io/library/{repo}"):
            return ref
    if digests:
        return digests[0]
    raise ContainerError(
        f"docker image {image} has no registry digest (built or loaded locally), so a compute node cannot pull "
        "it: push it to a registry and set train.slime.image to that name, or use container_runtime apptainer"
    )


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


def gpu_devices(env: Mapping[str, str] | None = None) -> str | None:
    """The GPUs a docker container may use, as docker's ``device=`` list, from the launching process's env.

    ``CUDA_VISIBLE_DEVICES`` first (SLURM sets it to the step's GPUs; a caller may narrow it), then SLURM's
    ``SLURM_STEP_GPUS`` / ``SLURM_JOB_GPUS``. None outside SLURM with no GPU variable set: the whole machine
    (docker's ``all``). Indices are NVML's, as SLURM's gres indices are; with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``
    CUDA numbers the GPUs the same way (its default, fastest first, may differ on mixed-GPU nodes).
    """
    env = os.environ if env is None else env
    for key in ("CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        value = env.get(key)
        if value is None:
            continue
        ids = [d.strip() for d in value.split(",") if d.strip()]
        if not ids or any(not re.fullmatch(r"[0-9]+|GPU-[0-9A-Fa-f-]+|MIG-[0-9A-Za-z/-]+", d) for d in ids):
            raise ContainerError(
                f"{key}={value!r}: no GPU ids a docker container can be given (--gpus device=<ids>); "
                "the job has no GPUs, or the variable names them in a way docker does not understand"
            )
        return ",".join(ids)
    if env.get("SLURM_JOB_ID"):
        raise ContainerError(
            f"inside SLURM job {env['SLURM_JOB_ID']} but neither CUDA_VISIBLE_DEVICES nor SLURM_JOB_GPUS is set: "
            "the job was given no GPUs, and a docker container would otherwise see every GPU of the node"
        )
    return None


def env_args(runtime: str, env: Mapping[str, str]) -> list[str]:
    """``env`` as container arguments: apptainer ``--env K=V``, docker ``-e K=V``, none ``K=V`` (for env(1)).

    apptainer parses each ``--env`` value as a pflag string-to-string (spf13/pflag string_to_string.go ``Set``):
    one ``=`` in it is a single pair taken verbatim but for surrounding double quotes, more than one is read as
    a CSV record, so a value holding ``=`` is passed as one CSV-quoted field. Names must be environment variable
    names; values strings without NUL.
    """
    out: list[str] = []
    for key, value in env.items():
        if not isinstance(key, str) or not ENV_NAME.match(key):
            raise ContainerError(f"train.slime.env: {key!r} is not an environment variable name")
        if not isinstance(value, str) or "\0" in value:
            raise ContainerError(f"train.slime.env.{key}: the value must be a string without NUL, got {value!r}")
        pair = f"{key}={value}"
        if runtime == "none":  # already inside the image: env(1)'s K=V arguments
            out.append(pair)
        elif runtime == "docker":
            out += ["-e", pair]
        elif runtime == "apptainer":
            if "=" in value:
                pair = '"' + pair.replace('"', '""') + '"'
            elif value.endswith('"'):  # the single-pair form would lose it (strings.Trim), and cannot be quoted
                raise ContainerError(f"train.slime.env.{key}: apptainer --env cannot pass a value ending in '\"'")
            out += ["--env", pair]
    return out


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
