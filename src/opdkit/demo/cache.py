"""The demo's model cache: one directory per settings, built atomically, verified on every load.

Cache: ``<cache_dir>/demo-<key>`` where ``cache_dir`` defaults to ``$XDG_CACHE_HOME/opdkit`` (or
``~/.cache/opdkit``) and ``key`` hashes the settings, the seed and :data:`CACHE_FORMAT`, so changed settings
build a new entry. A build (:func:`opdkit.demo.build.build_entry`) writes into a temporary directory next
to it, which is renamed into place only when complete, with ``manifest.json`` (sha256 and size of every
file, and what the build measured) written last. A load re-hashes every file; a missing manifest, a
missing, extra, truncated or altered file, or a pickle file makes the entry invalid, and it is removed and
rebuilt (never used). Weights are safetensors only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from opdkit.demo.build import build_entry
from opdkit.demo.settings import DemoSettings

__all__ = [
    "CACHE_FORMAT",
    "DemoModels",
    "prepare_demo_models",
    "prepare_entry",
    "default_cache_dir",
    "cache_key",
    "verify_cache_entry",
]

# Bump when the build code changes what a given DemoSettings produces.
# 2: the accuracy checks and evaluations sample with the library's HFSampler (per-row seeds), which moves
#    the student's early stop and the measured accuracies.
# 3: accuracies measured by opdkit.eval's evaluator (issue 10); 4: the sampler's fused draw (issue 11);
# 5: built with fixed numerics (opdkit.demo.build.BUILD_THREADS threads, deterministic algorithms; issue 14)
CACHE_FORMAT = 5
MANIFEST = "manifest.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@dataclass(frozen=True)
class DemoModels:
    """A verified cache entry: where the models are and how good they are.

    Attributes:
        root: the cache entry directory.
        teacher_dir, student_dir: Hugging Face model directories (safetensors weights and the tokenizer).
        tokenizer_dir: the tokenizer alone (the same one is saved in both model directories).
        teacher_accuracy, student_accuracy: eval accuracies measured at build time (sampled, top-p).
        teacher_seconds, student_seconds: wall-clock seconds of each fine-tuning at build time.
        build_seconds: wall-clock seconds of the whole build (tokenizer, both SFTs, evaluations).
        built: True if this call built the entry, False if it was loaded from the cache.
        info: everything else measured at build time (param counts, vocabulary size, response lengths ...).
        settings: the settings the entry was built with.
        seed: the seed it was built with.
    """

    root: Path
    teacher_dir: Path
    student_dir: Path
    tokenizer_dir: Path
    teacher_accuracy: float
    student_accuracy: float
    teacher_seconds: float
    student_seconds: float
    build_seconds: float
    built: bool
    info: dict = field(default_factory=dict)
    settings: DemoSettings = DemoSettings()
    seed: int = 0


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/opdkit`` if set, else ``~/.cache/opdkit``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "opdkit"


def _settings_dict(settings: DemoSettings, seed: int) -> dict:
    return {"format": CACHE_FORMAT, "seed": seed, "settings": dataclasses.asdict(settings)}


def cache_key(settings: DemoSettings, seed: int = 0) -> str:
    """A short hash of the settings, the seed and the cache format."""
    blob = json.dumps(_settings_dict(settings, seed), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


_REQUIRED = tuple(
    f"{d}/{f}" for d in ("teacher", "student") for f in ("config.json", "model.safetensors", "tokenizer.json")
) + ("tokenizer/tokenizer.json",)


def verify_cache_entry(root: str | Path, key: str | None = None) -> dict | None:
    """The manifest of a complete, intact entry at ``root`` (matching ``key`` if given), else None.

    Checks: the manifest parses; its key matches; the required files are listed; every file on disk
    is listed and every listed file exists with the recorded size and sha256; no pickle files.
    """
    root = Path(root)
    try:
        manifest = json.loads((root / MANIFEST).read_text())
        files: dict = manifest["files"]
        if key is not None and manifest.get("key") != key:
            return None
        if any(r not in files for r in _REQUIRED) or sorted(files) != _files(root):
            return None
        for rel, meta in files.items():
            path = root / rel
            if path.suffix in _PICKLE_SUFFIXES:
                return None
            if path.stat().st_size != meta["size"] or _sha256(path) != meta["sha256"]:
                return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_manifest(root: Path, key: str, settings: DemoSettings, seed: int, info: dict) -> dict:
    files = {rel: {"size": (root / rel).stat().st_size, "sha256": _sha256(root / rel)} for rel in _files(root)}
    manifest = {"key": key, **_settings_dict(settings, seed), "info": info, "files": files}
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    tmp.replace(root / MANIFEST)
    return manifest


def _discard(path: Path) -> None:
    """Move ``path`` out of the way (atomically), then delete it."""
    if not path.exists():
        return
    trash = path.with_name(f".{path.name}.stale-{os.getpid()}-{time.monotonic_ns()}")
    with contextlib.suppress(OSError):
        path.rename(trash)
        path = trash
    shutil.rmtree(path, ignore_errors=True)


def _to_models(root: Path, manifest: dict, settings: DemoSettings, seed: int, built: bool) -> DemoModels:
    info = manifest["info"]
    return DemoModels(
        root=root,
        teacher_dir=root / "teacher",
        student_dir=root / "student",
        tokenizer_dir=root / "tokenizer",
        teacher_accuracy=info["teacher_accuracy"],
        student_accuracy=info["student_accuracy"],
        teacher_seconds=info["teacher_seconds"],
        student_seconds=info["student_seconds"],
        build_seconds=info["build_seconds"],
        built=built,
        info=info,
        settings=settings,
        seed=seed,
    )


def prepare_demo_models(
    cache_dir: str | Path | None = None,
    *,
    seed: int = 0,
    force: bool = False,
    log: Callable[[str], None] | None = print,
    settings: DemoSettings | None = None,
) -> DemoModels:
    """The demo's tokenizer, teacher and student, from the cache if intact, else built (minutes on a CPU).

    Args:
        cache_dir: where cache entries live (default :func:`default_cache_dir`).
        seed: seeds the tokenizer corpus, the problems, the initialisations and the data order.
        force: rebuild even if an intact entry exists.
        log: progress messages (None: silent).
        settings: the demo's numbers (default ``DemoSettings()``).
    """
    settings = settings if settings is not None else DemoSettings()
    root, manifest, built = prepare_entry("demo", settings, seed, build_entry, cache_dir=cache_dir, force=force,
                                          log=log)
    return _to_models(root, manifest, settings, seed, built=built)


def prepare_entry(prefix: str, settings, seed: int, build, *, cache_dir=None, force: bool = False,
                  log: Callable[[str], None] | None = print) -> tuple[Path, dict, bool]:
    """The cache entry ``<cache_dir>/<prefix>-<key>`` of ``settings`` (any dataclass) and ``seed``: verified and
    used if intact, else built by ``build(tmp_dir, settings, seed, say) -> info`` into a temporary directory and
    renamed into place. Returns ``(root, manifest, built)``."""
    say = log or (lambda _msg: None)
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = cache_key(settings, seed)
    root = base / f"{prefix}-{key}"
    if not force:
        manifest = verify_cache_entry(root, key)
        if manifest is not None:
            say(f"{prefix}: using cached models in {root}")
            return root, manifest, False
        if root.exists():
            say(f"{prefix}: cache entry {root} is incomplete or corrupt; rebuilding it")
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{prefix}-{key}.tmp-", dir=base))
    try:
        info = build(tmp, settings, seed, say)
        manifest = _write_manifest(tmp, key, settings, seed, info)
        _discard(root)
        try:
            tmp.rename(root)
        except OSError:  # another process put an entry there meanwhile: keep it if it is intact
            other = verify_cache_entry(root, key)
            if other is None:
                _discard(root)
                tmp.rename(root)
            else:
                manifest = other
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    say(f"{prefix}: models ready in {root}")
    return root, manifest, True
