"""Pretrained weight files: downloaded once, verified, cached.

`fetch(urls, filename, sha256=...)` returns `cache_dir()/filename`. When the
file is there already it is returned with no network access; otherwise it is
downloaded with `keras.utils.get_file` (Keras's progress bar) into a
`.partial-<pid>-<random>` folder inside the cache folder, checked (size, full
sha256, a torchvision-style sha256 prefix such as `0676ba61` in
`resnet50-0676ba61.pth`, or md5) and only then renamed into place with
`os.replace`. A kill at any moment therefore never leaves a file at the final
path; the partial folders of dead runs are removed by the next call. Several
URLs are mirrors of one file, tried in order: one that cannot be reached or
gives a file that does not match is skipped (a warning names a mismatch when
a later source succeeds).

`fetch_hf(repo_id, filename)` takes a file from the Hugging Face Hub (timm's
`model.safetensors`) with `huggingface_hub.hf_hub_download`, which keeps its
own cache (`HF_HOME` / `HF_HUB_CACHE`) and honours `HF_HUB_OFFLINE=1`: a
pre-populated Hugging Face cache works with no network.

The mirror variable `KERAS_RESNET_WEIGHTS_MIRROR` names a base URL
(`http(s)://...`) or a local folder tried before the usual source:
`<mirror>/<filename>` for `fetch`, `<mirror>/<owner>__<name>/<filename>`
(the repository id with `/` replaced by `__`, one copy per repository
whatever the revision) for `fetch_hf`. A file from a mirror folder is copied,
verified and placed like a download; `fetch_hf` keeps its mirror copies in
`cache_dir()/<owner>__<name>/` and uses them from then on.

Every failure is one line (`WeightsDownloadError`): a hash or size mismatch
names the source, the expected and the actual value; a download that cannot
be made names the file, the URL, the reason, where to put the file by hand
and the mirror variable.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from keras_resnet_settings.errors import ConversionError
from keras_resnet_settings.weights import CACHE_VARIABLE, cache_dir, hf_mirror_folder

MIRROR_VARIABLE = "KERAS_RESNET_WEIGHTS_MIRROR"
PARTIAL_MARK = ".partial-"
STALE_PARTIAL_SECONDS = 6 * 3600  # a partial folder untouched this long is dead even if its pid is reused
HF_ENDPOINT = "https://huggingface.co"
_CHUNK = 1 << 20


class WeightsDownloadError(ConversionError):
    """A weight file that could not be downloaded, or did not match its expected size or hash."""


# ---------------------------------------------------------------------------
# Places


def _mirror() -> str | None:
    """The mirror variable's value without a trailing slash, or None when unset or empty."""
    value = os.environ.get(MIRROR_VARIABLE, "").strip()
    return value.rstrip("/\\") or None


def _is_url(location: str) -> bool:
    return location.lower().startswith(("http://", "https://", "file://", "ftp://"))


def _mirror_source(relative: str) -> str | None:
    """The mirror's copy of `relative` (a URL or a local path), or None without a mirror."""
    mirror = _mirror()
    if mirror is None:
        return None
    if _is_url(mirror):
        return f"{mirror}/{relative}"
    return str(Path(mirror).expanduser() / relative)


def _check_filename(filename: str) -> None:
    """Raises WeightsDownloadError for a name that is not a plain file name inside the cache."""
    plain = filename and os.path.basename(filename) == filename and "/" not in filename and "\\" not in filename
    if not plain or filename in (".", "..") or filename.startswith(PARTIAL_MARK):
        raise WeightsDownloadError(f"bad weight file name {filename!r}: give a plain file name such as 'resnet50-0676ba61.pth'")


# ---------------------------------------------------------------------------
# Checks


def file_digest(path, algorithm: str = "sha256") -> str:
    """The hash of a file as lowercase hex.

    Args:
        path: the file.
        algorithm: a `hashlib` name (`sha256`, `md5`).

    Returns:
        The hex digest.
    """
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Expected:
    """What a weight file must be: any of its size, full sha256, sha256 prefix, md5 (None: not checked)."""

    sha256: str | None = None
    hash_prefix: str | None = None
    md5: str | None = None
    size: int | None = None

    def problem(self, path, source: str) -> str | None:
        """What is wrong with the file at `path` (fetched from `source`), as one line, or None if it matches.

        Args:
            path: the file to check.
            source: the URL or path it came from, named in the message.

        Returns:
            `"sha256 mismatch for <source>: expected <hex>, got <hex>"` (or
            the size / prefix / md5 equivalent), or None.
        """
        if self.size is not None and os.path.getsize(path) != self.size:
            return f"size mismatch for {source}: expected {self.size} bytes, got {os.path.getsize(path)}"
        if self.sha256 is not None or self.hash_prefix is not None:
            actual = file_digest(path)
            if self.sha256 is not None and actual != self.sha256.lower():
                return f"sha256 mismatch for {source}: expected {self.sha256.lower()}, got {actual}"
            if self.hash_prefix is not None and not actual.startswith(self.hash_prefix.lower()):
                return f"sha256 prefix mismatch for {source}: expected {self.hash_prefix.lower()}..., got {actual}"
        if self.md5 is not None:
            actual = file_digest(path, "md5")
            if actual != self.md5.lower():
                return f"md5 mismatch for {source}: expected {self.md5.lower()}, got {actual}"
        return None


# ---------------------------------------------------------------------------
# Partial downloads


def _pid_alive(pid: int) -> bool:
    """True unless `pid` certainly runs no more on this machine (always True on Windows)."""
    if os.name == "nt" or pid <= 0:  # os.kill(pid, 0) sends CTRL_C_EVENT on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _newest_mtime(folder: Path) -> float:
    """The latest modification time of a folder or anything in it (0 when it vanished)."""
    try:
        times = [folder.stat().st_mtime] + [entry.stat().st_mtime for entry in folder.iterdir()]
    except OSError:
        return 0.0
    return max(times)


def _is_stale(partial: Path) -> bool:
    """A partial folder whose process is dead, or that nothing has written to for hours."""
    pid_text = partial.name[len(PARTIAL_MARK) :].split("-", 1)[0]
    if pid_text.isdigit() and not _pid_alive(int(pid_text)):
        return True
    return time.time() - _newest_mtime(partial) > STALE_PARTIAL_SECONDS


def clean_stale_partials(directory) -> None:
    """Removes the partial download folders of killed runs from a cache folder.

    Args:
        directory: the cache folder (missing is fine). Partial folders of
            downloads still running (their process alive) are left alone.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        if entry.name.startswith(PARTIAL_MARK) and entry.is_dir() and _is_stale(entry):
            shutil.rmtree(entry, ignore_errors=True)


def _new_partial_folder(directory: Path) -> Path:
    """A fresh `.partial-<pid>-<random>` folder in `directory` (created with it).

    Raises:
        WeightsDownloadError: the cache folder cannot be written.
    """
    partial = directory / f"{PARTIAL_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        partial.mkdir(parents=True)
    except OSError as error:
        raise WeightsDownloadError(
            f"cannot write the weights cache {directory} ({error.strerror or error}); "
            f"set {CACHE_VARIABLE} to a writable folder"
        ) from None
    return partial


def _place(temporary: Path, final: Path) -> None:
    """Flushes `temporary` to disk and renames it to `final` in one step."""
    with open(temporary, "r+b") as handle:  # writable: Windows cannot fsync a read-only handle
        os.fsync(handle.fileno())
    os.replace(temporary, final)


# ---------------------------------------------------------------------------
# Getting one source


@contextmanager
def _keras_progress(progress: bool):
    """Keras's progress bar and messages on (as they are) or, with `progress=False`, off for the block."""
    import keras

    was_on = keras.config.is_interactive_logging_enabled()
    if was_on and not progress:
        keras.config.disable_interactive_logging()
    try:
        yield
    finally:
        if was_on and not progress:
            keras.config.enable_interactive_logging()


def _download_reason(error: BaseException) -> str:
    """A short reason for a failed download: `HTTP 404 Not Found`, `[Errno 111] Connection refused`, ..."""
    import urllib.error

    if isinstance(error, FileNotFoundError):
        return "no such file"
    for candidate in (error, error.__context__, error.__cause__):
        if isinstance(candidate, urllib.error.HTTPError):
            return f"HTTP {candidate.code} {candidate.reason}".strip()
        if isinstance(candidate, urllib.error.URLError):
            return str(candidate.reason)
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text[:200]


def _download(url: str, partial: Path, name: str, progress: bool) -> Path:
    """Downloads `url` to `partial/name` with `keras.utils.get_file` (its progress bar).

    Raises:
        Exception: whatever get_file raises when the download fails.
    """
    import keras

    with _keras_progress(progress):
        path = keras.utils.get_file(fname=name, origin=url, cache_dir=str(partial), cache_subdir=".")
    return Path(path)


def _copy(source: str, partial: Path, name: str) -> Path:
    """Copies a local file (a mirror folder's copy) to `partial/name`."""
    target = partial / name
    shutil.copyfile(source, target)
    return target


def _get_one(source: str, partial: Path, name: str, progress: bool) -> Path:
    """A URL downloaded or a local path copied into the partial folder."""
    if _is_url(source):
        return _download(source, partial, name, progress)
    return _copy(source, partial, name)


# ---------------------------------------------------------------------------
# Fetching


def _unavailable_message(filename: str, failures: list[tuple[str, str]], put: str, hint: str = "it") -> str:
    """The one-line 'could not download' error text; `put` says where the file may be put by hand."""
    tried = ", ".join(f"{source} ({reason})" for source, reason in failures)
    return f"could not download {filename} from {tried}; {put}, or set {MIRROR_VARIABLE} to a folder or URL that has {hint}"


def _try_sources(final: Path, sources: list[str], expected: Expected, progress: bool):
    """Tries `sources` in order until one gives a file that passes the checks, and places it at `final`.

    Each source is fetched into its own partial folder beside `final`, which
    is removed afterwards whatever happens; only a checked file is renamed
    to `final`.

    Returns:
        `(final or None, failures, mismatches)`: `failures` lists
        `(source, reason)` for the sources that could not be had,
        `mismatches` one line per source whose file did not match.

    Raises:
        WeightsDownloadError: the cache folder cannot be written.
    """
    clean_stale_partials(final.parent)
    failures: list[tuple[str, str]] = []
    mismatches: list[str] = []
    for source in sources:
        partial = _new_partial_folder(final.parent)
        try:
            try:
                fetched = _get_one(source, partial, final.name, progress)
            except Exception as error:  # noqa: BLE001 (any failure of one source: try the next)
                failures.append((source, _download_reason(error)))
                continue
            problem = expected.problem(fetched, source)
            if problem is not None:
                mismatches.append(problem)
                continue
            _place(fetched, final)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        for problem in mismatches:
            warnings.warn(f"{problem}; used {source} instead", stacklevel=4)
        return final, failures, mismatches
    return None, failures, mismatches


def _mismatch_error(mismatches: list[str]) -> WeightsDownloadError:
    """The one-line error for the first source whose file did not match (its download deleted)."""
    return WeightsDownloadError(f"{mismatches[0]}; the download was deleted")


def fetch(
    urls: str | list[str],
    filename: str,
    *,
    sha256: str | None = None,
    hash_prefix: str | None = None,
    md5: str | None = None,
    size: int | None = None,
    progress: bool = True,
    verify: bool = False,
) -> Path:
    """A weight file from the cache, downloading, checking and caching it on first use.

    Args:
        urls: the file's URL, or several URLs of the same file (mirrors) tried
            in order. `KERAS_RESNET_WEIGHTS_MIRROR` (a base URL or a local
            folder), when set, is tried first as `<mirror>/<filename>`.
        filename: the plain file name in the cache folder.
        sha256: the file's full sha256 (hex), checked before it is cached.
        hash_prefix: the first hex characters of the sha256 (torchvision puts
            them in the file name: `resnet50-0676ba61.pth` -> `0676ba61`).
        md5: the file's full md5 (hex), for sources that publish only that
            (Keras applications); checked before it is cached.
        size: the file's size in bytes, checked before it is cached.
        progress: show Keras's download progress bar.
        verify: also re-check a file found in the cache (files are checked
            once, when placed; a file put there by hand is not, unless this).

    Returns:
        The path `cache_dir()/filename`.

    Raises:
        WeightsDownloadError: one line: a bad file name; a size or hash
            mismatch (the download deleted, nothing cached); no source could
            be reached (names the URL, the reason, the cache path and the
            mirror variable); with `verify`, a cached file that does not match.
    """
    _check_filename(filename)
    final = cache_dir() / filename
    expected = Expected(sha256=sha256, hash_prefix=hash_prefix, md5=md5, size=size)
    if final.is_file():
        if verify:
            problem = expected.problem(final, str(final))
            if problem is not None:
                raise WeightsDownloadError(f"{problem}; delete it to download it again")
        return final
    sources = [urls] if isinstance(urls, str) else list(urls)
    mirrored = _mirror_source(filename)
    if mirrored is not None:
        sources.insert(0, mirrored)
    placed, failures, mismatches = _try_sources(final, sources, expected, progress)
    if placed is not None:
        return placed
    if mismatches:
        raise _mismatch_error(mismatches)
    raise WeightsDownloadError(_unavailable_message(filename, failures, f"put the file at {final} by hand"))


# ---------------------------------------------------------------------------
# Hugging Face Hub


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


def hf_url(repo_id: str, filename: str, revision: str = "main") -> str:
    """The Hub's download URL of a file: `https://huggingface.co/<repo>/resolve/<revision>/<filename>`."""
    return f"{HF_ENDPOINT}/{repo_id}/resolve/{revision}/{filename}"


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


def _hf_reason(error: BaseException, offline: bool) -> str:
    """A short reason for a failed Hub download."""
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
    """`hf_hub_download` with the cache folder and offline switch read from the environment now."""
    from huggingface_hub import hf_hub_download

    offline = _env_true("HF_HUB_OFFLINE")
    with _hf_progress(progress), _hf_offline_mode(offline):
        path = hf_hub_download(
            repo_id,
            filename,
            revision=revision,
            cache_dir=str(hf_cache_dir()),
            local_files_only=offline,
        )
    return Path(path)


def _hf_mirror_copy(repo_id: str, filename: str) -> Path:
    """Where a Hub file taken from the mirror is kept: `cache_dir()/<owner>__<name>/<filename>`."""
    return cache_dir() / hf_mirror_folder(repo_id) / filename


def _from_hf_mirror(repo_id: str, filename: str, sha256: str | None, progress: bool):
    """A Hub file's copy from an earlier mirror fetch, or from the mirror now.

    Returns:
        `(path or None, failures, mismatches)` as `_try_sources`; all empty
        when there is no copy and no mirror. A copy already in the weights
        cache is returned with no network access, mirror set or not.
    """
    final = _hf_mirror_copy(repo_id, filename)
    if final.is_file():
        return final, [], []
    source = _mirror_source(f"{hf_mirror_folder(repo_id)}/{filename}")
    if source is None:
        return None, [], []
    return _try_sources(final, [source], Expected(sha256=sha256), progress)


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
    (`HF_HUB_CACHE`, `HF_HOME`) or downloads it there; with `HF_HUB_OFFLINE=1`
    it never touches the network.

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
            the Hub URL, the reason, the Hugging Face cache folder and the
            mirror variable).
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
            raise _mismatch_error(mismatches)
        raise WeightsDownloadError(_hf_unavailable_message(repo_id, filename, failures))
    problem = Expected(sha256=sha256).problem(path, f"{repo_id}/{filename} in the Hugging Face cache ({path})")
    if problem is not None:
        raise WeightsDownloadError(f"{problem}; delete it to download it again")
    return path


def _hf_unavailable_message(repo_id: str, filename: str, failures: list[tuple[str, str]]) -> str:
    """The one-line error for a Hub file that could not be had: the URL, the Hugging Face cache, the mirror."""
    repo_cache = hf_cache_dir() / f"models--{repo_id.replace('/', '--')}"
    put = (
        f"put it in the Hugging Face cache {repo_cache} (`hf download {repo_id} {filename}` where there is a network, "
        "then copy that folder; HF_HUB_CACHE or HF_HOME choose the cache)"
    )
    return _unavailable_message(filename, failures, put, f"{hf_mirror_folder(repo_id)}/{filename}")
