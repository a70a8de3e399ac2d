"""Adapter folders on disk, all-or-nothing: the two file names, the atomic folder write (a hidden
sibling renamed into place under a lock, fsynced), and checked reading of JSON and safetensors files."""

import contextlib
import json
import os
import shutil
import uuid

import torch

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None


CONFIG_NAME = "adapter_config.json"


WEIGHTS_NAME = "adapter_model.safetensors"


def write_folder(path, tensors, config):
    """Write an adapter folder, all or nothing: the tensors and the JSON config.

    The config is encoded and the path checked before anything is written (a
    setting JSON cannot hold, or a path that is a file or a dangling link, is
    refused with nothing on disk). Both files are written under temporary
    names, flushed to disk, then renamed into place: a new folder is written
    whole under a temporary name and renamed, so it appears complete or not
    at all; in an existing folder the previous adapter stays whole until both
    new files are complete, and only a crash between the two renames could
    pair the new tensors with the old config. Saves to one folder from several
    processes or threads take turns (``_folder_lock``): the folder ends with
    the last writer's complete adapter.
    """
    from safetensors.torch import save_file

    try:
        text = json.dumps(config, indent=1, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the adapter settings cannot be written as JSON ({exc}); nothing was written") from exc
    path = os.path.abspath(os.fspath(path))
    _check_target(path)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    with _folder_lock(parent, name):
        _check_target(path)  # again: another process may have changed it while this one waited
        new_folder = not os.path.exists(path)
        work = os.path.join(parent if new_folder else path, _hidden_name(name, f".tmp-{uuid.uuid4().hex}"))
        os.mkdir(work)
        try:
            save_file(unshared(tensors), os.path.join(work, WEIGHTS_NAME))
            with open(os.path.join(work, CONFIG_NAME), "w") as f:
                f.write(text)
            for file in (WEIGHTS_NAME, CONFIG_NAME):
                fsync(os.path.join(work, file))
            if new_folder:
                os.rename(work, path)
            else:
                for file in (WEIGHTS_NAME, CONFIG_NAME):
                    os.replace(os.path.join(work, file), os.path.join(path, file))
                os.rmdir(work)
            fsync(parent if new_folder else path)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise


def _check_target(path):
    """Refuse, naming ``path``, a save target that is a file or a link to nothing."""
    if os.path.islink(path) and not os.path.exists(path):
        raise FileNotFoundError(f"{path} is a symbolic link to {os.readlink(path)}, which does not exist: create "
                                "that folder, or remove the link; nothing was written")
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{path} exists and is not a folder; nothing was written")


def _hidden_name(name, suffix):
    """A hidden file name beside or inside the folder ``name``: its first characters, then ``suffix``, so
    that it stays within the 255 characters a file name may have whatever the folder's name."""
    return f".{name[:100]}{suffix}"


@contextlib.contextmanager
def _folder_lock(parent, name):
    """Hold an exclusive lock on saving to the folder ``name`` in ``parent``: a lock file beside it, locked
    with flock (released by the system if the process dies) and removed on release. A writer that waited
    on a lock file removed meanwhile locks the new one instead. (Without fcntl, as on Windows, no lock.)"""
    if fcntl is None:  # pragma: no cover - not POSIX
        yield
        return
    lock = os.path.join(parent, _hidden_name(name, ".lock"))
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        except PermissionError as exc:
            raise PermissionError(f"cannot create the lock file {lock} that saves to {os.path.join(parent, name)} "
                                  f"take turns on ({exc.strerror}): make {parent} writable; nothing was written"
                                  ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                break
        except FileNotFoundError:  # removed by the writer that held it
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        os.unlink(lock)  # before unlocking: a writer that locks it afterwards sees it gone and retries
        os.close(fd)


def fsync(path):
    """Flush a file's or a folder's entries to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unshared(tensors):
    """The tensors, detached and contiguous, each with a storage of its own:
    safetensors refuses tensors that share one (tied embed_tokens and
    lm_head among the modules to save)."""
    storages, out = set(), {}
    for key, t in tensors.items():
        t = t.detach()
        storage = (t.device, t.untyped_storage().data_ptr())
        out[key] = t.clone() if storage in storages else t.contiguous()
        storages.add(storage)
    return out


def check_folder(path):
    """FileNotFoundError/NotADirectoryError, saying so, unless ``path`` is a local folder."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist; moslora_ext reads adapters from local folders and does not "
                                "fetch Hugging Face Hub ids (download one first, e.g. with "
                                "huggingface_hub.snapshot_download)")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{path} is a file; pass the adapter's folder")


def read_json(file):
    """The JSON object in ``file``; ValueError naming the file if it is not one."""
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file} does not exist")
    try:
        with open(file) as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file} is not valid JSON ({exc}); the file is damaged: save it again") from None
    if not isinstance(value, dict):
        raise ValueError(f"{file} must hold a JSON object, got a {type(value).__name__}")
    return value


def read_tensors(file):
    """The tensors in a safetensors (or torch) ``file``, read onto the CPU."""
    with reading(file):
        if file.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(file)
        return torch.load(file, map_location="cpu", weights_only=True)


@contextlib.contextmanager
def reading(file):
    """Turn a failure to read ``file`` (truncated, empty, not in its format) into a ValueError naming it."""
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file} does not exist")
    try:
        yield
    except Exception as exc:
        raise ValueError(f"{file} cannot be read ({type(exc).__name__}: {exc}); it is truncated, empty or not a "
                         "tensor file: save it again") from exc
