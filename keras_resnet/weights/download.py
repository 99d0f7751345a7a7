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

`fetch_hf(repo_id, filename)` (in `keras_resnet.weights.hub`) takes a file from the Hugging Face Hub (timm's
`model.safetensors`) with `huggingface_hub.hf_hub_download`, which keeps its
own cache (`HF_HOME` / `HF_HUB_CACHE`) and honours `HF_HUB_OFFLINE=1`: a
pre-populated Hugging Face cache works with no network. The endpoint
(`HF_ENDPOINT`) is read when called. Without `HF_HUB_OFFLINE`, one quick
request first checks that the endpoint answers at all: when it does not (no
network, no name resolution, a refused connection) the Hugging Face cache
alone is used, at once, instead of huggingface_hub's retries (about 23 s of
back-off with a warning per try); its warnings are silenced during the call
(unless its verbosity was raised), since a failure is reported as one line.

The mirror variable `KERAS_RESNET_WEIGHTS_MIRROR` names a base URL
(`http(s)://...`) or a local folder tried before the usual source:
`<mirror>/<filename>` for `fetch`, `<mirror>/<owner>__<name>/<filename>`
(the repository id with `/` replaced by `__`, one copy per repository
whatever the revision) for `fetch_hf`. A file from a mirror folder is copied,
verified and placed like a download; `fetch_hf` keeps its mirror copies in
`cache_dir()/<owner>__<name>/` and uses them from then on.

Every failure is one line (`WeightsDownloadError`): a hash or size mismatch
names the source, the expected and the actual value; a download that cannot
be made names the file, every source tried with its reason, where a file put
by hand is picked up, and the mirror variable (or, when it is set, the
mirror paths looked in). Such an error carries its parts (`unavailable`), so
that the catalogue can join the Hub's failure and its fallback's in one line.
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
from keras_resnet_settings.weights import CACHE_VARIABLE, cache_dir

MIRROR_VARIABLE = "KERAS_RESNET_WEIGHTS_MIRROR"
PARTIAL_MARK = ".partial-"
STALE_PARTIAL_SECONDS = 6 * 3600  # a partial folder untouched this long is dead even if its pid is reused
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Unavailable:
    """One file that no source could give.

    Attributes:
        filename: the file's name.
        failures: `(source, reason)` for every source tried, in order.
        place: where a copy put by hand is picked up (a path, perhaps with a note).
        mirror_path: the file's path inside a mirror (`<mirror>/<mirror_path>`).
    """

    filename: str
    failures: tuple
    place: str
    mirror_path: str


class WeightsDownloadError(ConversionError):
    """A weight file that could not be downloaded, or did not match its expected size or hash.

    Attributes:
        unavailable: the files no source could give (`Unavailable`), empty for a mismatch or a bad name.
    """

    def __init__(self, message: str, unavailable: tuple = ()):
        super().__init__(message)
        self.unavailable = tuple(unavailable)

    @classmethod
    def joined(cls, what: str, *errors: WeightsDownloadError) -> WeightsDownloadError:
        """One error for several files that are the same weights (the Hub's file and its fallback), or None.

        Args:
            what: what they are, e.g. `"resnet18d timm:ra2_in1k"`, the message's subject.
            errors: errors whose `unavailable` parts are joined.

        Returns:
            The joined error, or None when one of `errors` is not an unavailable file (a hash mismatch).
        """
        if not all(error.unavailable for error in errors):
            return None
        parts = tuple(part for error in errors for part in error.unavailable)
        return cls(_unavailable_text(parts, what), parts)


# ---------------------------------------------------------------------------
# Places


def _mirror() -> str | None:
    """The mirror variable's value without a trailing slash, or None when unset or empty."""
    value = os.environ.get(MIRROR_VARIABLE, "").strip()
    return value.rstrip("/\\") or None


def _is_url(location: str) -> bool:
    return location.lower().startswith(("http://", "https://", "file://", "ftp://"))


def mirror_source(relative: str) -> str | None:
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


def _mirror_advice(parts: tuple) -> str:
    """`, or set <variable> to ... that has <paths>`, or, when the mirror is set, `; not found in the mirror ...`."""
    mirror = _mirror()
    paths = [part.mirror_path for part in parts]
    if mirror is not None:
        looked = ", ".join(mirror_source(path) for path in paths)
        return f"; not found in the mirror {MIRROR_VARIABLE}={mirror}: {looked}"
    wanted = "it" if len(parts) == 1 and paths[0] == parts[0].filename else " or ".join(paths)
    return f", or set {MIRROR_VARIABLE} to a folder or URL that has {wanted}"


def _unavailable_text(parts: tuple, what: str | None = None) -> str:
    """The one-line 'could not download' text: every source with its reason, the places by hand, the mirror."""
    tried = ", nor ".join(
        f"{part.filename} from " + ", ".join(f"{source} ({reason})" for source, reason in part.failures)
        for part in parts
    )
    if len(parts) == 1:
        put = f"put the file at {parts[0].place} by hand"
    else:
        put = "put " + " or ".join(f"{part.filename} at {part.place}" for part in parts) + " by hand"
    head = f"could not download {what}: " if what else "could not download "
    return f"{head}{tried}; {put}{_mirror_advice(parts)}"


def unavailable_error(filename: str, failures: list, place: str, mirror_path: str) -> WeightsDownloadError:
    part = Unavailable(filename, tuple(failures), place, mirror_path)
    return WeightsDownloadError(_unavailable_text((part,)), (part,))


def try_sources(final: Path, sources: list[str], expected: Expected, progress: bool):
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


def mismatch_error(mismatches: list[str]) -> WeightsDownloadError:
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
    mirrored = mirror_source(filename)
    if mirrored is not None:
        sources.insert(0, mirrored)
    placed, failures, mismatches = try_sources(final, sources, expected, progress)
    if placed is not None:
        return placed
    if mismatches:
        raise mismatch_error(mismatches)
    raise unavailable_error(filename, failures, str(final), filename)


# ---------------------------------------------------------------------------
# Hugging Face Hub
