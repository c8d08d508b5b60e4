# src/defectvad/errors.py
import errno
import os
import sys
from pathlib import Path


class DefectVADError(Exception):
    # a user mistake: the entry point prints the message alone and exits with code 1
    pass


class DatasetError(DefectVADError):
    pass


class BackboneError(DefectVADError):
    pass


class ConfigError(DefectVADError):
    pass


class TrainingError(DefectVADError):
    pass


class ExportError(DefectVADError):
    pass


class RunFolderError(DefectVADError):
    # a run folder in use by another run, or holding an ok run that overwrite=true alone may replace
    pass


class OutputError(DefectVADError):
    # a file or folder that cannot be written: no permission, a read-only or full disk, a file in the way
    pass


OUTPUT_ERRORS = {
    errno.EACCES: "permission denied; choose a folder you may write to",
    errno.EPERM: "permission denied; choose a folder you may write to",
    errno.EROFS: "the file system is read-only; choose a folder on a writable disk",
    errno.ENOSPC: "no space left on the device; free some space or choose a folder on another disk",
    errno.EDQUOT: "the disk quota is used up; free some space or choose a folder on another disk",
}
WHERE = " (paths.output_dir, paths.multirun_dir or hydra.run.dir)"


def describe_output_error(error, path=None):
    # the one-line message for an OSError met while writing outputs, or None when it is not about the disk
    if not isinstance(error, OSError):
        return None
    path = Path(path or error.filename or "?")
    if error.errno in OUTPUT_ERRORS:
        return f"cannot write {path}: {OUTPUT_ERRORS[error.errno]}{WHERE}"
    if error.errno in (errno.ENOTDIR, errno.EEXIST):
        blocking = next((parent for parent in (path, *path.parents) if parent.is_file()), None)
        if blocking is not None:
            return f"cannot write {path}: {blocking} is a file, not a folder; choose another folder{WHERE}"
    return None


def find_user_error(error):
    # hydra.utils.instantiate wraps what a constructor raised; the user's mistake is in the chain
    while error is not None:
        if isinstance(error, DefectVADError):
            return error
        error = error.__cause__ or error.__context__
    return None


def report_user_error(error):
    # a user's mistake prints one line and gives exit code 1; anything else (or HYDRA_FULL_ERROR=1) is raised
    user_error = find_user_error(error)
    if user_error is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    print(f"error: {user_error}", file=sys.stderr)
    return 1
