"""Models named by a hub ID (`org/name` or `org/name@revision`), resolved once on the login
node to a local snapshot in the Hugging Face cache.

On a cluster, 500 array tasks each asking the hub for a 15 GB model is slow at best and, on
nodes without internet, impossible. So the driver resolves every hub ID before it submits
anything (`snapshot_download`: `HF_HOME` and `HF_HUB_OFFLINE` are honoured, with a progress
bar), records the snapshot's path and commit in the manifest, and each job loads only that
path. Later drivers reuse the recorded commit, so a run never mixes two versions of a model.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from distill.config import RunConfig
from distill.errors import ConfigError, DistillError

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w./-]+))?$")
MODEL_KEYS = ("teacher", "student")
# Other frameworks' copies of the weights, which transformers and vLLM never read.
SKIPPED = ["*.pth", "*.pt", "original/*", "*.gguf", "*.onnx", "*.msgpack", "*.h5", "*.ot"]


def hub_id(ref: str) -> re.Match[str] | None:
    """The parts of a hub ID, or None for a local path (an existing path always wins)."""
    return None if Path(ref).exists() else HUB_ID.match(ref)


def download_hint(repo: str) -> str:
    return f"`hf download {repo}` where the hub is reachable, with the same HF_HOME"


def resolve(ref: str, where: str, revision: str | None = None) -> dict[str, str]:
    """Snapshot of hub ID `ref` (at `revision` when given): {ref, revision (a commit), path}."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    m = HUB_ID.match(ref)
    assert m is not None, ref
    repo, revision = m["repo"], revision or m["rev"]
    try:
        path = snapshot_download(repo, revision=revision, ignore_patterns=SKIPPED)
    except GatedRepoError:
        raise ConfigError(f"{where}: {repo} is gated: accept its terms on huggingface.co, then log in "
                          f"(`hf auth login` or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{where}: {repo} is not a model on the hub (a typo? a private one needs HF_TOKEN); "
                          "a local model is a directory path") from None
    except RevisionNotFoundError:
        raise ConfigError(f"{where}: {repo} has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        offline = " (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else ""
        raise ConfigError(f"{where}: {ref} is not in the Hugging Face cache {constants.HF_HUB_CACHE} and the hub "
                          f"cannot be reached{offline}: {download_hint(repo)}") from None
    except OSError as exc:
        said = str(exc).strip()
        raise ConfigError(f"{where}: {ref}: {said.splitlines()[0] if said else exc!r}") from None
    return {"ref": ref, "revision": Path(path).name, "path": str(path)}


def resolve_models(cfg: RunConfig, recorded: dict[str, Any], say: Any = print) -> dict[str, dict[str, str]]:
    """The snapshots of the config's hub-ID models, key -> {ref, revision, path}. A model the
    run has already recorded keeps its commit (and, while it is there, its path)."""
    out: dict[str, dict[str, str]] = {}
    for key in MODEL_KEYS:
        ref = getattr(cfg.models, key)
        if hub_id(ref) is None:
            continue
        before = recorded.get(key)
        pinned = before["revision"] if before and before.get("ref") == ref else None
        if pinned and Path(before["path"]).is_dir():
            out[key] = before
            continue
        say(f"models.{key}: resolving {ref} in the Hugging Face cache" + (f" at {pinned[:12]}" if pinned else ""))
        out[key] = resolve(ref, f"{cfg.source}: models.{key}", pinned)
    return out


def local_models(cfg: RunConfig, recorded: dict[str, Any]) -> RunConfig:
    """`cfg` with each hub ID replaced by the snapshot path the run recorded, for a job."""
    paths = {}
    for key in MODEL_KEYS:
        ref = getattr(cfg.models, key)
        if hub_id(ref) is None:
            continue
        rec = recorded.get(key)
        if rec is None or rec.get("ref") != ref:
            raise DistillError(f"models.{key}: the hub ID {ref} has not been resolved for this run: start it with "
                               "the driver (make iter) or `python -m jobs.sbatch prepare`")
        if not Path(rec["path"]).is_dir():
            raise DistillError(f"models.{key}: {rec['path']}, the snapshot of {ref} this run uses, is gone (scratch "
                               f"purged, or another HF_HOME?): rerun the driver to fetch commit "
                               f"{rec['revision']} again")
        paths[key] = rec["path"]
    return dataclasses.replace(cfg, models=dataclasses.replace(cfg.models, **paths)) if paths else cfg


def record_models(manifest: Any, models: dict[str, dict[str, str]]) -> None:
    """Record resolved snapshots in the run's manifest (`models`), where they differ."""
    recorded = manifest.read().get("models", {})
    if any(recorded.get(k) != v for k, v in models.items()):
        manifest.set_meta(models=recorded | models)
