# src/defectvad/hydra_errors.py
# mistakes Hydra meets before a run starts (a misspelt key, an output folder it cannot create), as one line
import difflib
import os
import sys

from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from defectvad.errors import describe_output_error, find_user_error


def describe_unknown_key(error):
    # Hydra's "Could not override 'x'. To append to your config use +x=..." with the keys that do exist there
    cause = error.__cause__
    if not isinstance(error, ConfigCompositionException) or not isinstance(cause, (ConfigAttributeError,
                                                                                    ConfigKeyError)):
        return None
    parent = cause.parent_node
    keys = [str(key) for key in parent.keys()] if hasattr(parent, "keys") else []
    if not keys or not cause.full_key:
        return None
    group, _, key = str(cause.full_key).rpartition(".")
    where = f"the keys of {group} are" if group else "the top-level keys are"
    close = difflib.get_close_matches(key, keys, n=1)
    guess = f" (did you mean {'.'.join(filter(None, (group, close[0])))}?)" if close else ""
    append = str(error).rpartition("use ")[2] if "use +" in str(error) else f"+{cause.full_key}=..."
    return (f"unknown config key {cause.full_key}{guess}; {where}: {', '.join(keys)}; to add a key that is not "
            f"in the config, write {append}")


def explain_errors(task):
    try:
        return task()
    except Exception as error:
        # a sweep's own files (sweep.json) are written before any run, by its callback
        message = describe_unknown_key(error) or describe_output_error(error) or find_user_error(error)
        if message is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)


def explain_hydra_errors():
    # Hydra prints what composing the config or creating hydra.run.dir raised; each of its steps runs in
    # hydra._internal.utils.run_and_report, which this wraps so that these mistakes read as one line.
    # Another Hydra version without that function keeps Hydra's own messages
    from hydra._internal import utils

    report = getattr(utils, "run_and_report", None)
    if report is None or getattr(report, "explains", False):
        return

    def run_and_report(task):
        return report(lambda: explain_errors(task))

    run_and_report.explains = True
    utils.run_and_report = run_and_report
