# src/defectvad/errors.py
import os
import sys


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
