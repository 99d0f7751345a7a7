"""Files from the Hugging Face Hub: `fetch_hf` (timm's `model.safetensors`), verified and cached.

Split from `keras_resnet.weights.download` (which downloads from URLs and
mirrors and holds the shared verification, placement and error text); the
module docstring there describes both. `hf_hub_download` keeps its own
cache; `HF_ENDPOINT` is read when called; without `HF_HUB_OFFLINE`, one quick
request first checks that the Hub answers at all, so an offline machine gets
one line at once instead of huggingface_hub's retries.
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path

from keras_resnet.weights.download import (
    Expected,
    WeightsDownloadError,
    mirror_source,
    mismatch_error,
    try_sources,
    unavailable_error,
)
from keras_resnet_settings.weights import cache_dir, hf_mirror_folder

HF_ENDPOINT = "https://huggingface.co"  # the Hub, unless the HF_ENDPOINT variable names another
HUB_CHECK_TIMEOUT = 5.0  # seconds the quick "does the Hub answer at all" request may take


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hf_cache_dir() -> Path:
    """The Hugging Face Hub cache folder, read from the environment now (not at import).

    Returns:
        `$HF_HUB_CACHE` (or the older `$HUGGINGFACE_HUB_CACHE`), else
        `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else
        `~/.cache/huggingface/hub`.
    """
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.environ[name]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def hf_endpoint() -> str:
    """The Hub's address: `$HF_ENDPOINT` read now (huggingface_hub reads it once, at import), else huggingface.co."""
    return (os.environ.get("HF_ENDPOINT", "").strip() or HF_ENDPOINT).rstrip("/")


def hf_url(repo_id: str, filename: str, revision: str = "main") -> str:
    """The Hub's download URL of a file: `https://huggingface.co/<repo>/resolve/<revision>/<filename>`."""
    return f"{hf_endpoint()}/{repo_id}/resolve/{revision}/{filename}"


@contextmanager
def _hf_progress(progress: bool):
    """huggingface_hub's tqdm bars as they are or, with `progress=False`, off for the block."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    switch = not progress and not are_progress_bars_disabled()
    if switch:
        disable_progress_bars()
    try:
        yield
    finally:
        if switch:
            enable_progress_bars()


class _HubUnreachable(Exception):
    """The Hub did not answer the quick check and the file is not in the Hugging Face cache."""


def _network_reason(error: BaseException) -> str:
    """A short reason for a request that got no answer: `[Errno 111] Connection refused`, `timed out`..."""
    for candidate in (error, error.__cause__, error.__context__):
        if candidate is not None:
            found = re.search(r"\[Errno -?\d+\][^'\"\)\]]*", str(candidate))
            if found:
                return found.group(0).strip()
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text[:200]


def _hub_unreachable(endpoint: str) -> str | None:
    """Why the Hub gives no answer at all now, or None when it answers (with any status).

    One request, no retries, at most `HUB_CHECK_TIMEOUT` seconds, with
    huggingface_hub's own HTTP session (its proxies, certificates and
    offline switch), so that a machine with no network fails at once
    instead of through huggingface_hub's back-off.
    """
    try:
        from huggingface_hub.utils import get_session

        get_session().head(f"{endpoint}/", timeout=HUB_CHECK_TIMEOUT)
    except Exception as error:  # noqa: BLE001 (no answer, whatever the cause)
        return _network_reason(error)
    return None


@contextmanager
def _hf_quiet():
    """huggingface_hub's warnings (a line per retry) off for the block, unless its verbosity was raised.

    A failure is reported as one line (`WeightsDownloadError`); with
    `HF_HUB_VERBOSITY=info` or `debug` everything is shown as asked.
    """
    logger = logging.getLogger("huggingface_hub")
    was = logger.level
    switch = logger.getEffectiveLevel() == logging.WARNING
    if switch:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        if switch:
            logger.setLevel(was)


def _hf_reason(error: BaseException, offline: bool) -> str:
    """A short reason for a failed Hub download."""
    if isinstance(error, _HubUnreachable):
        return f"no answer from the Hub: {error}, and the file is not in the Hugging Face cache"
    names = {cls.__name__ for cls in type(error).__mro__}
    if "LocalEntryNotFoundError" in names:
        if offline:
            return "HF_HUB_OFFLINE is set and the file is not in the Hugging Face cache"
        return "no connection to the Hub and the file is not in the Hugging Face cache"
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first}"[:200]


@contextmanager
def _hf_offline_mode(offline: bool):
    """huggingface_hub's own offline switch on for the block when `offline`.

    huggingface_hub reads `HF_HUB_OFFLINE` once, when first imported; with the
    variable set later, `local_files_only=True` alone still lets it make
    side requests (2.x fetches an agent registry while building headers).
    """
    from huggingface_hub import constants

    was = getattr(constants, "HF_HUB_OFFLINE", False)
    switch = offline and not was
    if switch:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if switch:
            constants.HF_HUB_OFFLINE = was


def _from_hub(repo_id: str, filename: str, revision: str, progress: bool) -> Path:
    """`hf_hub_download` with the cache folder, endpoint and offline switch read from the environment now.

    Unless `HF_HUB_OFFLINE` is set, the endpoint is asked first whether it
    answers at all; when it does not, only the Hugging Face cache is looked
    in (huggingface_hub would retry for about 23 s, a warning per try).

    Raises:
        _HubUnreachable: the Hub gave no answer and the file is not cached.
        Exception: whatever `hf_hub_download` raises.
    """
    from huggingface_hub import hf_hub_download

    offline = _env_true("HF_HUB_OFFLINE")
    endpoint = hf_endpoint()
    with _hf_quiet():
        unreachable = None if offline else _hub_unreachable(endpoint)
        local_only = offline or unreachable is not None
        try:
            with _hf_progress(progress), _hf_offline_mode(local_only):
                path = hf_hub_download(
                    repo_id,
                    filename,
                    revision=revision,
                    cache_dir=str(hf_cache_dir()),
                    local_files_only=local_only,
                    endpoint=endpoint,
                )
        except Exception as error:
            names = {cls.__name__ for cls in type(error).__mro__}
            if unreachable is not None and "LocalEntryNotFoundError" in names:
                raise _HubUnreachable(unreachable) from error
            raise
    return Path(path)


def _hf_mirror_copy(repo_id: str, filename: str) -> Path:
    """Where a Hub file taken from the mirror is kept: `cache_dir()/<owner>__<name>/<filename>`."""
    return cache_dir() / hf_mirror_folder(repo_id) / filename


def _from_hf_mirror(repo_id: str, filename: str, sha256: str | None, progress: bool):
    """A Hub file's copy from an earlier mirror fetch, or from the mirror now.

    Returns:
        `(path or None, failures, mismatches)` as `try_sources`; all empty
        when there is no copy and no mirror. A copy already in the weights
        cache is returned with no network access, mirror set or not.
    """
    final = _hf_mirror_copy(repo_id, filename)
    if final.is_file():
        return final, [], []
    source = mirror_source(f"{hf_mirror_folder(repo_id)}/{filename}")
    if source is None:
        return None, [], []
    return try_sources(final, [source], Expected(sha256=sha256), progress)


def hf_cached_file(repo_id: str, filename: str, revision: str = "main") -> Path | None:
    """A Hub file already on this machine, found with no network access.

    Args:
        repo_id: the repository, e.g. `timm/resnet50.a1_in1k`.
        filename: the file in it, e.g. `model.safetensors`.
        revision: a branch, tag or commit (for the Hugging Face cache).

    Returns:
        The mirror copy in the weights cache, else the file in the Hugging
        Face cache, else None (also without huggingface_hub).
    """
    copy = _hf_mirror_copy(repo_id, filename)
    if copy.is_file():
        return copy
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id, filename, cache_dir=str(hf_cache_dir()), revision=revision)
    return Path(found) if isinstance(found, str) and os.path.isfile(found) else None


def fetch_hf(
    repo_id: str,
    filename: str,
    *,
    revision: str = "main",
    sha256: str | None = None,
    progress: bool = True,
) -> Path:
    """A file of a Hugging Face Hub repository (timm's `model.safetensors`), from a cache when there.

    `KERAS_RESNET_WEIGHTS_MIRROR`, when set, is tried first as
    `<mirror>/<owner>__<name>/<filename>` (for `timm/resnet50.a1_in1k`:
    `<mirror>/timm__resnet50.a1_in1k/model.safetensors`, whatever the
    revision); its copy is kept in `cache_dir()/<owner>__<name>/` and used
    from then on, mirror set or not, with no network access. Otherwise
    `huggingface_hub.hf_hub_download` serves it from the Hugging Face cache
    (`HF_HUB_CACHE`, `HF_HOME`) or downloads it there from `HF_ENDPOINT`
    (read now); with `HF_HUB_OFFLINE=1` it never touches the network, and
    when the Hub does not answer a quick first request (no network) only the
    Hugging Face cache is looked in, with no retries.

    Args:
        repo_id: the repository, e.g. `timm/resnet50.a1_in1k`.
        filename: the file in it, e.g. `model.safetensors`.
        revision: a branch, tag or commit.
        sha256: the file's full sha256 (hex), checked when given.
        progress: show huggingface_hub's progress bar (or Keras's, from a mirror URL).

    Returns:
        The file's path (inside the Hugging Face cache, or the weights cache
        for a mirror's copy).

    Raises:
        WeightsDownloadError: one line: a sha256 mismatch (names the file, the
            expected and the actual hash); the file could not be had (names
            the mirror path if set and the Hub URL with their reasons, the
            weights-cache path where a copy put by hand is used, the Hugging
            Face cache folder, and the mirror variable); its `unavailable`
            holds those parts.
    """
    mirrored, failures, mismatches = _from_hf_mirror(repo_id, filename, sha256, progress)
    if mirrored is not None:
        return mirrored
    url = hf_url(repo_id, filename, revision)
    try:
        path = _from_hub(repo_id, filename, revision, progress)
    except ImportError as error:
        hint = "; pip install 'huggingface_hub>=0.20'" if error.name == "huggingface_hub" else ""
        failures.append((url, f"{error}{hint}"))
        path = None
    except Exception as error:  # noqa: BLE001 (any Hub failure is reported as one line)
        failures.append((url, _hf_reason(error, _env_true("HF_HUB_OFFLINE"))))
        path = None
    if path is None:
        if mismatches:
            raise mismatch_error(mismatches)
        raise _hf_unavailable_error(repo_id, filename, failures)
    problem = Expected(sha256=sha256).problem(path, f"{repo_id}/{filename} in the Hugging Face cache ({path})")
    if problem is not None:
        raise WeightsDownloadError(f"{problem}; delete it to download it again")
    return path


def _hf_unavailable_error(repo_id: str, filename: str, failures: list[tuple[str, str]]) -> WeightsDownloadError:
    """The one-line error for a Hub file that could not be had: the URLs, where a copy is used, the mirror."""
    repo_cache = hf_cache_dir() / f"models--{repo_id.replace('/', '--')}"
    place = (
        f"{_hf_mirror_copy(repo_id, filename)} (or in the Hugging Face cache {repo_cache}, which HF_HUB_CACHE or "
        f"HF_HOME choose: `hf download {repo_id} {filename}` where there is a network, then copy that folder)"
    )
    return unavailable_error(filename, failures, place, f"{hf_mirror_folder(repo_id)}/{filename}")
