"""keras_resnet.weights.download: fetched once, verified, cached; never half a file; one-line errors.

No network: a local `ThreadingHTTPServer` serves a temporary folder; the
Hugging Face tests build a Hub cache folder by hand and set HF_HUB_OFFLINE.
"""

import functools
import hashlib
import http.server
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

try:  # read before any test sets HF_HUB_OFFLINE: huggingface_hub's constants are read once, at import
    import huggingface_hub
    import huggingface_hub.constants  # lazily imported otherwise; fetch_hf must not rely on it
except ImportError:  # pragma: no cover
    huggingface_hub = None

from keras_resnet.weights import MIRROR_VARIABLE, WeightsDownloadError, cache_dir, fetch, fetch_hf
from keras_resnet.weights.download import PARTIAL_MARK
from keras_resnet.weights.hub import hf_cached_file

PAYLOAD = bytes(range(256)) * 1024  # 256 KiB, so half of it is surely on disk before the kill
SHA = hashlib.sha256(PAYLOAD).hexdigest()
PREFIX = SHA[:8]
NAME = f"tiny-{PREFIX}.bin"  # torchvision style: the hash prefix in the name

needs_hf = pytest.mark.skipif(huggingface_hub is None, reason="huggingface_hub is not installed")


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the folder; `/slow/<name>` sends the headers and half the body, then stalls."""

    def log_message(self, *args):  # quiet
        pass

    def end_headers(self):  # a file under `<repo>/resolve/<revision>/` is served as the Hub serves it
        if "/resolve/" in self.path:
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{SHA}"')
        super().end_headers()

    def do_GET(self):  # http.server's name
        self.server.requests.append(self.path)
        if not self.path.startswith("/slow/"):
            return super().do_GET()
        body = (Path(self.directory) / self.path[len("/slow/") :]).read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.server.release.wait(20)


class _Server:
    """A local HTTP server in a thread, serving `root` at `url`; `stop()` takes it down."""

    def __init__(self, root: Path):
        self.root = root
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
        self.httpd.daemon_threads = True
        self.httpd.requests = []
        self.httpd.release = threading.Event()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.running = True

    @property
    def requests(self):
        return self.httpd.requests

    def stop(self):
        if self.running:
            self.running = False
            self.httpd.release.set()
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join(5)


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    (root / NAME).write_bytes(PAYLOAD)
    served = _Server(root)
    yield served
    served.stop()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("KERAS_RESNET_CACHE", str(folder))
    monkeypatch.delenv(MIRROR_VARIABLE, raising=False)
    return folder


def _closed_port_url(name=NAME):
    """A URL nothing listens on (connection refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


def _leftovers(folder: Path):
    return sorted(p.name for p in folder.glob(f"{PARTIAL_MARK}*")) if folder.exists() else []


def _one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


# ---------------------------------------------------------------------------


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("KERAS_RESNET_CACHE", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    assert cache_dir() == tmp_path / "kh" / "keras_resnet" / "weights"
    monkeypatch.setenv("KERAS_RESNET_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_download_checks_sha256_and_caches(server, cache, capsys):
    path = fetch(f"{server.url}/{NAME}", NAME, sha256=SHA, size=len(PAYLOAD))
    assert path == cache / NAME
    assert path.read_bytes() == PAYLOAD
    assert _leftovers(cache) == []
    assert "Downloading data from" in capsys.readouterr().out  # Keras's progress output
    server.stop()  # a cache hit needs no network and prints nothing
    assert fetch(f"{server.url}/{NAME}", NAME, sha256=SHA) == path
    assert capsys.readouterr().out == ""


def test_hash_prefix_check(server, cache):
    path = fetch(f"{server.url}/{NAME}", NAME, hash_prefix=PREFIX.upper())
    assert path.read_bytes() == PAYLOAD and _leftovers(cache) == []


def test_hash_prefix_mismatch(server, cache):
    (server.root / "wrong-00000000.bin").write_bytes(PAYLOAD)
    url = f"{server.url}/wrong-00000000.bin"
    with pytest.raises(WeightsDownloadError) as error:
        fetch(url, "wrong-00000000.bin", hash_prefix="00000000")
    text = _one_line(error)
    assert url in text and "00000000" in text and SHA in text
    assert not (cache / "wrong-00000000.bin").exists() and _leftovers(cache) == []


def test_sha256_mismatch_leaves_nothing(server, cache):
    url = f"{server.url}/{NAME}"
    wrong = "0" * 64
    with pytest.raises(WeightsDownloadError) as error:
        fetch(url, NAME, sha256=wrong)
    text = _one_line(error)
    assert url in text and wrong in text and SHA in text
    assert not (cache / NAME).exists()
    assert _leftovers(cache) == []


def test_md5_check(server, cache):
    md5 = hashlib.md5(PAYLOAD).hexdigest()
    with pytest.raises(WeightsDownloadError) as error:
        fetch(f"{server.url}/{NAME}", NAME, md5="0" * 32)
    assert f"md5 mismatch for {server.url}/{NAME}: expected {'0' * 32}, got {md5}" in _one_line(error)
    assert not (cache / NAME).exists()
    assert fetch(f"{server.url}/{NAME}", NAME, md5=md5).read_bytes() == PAYLOAD


def test_size_mismatch(server, cache):
    with pytest.raises(WeightsDownloadError) as error:
        fetch(f"{server.url}/{NAME}", NAME, size=len(PAYLOAD) + 1)
    assert "size mismatch" in _one_line(error)
    assert not (cache / NAME).exists()


def test_several_urls_are_mirrors_tried_in_order(server, cache):
    (server.root / "bad").mkdir()
    (server.root / "bad" / NAME).write_bytes(b"not the weights")
    urls = [_closed_port_url(), f"{server.url}/missing/{NAME}", f"{server.url}/bad/{NAME}", f"{server.url}/{NAME}"]
    with pytest.warns(UserWarning, match="sha256 mismatch"):
        path = fetch(urls, NAME, sha256=SHA)
    assert path.read_bytes() == PAYLOAD
    assert server.requests == [f"/missing/{NAME}", f"/bad/{NAME}", f"/{NAME}"]


def test_unreachable_url_is_one_line(cache):
    url = _closed_port_url()
    with pytest.raises(WeightsDownloadError) as error:
        fetch(url, NAME, sha256=SHA)
    text = _one_line(error)
    assert text.startswith(f"could not download {NAME} from {url} (")
    assert str(cache / NAME) in text and MIRROR_VARIABLE in text and "by hand" in text
    assert "refused" in text.lower()
    assert not (cache / NAME).exists() and _leftovers(cache) == []


def test_http_404_names_the_status(server, cache):
    with pytest.raises(WeightsDownloadError) as error:
        fetch(f"{server.url}/nothing-here.bin", "nothing-here.bin")
    assert f"from {server.url}/nothing-here.bin (HTTP 404" in _one_line(error)


def test_mirror_folder_first(server, cache, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / NAME).write_bytes(PAYLOAD)
    monkeypatch.setenv(MIRROR_VARIABLE, str(mirror))
    path = fetch(f"{server.url}/{NAME}", NAME, sha256=SHA)
    assert path == cache / NAME and path.read_bytes() == PAYLOAD
    assert server.requests == []  # the catalogue URL was never asked
    assert not path.samefile(mirror / NAME)  # a copy in the cache


def test_mirror_folder_without_the_file_falls_back(server, cache, tmp_path, monkeypatch):
    monkeypatch.setenv(MIRROR_VARIABLE, str(tmp_path / "empty-mirror"))
    assert fetch(f"{server.url}/{NAME}", NAME, sha256=SHA).read_bytes() == PAYLOAD
    assert server.requests == [f"/{NAME}"]


def test_mirror_url_first(server, cache, monkeypatch):
    (server.root / "mirror").mkdir()
    (server.root / "mirror" / NAME).write_bytes(PAYLOAD)
    monkeypatch.setenv(MIRROR_VARIABLE, f"{server.url}/mirror/")
    assert fetch(f"{server.url}/{NAME}", NAME, sha256=SHA).read_bytes() == PAYLOAD
    assert server.requests == [f"/mirror/{NAME}"]  # the catalogue URL was never asked


def test_bad_mirror_copy_is_rejected(cache, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / NAME).write_bytes(b"tampered")
    monkeypatch.setenv(MIRROR_VARIABLE, str(mirror))
    with pytest.raises(WeightsDownloadError) as error:
        fetch(_closed_port_url(), NAME, sha256=SHA)
    assert "sha256 mismatch" in _one_line(error) and str(mirror / NAME) in str(error.value)
    assert not (cache / NAME).exists() and _leftovers(cache) == []


def test_verify_rechecks_a_hand_placed_file(cache):
    cache.mkdir()
    (cache / NAME).write_bytes(b"hand placed, wrong")
    assert fetch(_closed_port_url(), NAME, sha256=SHA) == cache / NAME  # trusted without verify
    with pytest.raises(WeightsDownloadError) as error:
        fetch(_closed_port_url(), NAME, sha256=SHA, verify=True)
    assert "sha256 mismatch" in _one_line(error)


def test_bad_file_names(cache):
    for name in ("", "a/b.bin", "..", f"{PARTIAL_MARK}x"):
        with pytest.raises(WeightsDownloadError):
            fetch("http://127.0.0.1:9/x", name)


def _fetch_in_child(url):
    fetch(url, NAME, progress=False)


@pytest.mark.skipif(sys.platform == "win32", reason="needs fork and SIGKILL")
def test_download_killed_half_way_leaves_nothing(server, cache):
    # A forked child (a subprocess without a second TensorFlow import) downloads from a server that stalls after half
    # the body; it is SIGKILLed once the partial bytes are on disk.
    child = multiprocessing.get_context("fork").Process(target=_fetch_in_child, args=(f"{server.url}/slow/{NAME}",))
    child.start()
    try:
        deadline = time.monotonic() + 8
        while not any(p.stat().st_size > 0 for p in cache.glob(f"{PARTIAL_MARK}*/*")):
            assert time.monotonic() < deadline, "the child wrote no partial bytes"
            assert child.is_alive(), "the child ended before the kill"
            time.sleep(0.02)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join(5)
    assert child.exitcode == -signal.SIGKILL
    assert not (cache / NAME).exists()
    assert len(_leftovers(cache)) == 1  # the killed run's partial folder, not the final name
    assert fetch(f"{server.url}/{NAME}", NAME, sha256=SHA).read_bytes() == PAYLOAD
    assert _leftovers(cache) == []  # the dead run's partial folder was cleaned


# ---------------------------------------------------------------------------
# Hugging Face Hub

REPO = "timm/resnet18.a1_in1k"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def dns_off(monkeypatch):
    """Name look-ups of any host but this machine fail, and are recorded."""
    attempts = []
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost", b"127.0.0.1", b"localhost"):
            attempts.append(host)
            raise socket.gaierror(socket.EAI_NONAME, "no internet in tests")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return attempts


@pytest.fixture
def no_internet(dns_off):
    """As `dns_off`, and the test asserts there were no look-ups."""
    yield dns_off
    assert dns_off == [], f"network look-ups despite HF_HUB_OFFLINE or an unreachable Hub: {dns_off}"


@pytest.fixture
def hf_offline(tmp_path, monkeypatch, cache, no_internet):
    hub = tmp_path / "hf-hub"
    hub.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub


def _populate_hf_cache(hub: Path, repo_id: str, filename: str, payload: bytes) -> Path:
    """The Hub cache layout hf_hub_download writes: blobs/<sha256>, refs/main, snapshots/<commit>/<file> -> blob."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    blob = repo / "blobs" / hashlib.sha256(payload).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(payload)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT / filename
    snapshot.parent.mkdir(parents=True)
    try:
        snapshot.symlink_to(os.path.relpath(blob, snapshot.parent))
    except OSError:  # no symlinks (Windows without developer mode): huggingface_hub copies too
        snapshot.write_bytes(payload)
    return snapshot


@needs_hf
def test_fetch_hf_from_an_offline_cache(hf_offline):
    snapshot = _populate_hf_cache(hf_offline, REPO, "model.safetensors", PAYLOAD)
    path = fetch_hf(REPO, "model.safetensors", sha256=SHA)
    assert Path(path) == snapshot
    assert Path(path).read_bytes() == PAYLOAD
    assert hf_cached_file(REPO, "model.safetensors") == snapshot
    assert hf_cached_file("timm/resnet50.a1_in1k", "model.safetensors") is None


@needs_hf
def test_fetch_hf_sha256_mismatch(hf_offline):
    _populate_hf_cache(hf_offline, REPO, "model.safetensors", PAYLOAD)
    with pytest.raises(WeightsDownloadError) as error:
        fetch_hf(REPO, "model.safetensors", sha256="f" * 64)
    text = _one_line(error)
    assert "sha256 mismatch" in text and "f" * 64 in text and SHA in text


@needs_hf
def test_fetch_hf_offline_and_not_cached_is_one_line(hf_offline):
    with pytest.raises(WeightsDownloadError) as error:
        fetch_hf("timm/resnet50.a1_in1k", "model.safetensors")
    text = _one_line(error)
    assert "https://huggingface.co/timm/resnet50.a1_in1k/resolve/main/model.safetensors" in text
    assert str(hf_offline / "models--timm--resnet50.a1_in1k") in text
    assert MIRROR_VARIABLE in text and "timm__resnet50.a1_in1k/model.safetensors" in text
    assert "HF_HUB_OFFLINE" in text


@needs_hf
def test_fetch_hf_mirror_folder_first(hf_offline, cache, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    (mirror / "timm__resnet18.a1_in1k").mkdir(parents=True)
    (mirror / "timm__resnet18.a1_in1k" / "model.safetensors").write_bytes(PAYLOAD)
    monkeypatch.setenv(MIRROR_VARIABLE, str(mirror))
    path = fetch_hf(REPO, "model.safetensors", sha256=SHA)  # the Hugging Face cache is empty
    assert path == cache / "timm__resnet18.a1_in1k" / "model.safetensors"
    assert path.read_bytes() == PAYLOAD
    (mirror / "timm__resnet18.a1_in1k" / "model.safetensors").unlink()
    monkeypatch.delenv(MIRROR_VARIABLE)
    assert fetch_hf(REPO, "model.safetensors") == path  # kept, used with the mirror gone
    assert hf_cached_file(REPO, "model.safetensors") == path


@needs_hf
def test_fetch_hf_mirror_url(hf_offline, cache, server, monkeypatch):
    (server.root / "timm__resnet18.a1_in1k").mkdir()
    (server.root / "timm__resnet18.a1_in1k" / "model.safetensors").write_bytes(PAYLOAD)
    monkeypatch.setenv(MIRROR_VARIABLE, server.url)
    assert fetch_hf(REPO, "model.safetensors", sha256=SHA, progress=False).read_bytes() == PAYLOAD
    assert server.requests == ["/timm__resnet18.a1_in1k/model.safetensors"]


@pytest.fixture
def hf_online(tmp_path, monkeypatch, cache):
    """The Hub not switched off (HF_HUB_OFFLINE unset, also in huggingface_hub's constants), an empty Hugging Face
    cache; the test points HF_ENDPOINT where it wants."""
    hub = tmp_path / "hf-hub"
    hub.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return hub


def _noise(caplog, capsys) -> list:
    """What was logged at WARNING or above, and what was printed: a failure must be the exception alone."""
    printed = capsys.readouterr()
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] + [
        line for line in (printed.out + printed.err).splitlines() if line.strip()]


@needs_hf
def test_fetch_hf_without_network_is_quick_quiet_and_one_line(hf_online, cache, no_internet, monkeypatch, caplog,
                                                              capsys):
    # huggingface_hub retried a dead connection 5 times (about 23 s) with a warning per try; nothing may be asked
    # of the network beyond the one refused connection (no_internet: not even a name look-up).
    endpoint = _closed_port_url("").rstrip("/")
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    start = time.monotonic()
    with pytest.raises(WeightsDownloadError) as error:
        fetch_hf("timm/resnet50.a1_in1k", "model.safetensors")
    assert time.monotonic() - start < 5
    text = _one_line(error)
    assert text.startswith(f"could not download model.safetensors from {endpoint}/timm/resnet50.a1_in1k/resolve/"
                           f"main/model.safetensors (")
    assert "refused" in text.lower()
    assert str(cache / "timm__resnet50.a1_in1k" / "model.safetensors") in text  # a copy put there is used
    assert str(hf_online / "models--timm--resnet50.a1_in1k") in text
    assert f"set {MIRROR_VARIABLE} to a folder or URL that has timm__resnet50.a1_in1k/model.safetensors" in text
    assert _noise(caplog, capsys) == []


@needs_hf
def test_fetch_hf_from_a_reachable_hub(hf_online, cache, server, dns_off, monkeypatch):
    # The quick check for a network must not stand in the way of a real download (HF_ENDPOINT: a local "Hub").
    served = server.root / "timm" / "resnet18.a1_in1k" / "resolve" / "main" / "model.safetensors"
    served.parent.mkdir(parents=True)
    served.write_bytes(PAYLOAD)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    path = fetch_hf(REPO, "model.safetensors", sha256=SHA, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert hf_online in path.parents
    assert "/timm/resnet18.a1_in1k/resolve/main/model.safetensors" in server.requests


@needs_hf
def test_fetch_hf_names_the_mirror_path_it_looked_in(hf_offline, cache, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    monkeypatch.setenv(MIRROR_VARIABLE, str(mirror))
    with pytest.raises(WeightsDownloadError) as error:
        fetch_hf("timm/resnet50.a1_in1k", "model.safetensors")
    text = _one_line(error)
    wanted = mirror / "timm__resnet50.a1_in1k" / "model.safetensors"
    assert f"not found in the mirror {MIRROR_VARIABLE}={mirror}: {wanted}" in text
    assert f"set {MIRROR_VARIABLE}" not in text  # it is set already
    assert "https://huggingface.co/timm/resnet50.a1_in1k/resolve/main/model.safetensors" in text


def test_fetch_names_the_mirror_path_it_looked_in(cache, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    monkeypatch.setenv(MIRROR_VARIABLE, str(mirror))
    url = _closed_port_url()
    with pytest.raises(WeightsDownloadError) as error:
        fetch(url, NAME, sha256=SHA)
    text = _one_line(error)
    assert text.startswith(f"could not download {NAME} from {mirror / NAME} (no such file), {url} (")
    assert f"put the file at {cache / NAME} by hand" in text
    assert text.endswith(f"not found in the mirror {MIRROR_VARIABLE}={mirror}: {mirror / NAME}")
