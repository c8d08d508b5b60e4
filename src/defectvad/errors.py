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
