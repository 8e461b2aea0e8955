"""Where a store's files are: a local folder, or any filesystem fsspec reaches (``file://``, ``memory://``,
``s3://``, ...) when the store's root is a URL. ``ModuleStore`` names every file by its path relative to
the root (``ann/v18c...-1a2b3c4d/adapter_model.safetensors``) and reads and writes through one of these.

``LocalRoot`` is the code path of a plain folder: a module folder is written in place by
``module_folder.write_module`` (staged, fsynced, renamed) and read in place. Everything it creates is
owner-only (folders 0700, files 0600) whatever the umask: a store holds users' history and modules.
``FsspecRoot`` writes a module folder on local disk first and uploads its files; reads download them
into a temporary folder.
An upload is not atomic on an object store, and need not be: every version goes to a new folder, and the
index row that names it is written after the upload, so no reader ever looks at a folder still being
written (the index is the commit point). A failed upload removes what it wrote; what a killed one leaves
is removed by a later put of that user (``ModuleStore._remove_unrecorded``).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from tailorlm.files import atomic_write_text, make_private, private_folder
from tailorlm.store.index_backends import StoreLocationError


def is_url(root: str | Path) -> bool:
    return isinstance(root, str) and "://" in root


class LocalRoot:
    """A store in a folder of this machine (or a shared filesystem mounted as one)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.location = str(path)

    @property
    def absolute(self) -> str:
        """The root's name independent of the working folder: how an index records which store it is."""
        return str(self.path.resolve())

    def local(self, relative: str) -> Path:
        """The path of ``relative`` on this machine's filesystem."""
        return self.path / relative if relative else self.path

    def describe(self, relative: str) -> str:
        return str(self.local(relative))

    @contextlib.contextmanager
    def new_folder(self, relative: str) -> Iterator[Path]:
        """A local folder to write a new folder's files into, published at ``relative`` when the block
        ends. Here that is the folder itself: its writer stages and renames it."""
        folder = self.local(relative)
        private_folder(folder.parent)
        yield folder
        make_private(folder)

    @contextlib.contextmanager
    def reading(self, relative: str) -> Iterator[Path]:
        """A local folder holding ``relative``'s files (the folder itself here)."""
        yield self.local(relative)

    def is_file(self, relative: str) -> bool:
        return self.local(relative).is_file()

    def exists(self, relative: str) -> bool:
        return self.local(relative).exists()

    def folders(self, relative: str) -> list[str]:
        """Names of the folders in ``relative`` (none when it does not exist)."""
        try:  # the folder may go while it is listed (its user forgotten meanwhile)
            return [child.name for child in self.local(relative).iterdir() if child.is_dir()]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def remove(self, relative: str) -> None:
        shutil.rmtree(self.local(relative), ignore_errors=True)

    def remove_if_empty(self, relative: str) -> None:
        """Remove the folder ``relative`` if nothing is in it (another process may be filling it)."""
        with contextlib.suppress(OSError):
            self.local(relative).rmdir()

    def read_text(self, relative: str) -> str | None:
        path = self.local(relative)
        return path.read_text(encoding="utf-8") if path.is_file() else None

    def write_text(self, relative: str, text: str) -> None:
        atomic_write_text(self.local(relative), text, private=True)


class FsspecRoot:
    """A store under an fsspec URL. Module folders are flat (files only), so copying one is a loop over
    its files."""

    def __init__(self, url: str) -> None:
        self.location = url.rstrip("/")
        try:
            import fsspec
        except ImportError:
            raise StoreLocationError(
                f"a store at {self.location} is reached through fsspec: pip install 'tailorlm[remote]'"
            ) from None
        try:
            self.fs, path = fsspec.core.url_to_fs(self.location)
        except (ValueError, ImportError) as error:  # an unknown protocol, or its package is missing
            raise StoreLocationError(f"cannot open a store at {self.location}: {error}") from None
        self.base = path.rstrip("/")
        self.absolute = self.location

    def _path(self, relative: str) -> str:
        return f"{self.base}/{relative}" if relative else self.base

    def local(self, relative: str) -> Path:
        raise StoreLocationError(
            f"{self.describe(relative)} is not a folder on this machine: the store's files are reached "
            "through fsspec"
        )

    def describe(self, relative: str) -> str:
        return f"{self.location}/{relative}" if relative else self.location

    @contextlib.contextmanager
    def new_folder(self, relative: str) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="tailorlm-put-") as staging:
            folder = Path(staging) / PurePosixPath(relative).name
            yield folder
            target = self._path(relative)
            try:
                self.fs.makedirs(target, exist_ok=True)
                for file in sorted(folder.iterdir()):
                    self.fs.put_file(str(file), f"{target}/{file.name}")
            except BaseException:
                self.remove(relative)
                raise

    @contextlib.contextmanager
    def reading(self, relative: str) -> Iterator[Path]:
        """A temporary local copy of ``relative``'s files (an empty folder when it does not exist)."""
        with tempfile.TemporaryDirectory(prefix="tailorlm-get-") as staging:
            folder = Path(staging) / PurePosixPath(relative).name
            folder.mkdir()
            for name in self._entries(relative, "file"):
                self.fs.get_file(f"{self._path(relative)}/{name}", str(folder / name))
            yield folder

    def _entries(self, relative: str, kind: str) -> list[str]:
        """Names of the files (``kind`` "file") or folders ("directory") in ``relative``."""
        try:
            listed = self.fs.ls(self._path(relative), detail=True)
        except FileNotFoundError:
            return []
        return [PurePosixPath(entry["name"]).name for entry in listed if entry["type"] == kind]

    def is_file(self, relative: str) -> bool:
        return self.fs.isfile(self._path(relative))

    def exists(self, relative: str) -> bool:
        return self.fs.exists(self._path(relative))

    def folders(self, relative: str) -> list[str]:
        return self._entries(relative, "directory")

    def remove(self, relative: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._path(relative), recursive=True)

    def remove_if_empty(self, relative: str) -> None:
        """Remove ``relative`` if it holds nothing (object stores have no empty folders to remove)."""
        with contextlib.suppress(FileNotFoundError, OSError):
            if not self.fs.ls(self._path(relative)):
                self.fs.rmdir(self._path(relative))

    def read_text(self, relative: str) -> str | None:
        try:
            return self.fs.cat_file(self._path(relative)).decode("utf-8")
        except FileNotFoundError:
            return None

    def write_text(self, relative: str, text: str) -> None:
        self.fs.makedirs(self.base, exist_ok=True)
        self.fs.pipe_file(self._path(relative), text.encode("utf-8"))


Root = LocalRoot | FsspecRoot


def open_root(root: str | Path) -> Root:
    """A URL (``scheme://...``) is reached through fsspec; a path stays on the local code path."""
    return FsspecRoot(root) if is_url(root) else LocalRoot(Path(root))
