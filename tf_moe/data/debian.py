"""Fetching, checking and unpacking Debian packages; reading unpacked trees.

Owns: `apt-cache show NAME` (the archive's SHA-256 of the version it offers),
`apt-get download NAME` and `dpkg-deb -x` (packages are unpacked, never
installed: installing them would pull in servers and heavy dependencies), and
the cache layout `<cache_dir>/<name>_<version>_<arch>.deb` plus
`<cache_dir>/unpacked/<name>/`. A folder of already unpacked packages
(`source_root/<name>/...`) can stand in for the cache, which is how tests run
without the network.

Also owns the one safe way to list and open files of an unpacked tree
(`tree_file`, `tree_path`, `tree_files`): a package is data from outside, so a
symlink in it (`html/leak.html -> /etc/passwd`) is followed only when its
target, fully resolved, is inside the package's own tree; other links are
skipped with a warning, and directory walks never descend through symlinked
directories.
"""

import fnmatch
import hashlib
import os
import pathlib
import posixpath
import re
import shutil
import subprocess
import tempfile
import urllib.parse
from typing import NamedTuple

from absl import logging

_DONE_MARKER = ".unpacked"
_DIGEST_PREFIX = "sha256:"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class PackageError(RuntimeError):
    """A package could not be fetched, checked or unpacked."""


def _run(command, cwd):
    try:
        return subprocess.run(
            command, cwd=cwd, check=True, capture_output=True, text=True
        )
    except FileNotFoundError as error:
        raise PackageError(
            f"`{command[0]}` is not installed: fetching Debian packages needs "
            "apt-cache, apt-get and dpkg-deb (a Debian or Ubuntu machine). "
            "Alternatively pass source_root= with already unpacked packages."
        ) from error


def sha256_of(path):
    """Hex SHA-256 of the file at `path`."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def parse_stanzas(text):
    """The stanzas of `apt-cache show` output, as {field: value} dicts.

    Stanzas are separated by blank lines; continuation lines (a multi-line
    Description) are dropped, only the first line of each field is kept.
    """
    stanzas, current = [], {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                stanzas.append(current)
            current = {}
        elif not line[0].isspace():
            field, separator, value = line.partition(":")
            if separator:
                current[field.strip()] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


class Offer(NamedTuple):
    """The version of a package the archive offers, from `apt-cache show`."""

    package: str
    version: str
    architecture: str
    filename: str  # archive path (`pool/...`), may be ""
    sha256: str

    def matches(self, file_name):
        """Whether `file_name` is this version's .deb.

        `apt-get download` names files `<name>_<version>_<arch>.deb` with an
        epoch's ':' written `%3a`; the archive's own `Filename:` has no epoch.
        """
        if self.filename and file_name == posixpath.basename(self.filename):
            return True
        expected = f"{self.package}_{self.version}_{self.architecture}.deb"
        return urllib.parse.unquote(file_name) == expected

    def file_name(self):
        """The name `apt-get download` gives this version's .deb."""
        version = self.version.replace(":", "%3a")
        return f"{self.package}_{version}_{self.architecture}.deb"


def offer_from_stanzas(name, stanzas):
    """The first stanza of package `name` with a SHA256 field, as an `Offer`.

    None when no stanza has one (the package is not in the package lists, or
    only its installed version is known).
    """
    for stanza in stanzas:
        sha256 = stanza.get("SHA256", "").lower()
        if stanza.get("Package") == name and _SHA256.match(sha256):
            return Offer(
                package=name,
                version=stanza.get("Version", ""),
                architecture=stanza.get("Architecture", ""),
                filename=stanza.get("Filename", ""),
                sha256=sha256,
            )
    return None


# ------------------------------------------------------- unpacked trees


def _inside(root_real, path):
    """`path` with every symlink resolved, or None if that leaves `root_real`.

    Logs a warning naming the link and its target when it leaves the tree.
    """
    real = pathlib.Path(os.path.realpath(path))
    if real == root_real or root_real in real.parents:
        return real
    logging.warning(
        "Skipping %s: it links to %s, outside the package tree %s.",
        path, real, root_real,
    )
    return None


def tree_path(package_root, relative):
    """`package_root / relative`, or None if it links out of the package tree.

    The path may not exist (check it as usual); symlinks along it whose
    targets stay inside `package_root` are allowed.
    """
    root_real = pathlib.Path(os.path.realpath(package_root))
    path = pathlib.Path(package_root) / relative
    return path if _inside(root_real, path) is not None else None


def tree_file(package_root, relative):
    """`package_root / relative`, a file a reader needs, checked like `tree_path`.

    Raises:
        FileNotFoundError: the path links out of the package tree (it is
            treated as not part of the package).
    """
    path = tree_path(package_root, relative)
    if path is None:
        full = pathlib.Path(package_root) / relative
        raise FileNotFoundError(
            f"{full} links to {os.path.realpath(full)}, outside the package "
            f"tree {package_root}: it is not read."
        )
    return path


def tree_files(package_root, folder, pattern="*", recursive=True):
    """Files under `package_root / folder` whose names match `pattern`.

    Never leaves the package tree: a symlink whose resolved target is outside
    `package_root` is skipped with a warning. Symlinks to files inside the
    tree are listed; symlinked directories are not descended into (inside
    the tree their files are listed where they really are, as `Path.rglob`
    did; outside it they are skipped with a warning).

    Args:
        package_root: folder a package was unpacked into.
        folder: path inside it to walk ("" for the whole tree); it may itself
            be a symlink inside the tree.
        pattern: `fnmatch` pattern for file names, e.g. "*.html".
        recursive: whether to walk sub-folders.

    Returns:
        list of paths `package_root / folder / ...`, sorted by their path
        relative to `folder`; [] if the folder is missing or links out of the
        tree.
    """
    root_real = pathlib.Path(os.path.realpath(package_root))
    start = pathlib.Path(package_root) / folder
    start_real = _inside(root_real, start)
    if start_real is None or not start_real.is_dir():
        return []
    found = []
    pending = [pathlib.PurePosixPath()]
    while pending:
        relative = pending.pop()
        with os.scandir(start_real / relative) as entries:
            entries = list(entries)
        for entry in entries:
            if entry.is_symlink():
                real = _inside(root_real, start / relative / entry.name)
                if real is None or not real.is_file():
                    continue  # out of the tree, dangling, or a directory
            elif entry.is_dir(follow_symlinks=False):
                if recursive:
                    pending.append(relative / entry.name)
                continue
            elif not entry.is_file(follow_symlinks=False):
                continue
            if fnmatch.fnmatchcase(entry.name, pattern):
                found.append(relative / entry.name)
    return [start / relative for relative in sorted(found, key=str)]


# ------------------------------------------------------------ the cache


def _read_marker(root):
    """(deb file name, verified SHA-256 or None) of an unpacked tree, or None."""
    marker = root / _DONE_MARKER
    if not marker.is_file():
        return None
    fields = marker.read_text().split()
    if not fields:
        return None
    digest = None
    for field in fields[1:]:
        value = field[len(_DIGEST_PREFIX):]
        if field.startswith(_DIGEST_PREFIX) and _SHA256.match(value):
            digest = value
    return fields[0], digest


class PackageRoots:
    """Unpacked Debian packages, fetched and checked on demand.

    Every .deb, cached or freshly downloaded, is checked before it is
    unpacked: its SHA-256 must equal the one `apt-cache show` gives for the
    version the archive offers (the package lists are signed, so this ties
    the file to the archive). A cached file that does not match is deleted
    and downloaded again once; other cached versions are ignored. An unpacked
    tree is reused only if its `.unpacked` marker records the digest of the
    verified .deb it came from; otherwise it is unpacked again.

    `source_root` trees have no .deb, so nothing is checked for them: they
    are trusted as given (tests use them). Reading any tree still goes
    through `tree_files`/`tree_file`, which never follow symlinks out of it.

    Args:
        cache_dir: folder for downloaded .deb files and unpacked trees.
        source_root: optional folder already holding `<name>/` unpacked trees;
            when given, nothing is downloaded or checked.
        update_lists: whether to run `apt-get update` once when
            `apt-get download` fails or `apt-cache show` gives no SHA256
            (package lists missing or stale).
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
            PackageError: apt-cache, apt-get or dpkg-deb failed, or a .deb
                does not match the archive's SHA-256.
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
        marker = _read_marker(root)
        if marker is None or marker[1] is None:
            if marker is not None:
                logging.info(
                    "%s was unpacked from %s without a recorded SHA-256; "
                    "unpacking it again from a checked .deb.", root, marker[0],
                )
            deb, digest = self._verified_deb(name)
            self._unpack(name, deb, digest, root)
        return root

    def deb_file(self, name):
        """Name of the .deb that package `name` was unpacked from (its version).

        None for packages taken from `source_root`.
        """
        if self.source_root is not None:
            return None
        marker = _read_marker(self.cache_dir / "unpacked" / name)
        return marker[0] if marker else None

    def _update(self, reason):
        """Runs `apt-get update` if allowed and not run yet; whether it ran."""
        if not self.update_lists or self._updated:
            return False
        logging.info("%s; running apt-get update once", reason)
        self._updated = True
        try:
            _run(["apt-get", "update"], self.cache_dir)
        except subprocess.CalledProcessError as error:
            raise PackageError(
                f"`apt-get update` failed: {error.stderr.strip()}"
            ) from error
        return True

    def _offer(self, name):
        """The `Offer` (version, SHA-256) of `name` from `apt-cache show`."""
        command = ["apt-cache", "show", "--no-all-versions", name]
        try:
            output, problem = _run(command, self.cache_dir).stdout, ""
        except subprocess.CalledProcessError as error:
            output, problem = "", f": {error.stderr.strip()}"
        offer = offer_from_stanzas(name, parse_stanzas(output))
        if offer is not None:
            return offer
        if self._update(f"`apt-cache show {name}` gives no SHA256"):
            return self._offer(name)
        raise PackageError(
            f"The hash of package {name!r} cannot be checked: "
            f"`apt-cache show {name}` gives no SHA256 for it (it is not in the "
            f"package lists){problem}\nRun `apt-get update` (as root) and try "
            "again, or pass source_root= with already unpacked packages."
        )

    def _cached(self, name, offer):
        """The cached .deb of the offered version, or None; others are ignored."""
        found = None
        for path in sorted(self.cache_dir.glob(f"{name}_*.deb")):
            if found is None and offer.matches(path.name):
                found = path
            elif not offer.matches(path.name):
                logging.info(
                    "Ignoring cached %s: the archive offers %s %s.",
                    path, name, offer.version,
                )
        return found

    def _verified_deb(self, name):
        """(path, SHA-256) of a .deb of `name` matching the archive's SHA-256.

        Uses the cached file of the offered version if it matches; a file
        that does not match is deleted (never used) and downloaded again
        once.

        Raises:
            PackageError: no SHA256 to check against, the download failed, or
                the downloaded file does not match either.
        """
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        offer = self._offer(name)
        deb = self._cached(name, offer)
        mismatches = []
        while len(mismatches) < 2:
            if deb is None:
                deb = self._download(name, offer)
                if deb is None:  # apt-get update ran: the offer may have changed
                    return self._verified_deb(name)
            actual = sha256_of(deb)
            if actual == offer.sha256:
                return deb, actual
            logging.warning(
                "%s does not match the archive's SHA-256 for %s %s (expected "
                "%s, got %s); deleting it.",
                deb, name, offer.version, offer.sha256, actual,
            )
            deb.unlink()
            mismatches.append(f"{deb.name} (SHA-256 {actual})")
            deb = None
        raise PackageError(
            f"Package {name!r}: the .deb does not match the archive's SHA-256 "
            f"of version {offer.version}, even after downloading it again. "
            f"Expected {offer.sha256}; got {' then '.join(mismatches)} in "
            f"{self.cache_dir}. The files were deleted, not used."
        )

    def _download(self, name, offer):
        """`apt-get download name`; the file written, or None after an update."""
        before = set(self.cache_dir.glob(f"{name}_*.deb"))
        logging.info("apt-get download %s into %s", name, self.cache_dir)
        try:
            _run(["apt-get", "download", name], self.cache_dir)
        except subprocess.CalledProcessError as error:
            if self._update(f"`apt-get download {name}` failed"):
                return None
            raise PackageError(
                f"`apt-get download {name}` failed: {error.stderr.strip()}\n"
                "Run `apt-get update` (as root) and try again."
            ) from error
        deb = self._cached(name, offer)
        if deb is not None:
            return deb
        new = sorted(set(self.cache_dir.glob(f"{name}_*.deb")) - before)
        if len(new) == 1:  # named unexpectedly: its hash still decides
            return new[0]
        raise PackageError(
            f"`apt-get download {name}` wrote no {offer.file_name()} in "
            f"{self.cache_dir} (new files: {[p.name for p in new]})."
        )

    def _unpack(self, name, deb, digest, root):
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root.parent))
        try:
            _run(["dpkg-deb", "-x", str(deb), str(staging)], root.parent)
        except subprocess.CalledProcessError as error:
            shutil.rmtree(staging, ignore_errors=True)
            raise PackageError(
                f"`dpkg-deb -x {deb}` failed: {error.stderr.strip()}"
            ) from error
        (staging / _DONE_MARKER).write_text(f"{deb.name}\n{_DIGEST_PREFIX}{digest}\n")
        if root.exists():
            shutil.rmtree(root)
        staging.rename(root)
