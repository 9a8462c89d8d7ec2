"""Finding a model: a directory on disk, a bundled model by name, or a repo id in the local
Hugging Face cache (never downloaded).
"""

from __future__ import annotations
import os
import re
import stat
from pathlib import Path
from llama_np.errors import CheckpointError
from llama_np.formats.files import _status_or_none, is_dir, kind_of_file


ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"


def bundled_model_names() -> list[str]:
    """Names of the models shipped in ``llama_np/assets/``, sorted."""
    if not ASSETS_DIR.is_dir():
        return []
    return sorted(
        entry.name
        for entry in ASSETS_DIR.iterdir()
        if entry.is_dir() and not entry.name.startswith((".", "_"))
    )


def resolve_model_path(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """An existing directory as given, else the bundled model of that name, else the snapshot
    of a repo id ("org/name", at ``revision``) in the local Hugging Face cache, else
    CheckpointError."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise CheckpointError(
            f"a model is named by a path or a bundled model name (a str), got "
            f"{type(name_or_path).__name__} {name_or_path!r:.80}"
        )
    if "\0" in os.fspath(name_or_path):
        raise CheckpointError(f"{os.fspath(name_or_path)!r:.120} holds a NUL byte: it names no directory, "
                              "bundled model or repo id")
    path = Path(name_or_path).expanduser()
    if is_dir(path) and revision is None:
        return path
    names = bundled_model_names()
    if str(name_or_path) in names and revision is None:
        return ASSETS_DIR / str(name_or_path)
    if isinstance(name_or_path, str) and REPO_ID.fullmatch(name_or_path):
        return hub_cache_snapshot(name_or_path, revision)
    if revision is not None:
        raise CheckpointError(f"revision={revision!r} is for a repo id such as "
                              f"'meta-llama/Llama-2-7b-hf', not for {name_or_path}")
    status = _status_or_none(path, CheckpointError)
    if status is not None:
        raise CheckpointError(
            f"{path} is {kind_of_file(status.st_mode)}; a model is named by the directory holding its "
            "config.json and weights, by a GGUF file, or by a bundled model name"
        )
    available = ", ".join(names) if names else "none are installed"
    raise CheckpointError(
        f"{name_or_path} does not exist: it is neither a directory nor a bundled model name "
        f"(bundled models: {available})"
    )


# A Hugging Face repo id: "org/name", letters, digits, "-", "_" and "." (not a path like "./x").
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def hub_cache_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The snapshot directory of ``repo_id`` in the local Hugging Face hub cache; never downloads.

    The lookup is huggingface_hub's own (``snapshot_download(local_files_only=True)``): the cache
    is ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``; a revision
    (default "main") is a branch or tag named in ``models--org--name/refs/`` or a commit hash
    under ``snapshots/``. huggingface_hub is the optional extra ``llama-np[hub]``.
    """
    try:
        import huggingface_hub  # optional extra llama-np[hub]
        from huggingface_hub import constants  # optional extra llama-np[hub]
    except ImportError:
        raise CheckpointError(
            f"{repo_id} is not a directory or a bundled model name; to find it as a repo id in "
            "the Hugging Face cache, llama_np needs the huggingface_hub package: "
            "pip install 'llama-np[hub]'"
        ) from None
    cache = constants.HF_HUB_CACHE
    _check_ref_is_a_file(Path(cache), repo_id, revision)
    try:
        snapshot = Path(huggingface_hub.snapshot_download(repo_id, revision=revision,
                                                          local_files_only=True))
    except Exception as error:  # LocalEntryNotFoundError, a bad revision or repo id, ...
        at = "" if revision is None else f" at revision {revision!r}"
        flag = "" if revision is None else f" --revision {revision}"
        raise CheckpointError(
            f"{repo_id}{at} is not a directory, not a bundled model name, and not in the Hugging "
            f"Face cache (searched {cache}; set HF_HUB_CACHE or HF_HOME to search elsewhere; "
            f"{type(error).__name__}). llama_np never downloads: fetch it with "
            f"`huggingface-cli download {repo_id}{flag}` (`hf download {repo_id}{flag}` with "
            "huggingface_hub 1.0 or later) and try again"
        ) from None
    _check_inside_cache(Path(cache), snapshot, repo_id)
    return snapshot


def _check_inside_cache(cache: Path, snapshot: Path, repo_id: str) -> None:
    """CheckpointError if the snapshot, or a file in it, leads outside the cache.

    A snapshot's files are links into the repo's ``blobs/``; huggingface_hub treats the cache as
    its own tree, and a link to /etc or to another user's files is not a model of that repo.
    """
    root = cache.resolve()
    for entry in [snapshot, *sorted(snapshot.iterdir())]:
        target = entry.resolve()
        if target != root and root not in target.parents:
            raise CheckpointError(f"{entry} in the Hugging Face cache of {repo_id} leads to {target}, outside "
                                  f"the cache ({root}); the cache is damaged or was tampered with: delete "
                                  "that entry and download again")



def _check_ref_is_a_file(cache: Path, repo_id: str, revision: str | None) -> None:
    """CheckpointError if the cache's ``refs/<revision>`` is there but not a regular file.

    huggingface_hub reads that file to learn the snapshot's commit; a FIFO in its place would
    make it wait for ever.
    """
    if not REPO_ID.fullmatch(repo_id) or (revision is not None and ("/" in revision or revision.startswith("."))):
        return  # not a name in the cache's layout: huggingface_hub says what is wrong with it
    ref = cache / ("models--" + repo_id.replace("/", "--")) / "refs" / (revision or "main")
    status = _status_or_none(ref, CheckpointError)
    if status is not None and not stat.S_ISREG(status.st_mode):
        raise CheckpointError(f"{ref} is not a regular file (the Hugging Face cache keeps a commit hash "
                              "there); the cache is damaged: delete that entry and download again")
