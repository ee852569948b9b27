"""A run owns its output folder: all of its files or none of them, and never a file it did not write.

A run writes into a fresh hidden staging folder inside the output folder (same file system, so
the final moves are renames). Only when the run succeeds (or ends on a budget failure whose
reports are wanted) is the set moved into place:

1. a run record ``.qfold-run.json`` is written listing the new files with status ``"moving"``;
2. the files of the previous qfold run (listed in the old record) that the new run does not
   write are removed, so stale files (plots of an earlier run with ``plots = true``) never sit
   beside the new ones;
3. the new files are renamed into place and the record is rewritten with the final status.

A failed or interrupted run removes its staging folder and leaves the output folder as it was.
A run killed outright (SIGKILL, power loss) cannot; its staging folder is named after the host and
process, and the next run into that folder removes it once that process no longer exists. A staging
folder kept on purpose (the results of a run whose files clashed with a user's) is marked and kept.
A file already in the output folder that no qfold run recorded (a user's ``config.toml`` in
``--out .``) is never overwritten: :func:`check_out_dir` refuses such a folder before any work.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp()) / "out"
>>> with owned(d) as run:
...     _ = (run.path / "a.txt").write_text("x")
>>> sorted(p.name for p in d.iterdir())
['.qfold-run.json', 'a.txt']
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from calib.atomic import atomic_write_text
from qfold.errors import OutputDirError

RECORD = ".qfold-run.json"
STAGE_PREFIX = ".qfold-stage-"
KEPT_MARK = ".qfold-kept"  # inside a staging folder left on purpose: never removed as stale

#: Names qfold may write into an output folder (patterns for fnmatch); a file matching one of these
#: that no qfold run recorded belongs to the user and makes the folder unusable as output.
ARTIFACT_PATTERNS = (
    "config.toml", "manifest.json", "reports.json", "*_report.json", "*.onnx", "*.precision.json",
    "calibration.json", "calibration.trtcache", "engine.plan", "accuracy.json", "accuracy.md",
    "engine_accuracy.json", "engine_accuracy.md", "*.png", "*.onnx.json", "*.plan.json", "calibration.trtcache.json",
    "engine_check.json", "sensitivity.json", "sensitivity.md", "fallback.json", "fallback.md", "config.fallback.toml",
)

_ACTIVE: dict[Path, Path] = {}  # staging folder -> final output folder, for runs in progress


def _recorded(out: Path) -> set[str]:
    rec = out / RECORD
    if not rec.is_file():
        return set()
    try:
        return set(json.loads(rec.read_text()).get("files", []))
    except (ValueError, OSError, AttributeError):
        return set()


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_out_dir(out: str | os.PathLike, flag: str = "--out", inputs: dict[str, str | os.PathLike | None] | None = None) -> Path:
    """Refuse an output folder that is a file, not writable, or holds a user's file qfold could write over.

    ``inputs`` (flag -> path) are the run's input files: one that is a file of the earlier qfold run
    in ``out`` is refused too, as the new run replaces that run's files. Creates nothing. Returns
    the folder as an absolute path.
    """
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"{flag} {out} is a file, not a folder; pass a folder path (it is created if missing)")
    base = _nearest_existing(out)
    if not base.is_dir():
        raise OutputDirError(f"{flag} {out} cannot be created: {base} is a file; pass a folder path")
    if base.is_dir() and not os.access(base, os.W_OK | os.X_OK):
        raise OutputDirError(f"{flag} {out} is not writable ({base} is read-only for this user); choose a folder you can write to")
    if out.is_dir() and not _is_stage(out):
        ours = _recorded(out)
        theirs = sorted(p.name for p in out.iterdir()
                        if p.is_file() and p.name not in ours and any(fnmatch.fnmatch(p.name, pat) for pat in ARTIFACT_PATTERNS))
        if theirs:
            raise OutputDirError(f"{flag} {out} already holds {', '.join(theirs[:3])}{' ...' if len(theirs) > 3 else ''}, which no qfold "
                                 f"run wrote there (no {RECORD} lists it); choose a new or empty folder, or move those files away")
        for name, path in (inputs or {}).items():
            p = Path(path).absolute() if path else None
            if p is not None and p.is_file() and p.parent == out and p.name in ours:
                raise OutputDirError(f"{name} {path} is a file of the earlier qfold run in {flag} {out}, which this run replaces; "
                                     f"write to another folder ({flag} {out.name}-2, say)")
    return out


def _is_stage(path: Path) -> bool:
    return path.absolute() in _ACTIVE


def final_path(path: str | os.PathLike) -> Path:
    """Where a path inside a staging folder will be once the run is moved into place."""
    p = Path(path).absolute()
    for stage, final in _ACTIVE.items():
        if p == stage or stage in p.parents:
            return final / p.relative_to(stage)
    return Path(path)


@dataclass
class Run:
    """A run in progress: write under ``path``; ``status`` is recorded when the run is moved into place."""

    path: Path
    out: Path
    status: str = "complete"

    def final(self, p: str | os.PathLike) -> Path:
        """The final location of ``p`` (a path under :attr:`path`; other paths are returned as given)."""
        q = Path(p).absolute()
        return self.out / q.relative_to(self.path) if q == self.path or self.path in q.parents else Path(p)


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _commit(run: Run) -> None:
    out, stage = run.out, run.path
    new = _files(stage)
    old = _recorded(out)
    clash = [f for f in new if (out / f).exists() and f not in old]
    if clash:  # a user's file appeared while the run worked: keep both, say where the results are
        err = OutputDirError(f"{out} now holds {clash[0]}, which no qfold run wrote; the results were left in {stage}")
        err.keep_stage = True  # type: ignore[attr-defined]
        (stage / KEPT_MARK).write_text(str(err) + "\n")
        raise err
    record = {"schema": 1, "files": new}
    atomic_write_text(out / RECORD, json.dumps({**record, "status": "moving"}, indent=2) + "\n")
    for f in sorted(old - set(new)):
        p = out / f
        if p.is_file():
            p.unlink()
    for f in new:
        (out / f).parent.mkdir(parents=True, exist_ok=True)
        os.replace(stage / f, out / f)
    atomic_write_text(out / RECORD, json.dumps({**record, "status": run.status}, indent=2) + "\n")


def _host() -> str:
    return "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:40] or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove_stale_stages(out: Path) -> list[Path]:
    """Remove staging folders of runs on this host whose process is gone (killed before cleaning up)."""
    removed = []
    for stage in out.glob(f"{STAGE_PREFIX}{_host()}-*-*"):
        pid = stage.name[len(f"{STAGE_PREFIX}{_host()}-"):].split("-", 1)[0]
        if stage.is_dir() and pid.isdigit() and not (stage / KEPT_MARK).exists() and not _alive(int(pid)):
            shutil.rmtree(stage, ignore_errors=True)
            removed.append(stage)
    return removed


@contextmanager
def owned(out: str | os.PathLike, keep_on: tuple[type[BaseException], ...] = (), flag: str = "--out") -> Iterator[Run]:
    """Stage a run's files and move them into ``out`` as one set when the block ends.

    On normal exit, or on an exception of a type in ``keep_on`` (recorded as status
    ``"failed: <Type>"`` and re-raised), the files are moved into place. On any other exception
    the staging folder is removed and ``out`` is left as it was. Re-entrant: given a staging
    folder of a run in progress, it yields that run's folder and leaves the moving to the outer run.
    """
    target = Path(out).absolute()
    if _is_stage(target):
        yield Run(target, _ACTIVE[target])
        return
    target = check_out_dir(target, flag)
    created = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    _remove_stale_stages(target)
    stage = Path(tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{_host()}-{os.getpid()}-", dir=target))
    _ACTIVE[stage] = target
    run = Run(stage, target)
    try:
        try:
            yield run
        except keep_on as exc:
            run.status = f"failed: {type(exc).__name__}"
            _commit(run)
            raise
        _commit(run)
    except BaseException as exc:
        if not getattr(exc, "keep_stage", False):
            shutil.rmtree(stage, ignore_errors=True)
        if created and target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        raise
    finally:
        _ACTIVE.pop(stage, None)
    shutil.rmtree(stage, ignore_errors=True)
