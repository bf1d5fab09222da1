"""Checkpoint directories written as one unit and checked as one when read.

    write_checkpoint(path, tensors={"model.safetensors": {...}, ...}, meta)
        .<name>.new-XXXX/ beside path <- every tensor file (fsynced), then trainer.json holding
            meta + "files": {file: {"bytes", "sha256"}}; trainer.json is written last, so a
            directory that has one is complete
        path -> .<name>.old-XXXX, then .<name>.new-XXXX -> path (two renames), .old removed
    read_meta(path) -> trainer.json (None: no checkpoint); when a kill fell between the two renames
        (path missing, a complete .new or .old beside it) that directory is renamed into place first
    read_tensors(path, file, meta) -> the safetensors dict, after its size and sha256 match meta

    replacing(file): one file written beside its place, then renamed over it

A kill at any moment leaves path holding the old complete checkpoint or the new complete one, and
a reader never takes one directory's weights with another's trainer state: each directory is
self-contained, and the hashes catch a swap between reading trainer.json and the weights, or a
file damaged afterwards. Failures are CheckpointError, whose message names the file; the caller
adds the fix that fits its command line.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import secrets
import shutil
import tempfile
from typing import Dict, Iterable, Iterator, Optional, Tuple

from .errors import CheckpointError

META = "trainer.json"


def _fsync(path: str) -> None:
    # Directories too: a rename is durable only once its directory entry is.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename itself is still atomic
    finally:
        os.close(fd)


def sha256_of(path: str) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _siblings(path: str, kind: str) -> list:
    parent, name = os.path.split(os.path.normpath(path))
    return glob.glob(os.path.join(parent or ".", f".{name}.{kind}-*"))


def _complete(d: str) -> bool:
    return os.path.isfile(os.path.join(d, META))


def _recover(path: str) -> None:
    """Finish a swap a kill interrupted: path missing, a complete directory beside it goes into place.

    The new one wins over the old one: it was complete before the first rename began."""
    if os.path.exists(path):
        return
    for kind in ("new", "old"):
        for d in sorted(_siblings(path, kind), key=os.path.getmtime, reverse=True):
            if _complete(d):
                try:
                    os.rename(d, path)
                except OSError as e:
                    if not os.path.exists(path):  # not another reader's recovery: a real failure
                        raise CheckpointError(
                            f"{path} is missing and the complete checkpoint an interrupted save left in {d} "
                            f"cannot be moved there ({e.strerror}): rename {d} to {path}") from None
                return


def remove_leftovers(path: str) -> None:
    """Remove what interrupted writes left beside path (incomplete .new, replaced .old directories)."""
    _recover(path)
    for d in _siblings(path, "new") + _siblings(path, "old"):
        shutil.rmtree(d, ignore_errors=True)


def write_checkpoint(path: str, tensors: Dict[str, dict], meta: dict) -> None:
    """Replace checkpoint directory `path` by one holding `tensors` ({file name: {key: tensor}},
    saved as safetensors) and trainer.json (meta plus the files' sizes and sha256), as one unit.

    An OSError (a full disk, a directory turned read-only) leaves path as it was and is raised as a
    CheckpointError naming the directory."""
    from safetensors.torch import save_file

    path = os.path.normpath(path)
    parent, name = os.path.split(path)
    parent = parent or "."
    tmp = None
    try:
        os.makedirs(parent, exist_ok=True)
        remove_leftovers(path)
        tmp = tempfile.mkdtemp(prefix=f".{name}.new-", dir=parent)
        files = {}
        for fname, tdict in tensors.items():
            f = os.path.join(tmp, fname)
            save_file({k: v.detach().contiguous().cpu() for k, v in tdict.items()}, f)
            _fsync(f)
            files[fname] = {"bytes": os.path.getsize(f), "sha256": sha256_of(f)}
        with open(os.path.join(tmp, META), "w") as fh:
            json.dump({**meta, "files": files}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync(tmp)
        old = None
        if os.path.exists(path):
            old = os.path.join(parent, f".{name}.old-{secrets.token_hex(4)}")
            os.rename(path, old)
        try:
            os.rename(tmp, path)
        except OSError:
            if os.path.exists(tmp):
                raise
            # A reader found path missing between the two renames and moved tmp into place itself.
        tmp = None
        _fsync(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write the checkpoint {path} ({e.strerror or e}); "
                              "the checkpoint there before is kept") from e


@contextlib.contextmanager
def replacing(path) -> Iterator[str]:
    """Yield a temporary name beside `path` (same suffix, for writers that pick a format by it); once
    the block has written it, it replaces `path` in one rename, so a kill never leaves half a file."""
    d, name = os.path.split(os.fspath(path))
    stem, suffix = os.path.splitext(name)
    tmp = os.path.join(d or ".", f".{stem}.partial-{secrets.token_hex(4)}{suffix}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_meta(path: str) -> Optional[dict]:
    """trainer.json of checkpoint directory `path`; None when path holds no checkpoint."""
    _recover(path)
    f = os.path.join(path, META)
    if not os.path.isfile(f):
        return None
    try:
        with open(f) as fh:
            meta = json.load(fh)
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{f} is damaged (not complete JSON)") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {f} ({e.strerror})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{f} is damaged (not a JSON object)")
    return meta


def _checked(path: str, fname: str, meta: dict) -> str:
    f = os.path.join(path, fname)
    if not os.path.isfile(f):
        raise CheckpointError(f"{f} is missing")
    want = (meta.get("files") or {}).get(fname)
    if want is not None:
        size = os.path.getsize(f)
        if size != want.get("bytes"):
            raise CheckpointError(f"{f} is damaged ({size} bytes, {want.get('bytes')} written)")
        if sha256_of(f) != want.get("sha256"):
            raise CheckpointError(f"{f} is damaged (its sha256 differs from the one written)")
    return f


def verify(path: str, meta: dict, optional: Iterable[str] = ()) -> None:
    """Check every file trainer.json records against its size and sha256 without loading it; a
    file named in `optional` may be missing (deleted on purpose), not damaged."""
    for fname in meta.get("files") or {}:
        if fname in optional and not os.path.isfile(os.path.join(path, fname)):
            continue
        _checked(path, fname, meta)


def read_tensors(path: str, fname: str, meta: dict) -> dict:
    """The tensors of `fname` in checkpoint `path`, checked against the size and sha256 that meta
    (its trainer.json) records; meta without records (an older checkpoint) is read unchecked."""
    from safetensors.torch import load_file

    f = _checked(path, fname, meta)
    try:
        return load_file(f)
    except Exception as e:  # safetensors raises its own error types for a bad header or length
        raise CheckpointError(f"{f} is damaged ({' '.join(str(e).split())})") from None


def read_checkpoint(path: str, files: Iterable[str], optional: Iterable[str] = ()) -> Tuple[Optional[dict], dict]:
    """(trainer.json, {file: tensors}) of one checkpoint: `files` must be there, `optional` ones are
    read when present. (None, {}) when path holds no checkpoint. A file that fails its check while
    trainer.json changed under the reader (another process saved meanwhile) is read again."""
    for attempt in range(3):
        meta = read_meta(path)
        if meta is None:
            return None, {}
        try:
            out = {f: read_tensors(path, f, meta) for f in files}
            out.update({f: read_tensors(path, f, meta) for f in optional if os.path.isfile(os.path.join(path, f))})
            return meta, out
        except CheckpointError:
            if attempt == 2 or read_meta(path) == meta:
                raise
    raise AssertionError("unreachable")


__all__ = ["CheckpointError", "replacing", "write_checkpoint", "read_meta", "read_tensors", "read_checkpoint", "verify",
           "remove_leftovers", "sha256_of", "META"]
