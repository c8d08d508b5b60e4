# src/defectvad/errors.py


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
