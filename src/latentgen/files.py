"""Writing files so that no reader ever sees half of one, and no existing file is lost by accident.

Every file latentgen writes (images, manifests, JSON summaries, checkpoints, the hash cache) goes
through `atomic_write`: a temporary file in the target's folder, fsync, rename, then a sync of the
folder so that the rename itself survives a crash. `reserve` picks the numbered name used when a
file must not be overwritten.
"""

import errno
import os
import tempfile
from pathlib import Path
from typing import Callable, Union

from .errors import LatentgenError

Writer = Callable[[Path], None]
"""writer(temporary_path): fills the temporary file itself (torch.save, PIL, safetensors ...)."""


def require_file(path: Path, what: str) -> None:
    """A one-line error unless `path` is a non-empty file; `what` names it ("image", "checkpoint")."""
    if not path.exists():
        raise LatentgenError(f"{what} {path} does not exist")
    if path.is_dir():
        raise LatentgenError(f"{what} {path} is a folder: pass the {what} file itself")
    if path.stat().st_size == 0:
        raise LatentgenError(f"{what} {path} is empty (0 bytes)")


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _sync_folder(folder: Path) -> None:
    """Make a rename durable (POSIX); filesystems that cannot sync a folder are left as they are."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def atomic_write(path: Union[str, Path], content: Union[bytes, str, Writer]) -> Path:
    """Replace `path` with `content` (bytes, text, or a writer of a temporary file) in one rename.

    The temporary file is hidden (`.NAME.*.tmp`) in the same folder, so a killed run leaves at most
    such a file behind; the result gets the mode a plain `open()` gives (0666 less the umask), not
    mkstemp's private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    temporary = Path(name)
    try:
        if callable(content):
            os.close(fd)
            content(temporary)
        else:
            with os.fdopen(fd, "wb") as file:
                file.write(content.encode() if isinstance(content, str) else content)
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)
    return path


def numbered(path: Path, n: int) -> Path:
    """The n-th alternative name of `path` when it exists: out.png -> out-1.png, out-2.png ..."""
    return path if n == 0 else path.with_name(f"{path.stem}-{n}{path.suffix}")


def reserve(path: Union[str, Path]) -> Path:
    """Claim `path`, or the first free numbered name, with O_EXCL so concurrent writers never collide.

    The claimed name holds an empty placeholder until `atomic_write` replaces it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for n in range(100000):
        candidate = numbered(path, n)
        try:
            os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return candidate
        except FileExistsError:
            continue
    raise LatentgenError(f"no free file name left for {path}")


def write_new(path: Union[str, Path], content: Union[bytes, str, Writer], overwrite: bool = False) -> Path:
    """Write `content` to `path`, or, unless `overwrite`, to the first free numbered name; the path written."""
    target = Path(path) if overwrite else reserve(path)
    try:
        return atomic_write(target, content)
    except BaseException:
        if not overwrite:
            target.unlink(missing_ok=True)
        raise
