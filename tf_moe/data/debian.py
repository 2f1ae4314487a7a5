"""Fetching and unpacking Debian packages into a cache folder.

Owns: `apt-get download NAME` and `dpkg-deb -x` (packages are unpacked, never
installed: installing them would pull in servers and heavy dependencies), and
the cache layout `<cache_dir>/<name>_<version>_<arch>.deb` plus
`<cache_dir>/unpacked/<name>/`. A folder of already unpacked packages
(`source_root/<name>/...`) can stand in for the cache, which is how tests run
without the network.
"""

import pathlib
import shutil
import subprocess
import tempfile

from absl import logging

_DONE_MARKER = ".unpacked"


class PackageError(RuntimeError):
    """A package could not be fetched or unpacked."""


def _run(command, cwd):
    try:
        return subprocess.run(
            command, cwd=cwd, check=True, capture_output=True, text=True
        )
    except FileNotFoundError as error:
        raise PackageError(
            f"`{command[0]}` is not installed: fetching Debian packages needs "
            "apt-get and dpkg-deb (a Debian or Ubuntu machine). Alternatively "
            "pass source_root= with already unpacked packages."
        ) from error


class PackageRoots:
    """Unpacked Debian packages, fetched on demand.

    Args:
        cache_dir: folder for downloaded .deb files and unpacked trees.
        source_root: optional folder already holding `<name>/` unpacked trees;
            when given, nothing is downloaded.
        update_lists: whether to run `apt-get update` once when
            `apt-get download` fails (package lists missing or stale).
    """

    def __init__(self, cache_dir, source_root=None, update_lists=True):
        self.cache_dir = pathlib.Path(cache_dir)
        self.source_root = pathlib.Path(source_root) if source_root else None
        self.update_lists = update_lists
        self._updated = False

    def roots(self, packages):
        """{name: unpacked folder} for each package name, fetching as needed.

        Raises:
            FileNotFoundError: a package is missing from `source_root`.
            PackageError: apt-get or dpkg-deb failed.
        """
        return {name: self.root(name) for name in packages}

    def root(self, name):
        """The unpacked folder of package `name`."""
        if self.source_root is not None:
            root = self.source_root / name
            if not root.is_dir():
                raise FileNotFoundError(
                    f"Package {name!r} is not unpacked under source_root: "
                    f"missing folder {root}."
                )
            return root
        root = self.cache_dir / "unpacked" / name
        if not (root / _DONE_MARKER).is_file():
            self._unpack(name, self._download(name), root)
        return root

    def deb_file(self, name):
        """Name of the .deb that package `name` was unpacked from (its version).

        None for packages taken from `source_root`.
        """
        if self.source_root is not None:
            return None
        marker = self.cache_dir / "unpacked" / name / _DONE_MARKER
        return marker.read_text().strip() if marker.is_file() else None

    def _download(self, name):
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        cached = sorted(self.cache_dir.glob(f"{name}_*.deb"))
        if cached:
            return cached[-1]
        logging.info("apt-get download %s into %s", name, self.cache_dir)
        try:
            _run(["apt-get", "download", name], self.cache_dir)
        except subprocess.CalledProcessError as error:
            if not self.update_lists or self._updated:
                raise PackageError(
                    f"`apt-get download {name}` failed: {error.stderr.strip()}\n"
                    "Run `apt-get update` (as root) and try again."
                ) from error
            logging.info("apt-get download failed; running apt-get update once")
            self._updated = True
            try:
                _run(["apt-get", "update"], self.cache_dir)
            except subprocess.CalledProcessError as update_error:
                raise PackageError(
                    f"`apt-get update` failed: {update_error.stderr.strip()}"
                ) from update_error
            return self._download(name)
        cached = sorted(self.cache_dir.glob(f"{name}_*.deb"))
        if not cached:
            raise PackageError(f"`apt-get download {name}` wrote no {name}_*.deb.")
        return cached[-1]

    def _unpack(self, name, deb, root):
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root.parent))
        try:
            _run(["dpkg-deb", "-x", str(deb), str(staging)], root.parent)
        except subprocess.CalledProcessError as error:
            shutil.rmtree(staging, ignore_errors=True)
            raise PackageError(
                f"`dpkg-deb -x {deb}` failed: {error.stderr.strip()}"
            ) from error
        (staging / _DONE_MARKER).write_text(deb.name + "\n")
        if root.exists():
            shutil.rmtree(root)
        staging.rename(root)
