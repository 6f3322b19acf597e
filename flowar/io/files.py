"""Output paths: checked before any work, written atomically.

Every command checks each output location with :func:`check_writable` before it loads a model
or samples anything, so an unwritable path costs the user one line and no time; files are then
written with :func:`atomic_write_bytes`, so an interrupted run leaves the previous file or none.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from flowar.errors import FlowARError, raise_if_stopped, stops_held
from flowar.io.memory import process_alive


def check_writable(path: str | Path | None, is_dir: bool = False, option: str = "the output") -> None:
    """Fail now, with one line, if ``path`` could not be written later. Probes the nearest existing
    folder on the way to ``path`` by creating and removing a temporary file there: permission bits,
    read-only or virtual file systems (``/proc``) and files standing where folders are needed all
    show up, and nothing is left behind."""
    if path is None or path == "":
        return
    p = Path(path)
    kind = "folder" if is_dir else "file"
    if not _resolve(p).name:                     # (a lock beside it had no name: a ValueError's traceback)
        raise FlowARError(f"{option} a {kind} to write", f"{p}, the file system's root", f"give {option} a new folder")
    if p.exists() and p.is_dir() != is_dir:
        raise FlowARError(f"{option} to be a {kind}", f"{p} exists as a {'folder' if p.is_dir() else 'file'}",
                          f"choose another path for {option}")
    base = p if (is_dir and p.exists()) else p.parent
    while not base.exists() and base != base.parent:
        base = base.parent
    # (the path itself named where its folders are still to be made: "/ is not a writable folder" for a cache
    # under a HOME that does not exist named neither)
    at = f"{p}: its nearest existing folder " if base not in (p, p.parent) else ""
    if not base.is_dir():
        raise FlowARError(f"a writable location for {option}", f"{at}{base} is not a writable folder (it is a file)",
                          f"choose another path for {option}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".flowar-write-probe-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise FlowARError(f"a writable location for {option}", f"{at}{base} is not a writable folder (a file could not "
                          f"be created there: {e.strerror or e})", f"choose another path for {option}") from None


def file_state(path: str | Path | int) -> list[int]:
    """What changes whenever a file's bytes may have: its device, inode, size, and modification and
    change times (a change time cannot be set back), for records that stand in for hashing a file
    again (an engine directory's files found whole, ONNX Runtime's optimized copies' graphs). ``path``
    may be an open file's descriptor."""
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def user_cache(name: str) -> Path:
    """Where this user's caches live: ``$XDG_CACHE_HOME/flowar/name``, else ``~/.cache/flowar/name``
    (the judge's weights and the trainer's latents, kept in the working directory, were made again
    from every other folder)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "flowar" / name


def files_of(p: Path) -> list[Path]:
    """The files an input is made of: itself; for an engine directory its manifest and every file it
    lists; for another folder (a diffusers VAE) the files at its top."""
    if not p.is_dir():
        return [p]
    if (p / "manifest.json").is_file():
        import json
        try:
            listed = json.loads((p / "manifest.json").read_text())
        except (OSError, ValueError):
            listed = {}
        names: list[str] = []
        stack = [listed]                   # every "file" and "data" name, at any depth
        while stack:
            v = stack.pop()
            if isinstance(v, dict):
                names += [x for k, x in v.items() if k in ("file", "data") and isinstance(x, str)]
                stack += v.values()
            elif isinstance(v, list):
                stack += v
        return [p / "manifest.json"] + [_resolve(p / n) for n in names]
    return [f for f in p.iterdir() if f.is_file()]


def _resolve(p: Path) -> Path:
    """``p`` with its links followed; a loop of symbolic links is one line (it was a traceback)."""
    try:
        return p.resolve()
    except RuntimeError:
        raise FlowARError("a path whose symbolic links lead to a file or folder", f"{p}: a loop of links",
                          "point the links at a real file, or pass the real path") from None


def check_outputs(outputs: list[tuple[str, str | Path | None]], inputs: list[str | Path | None]) -> None:
    """Refuse, before any work, an output path (``(option, path)``; None: not given) that is empty,
    that is an input or one of the files an input folder is made of (``--save-tokens`` at the
    checkpoint, or at the VAE folder's weights, overwrote them; other files in an input folder, such
    as an earlier run's grid, may be written again), or that another output also names (both were
    written, then the command failed half way)."""
    ins = [(_resolve(f), p) for p in inputs if p for f in files_of(Path(p))]
    seen: dict[Path, str] = {}
    for option, p in outputs:
        if p is None:
            continue
        if not str(p).strip():              # (taken as not given, or as the working directory)
            # (it said "or leave it out" also of options that are required: flowar-export's and flowar-sample's --out)
            raise FlowARError(f"a path for {option}", "an empty one", f"give {option} a path")
        r = _resolve(Path(p))
        for i, given in ins:
            if r == i:
                of = "" if Path(given).resolve() == i else "a file of "
                raise FlowARError(f"{option} apart from the inputs", f"{p} is {of}{given}",
                                  f"choose another path for {option}")
        if r in seen:
            raise FlowARError(f"{option} apart from {seen[r]}", f"both at {p}", "give each output its own path")
        seen[r] = option


def check_replaceable(target: str | Path, marker: str, option: str, sources: tuple = (),
                      owned: Callable[[Path], set[str] | None] | None = None) -> None:
    """Refuse, before any work, a folder that writing ``target`` anew would destroy: ``target`` may
    be absent, an empty folder, or a folder this command made before (it holds ``marker``; with
    ``owned``, nothing but the names ``owned(target)`` says it wrote and their temporary files; None from it:
    it cannot tell, the folder is replaced), and no input (``sources``) may lie inside it. A folder of
    other files (a checkpoint's, a home folder, ``.``) is never replaced."""
    t = Path(target).resolve()
    if not t.exists():
        return
    if not t.is_dir():
        raise FlowARError(f"{option} to be a folder", f"{t} is a file", f"choose a new folder for {option}")
    if not _may_move(t):                # (an export did all its work, then failed at the swap: "Operation not permitted")
        raise FlowARError(f"{option} a folder this user may replace (it is replaced as a whole)",
                          f"{t} belongs to another user, in {t.parent}, where only a folder's owner may move it",
                          f"choose a new folder for {option}")
    if Path.cwd().resolve().is_relative_to(t):      # (replacing it would leave the shell in a deleted folder)
        raise FlowARError(f"{option} a folder other than the working directory or one above it (it is replaced as a "
                          "whole)", f"{t}, and the working directory is {Path.cwd()}",
                          f"name a new folder for {option}, e.g. {option} engines")
    inside = [str(s) for s in sources if s is not None and Path(s).resolve().is_relative_to(t)]
    if inside:
        raise FlowARError(f"{option} apart from the inputs (it is replaced as a whole)", f"{inside[0]} inside {t}",
                          f"choose a new folder for {option}")
    others = sorted(c.name for c in t.iterdir())
    mine = owned(t) if owned is not None and marker in others else None
    if others and marker not in others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise FlowARError(f"{option}: a new or empty folder, or one this command wrote (with {marker}), which it "
                          "replaces",
                          f"{t} holds other files ({shown})", f"choose a new folder for {option}")
    # (hidden names too, but its own temporary files: a user's .git or .dvc folder went with a re-export)
    theirs = [c for c in others if mine is not None and c not in mine and not c.startswith((".flowar-", *(f".{n}." for n in mine)))]
    if theirs:                              # (a bulk run's folder or a grid written into an engine directory since)
        shown = ", ".join(theirs[:3]) + (", ..." if len(theirs) > 3 else "")
        raise FlowARError(f"{option}: a folder holding only what this command wrote (it is replaced as a whole)",
                          f"{t} also holds {shown}",
                          f"move {'them' if len(theirs) > 1 else 'it'} out first, or choose a new folder for {option}")


def _may_move(p: Path) -> bool:
    """Whether this user may rename ``p``: in a folder with the sticky bit (/tmp, shared scratch
    folders) only the owner of ``p`` or of the folder may (or root)."""
    import stat
    try:
        folder, own = p.parent.stat(), p.lstat()
    except OSError:
        return True                     # (what the rename will say)
    return not folder.st_mode & stat.S_ISVTX or os.geteuid() in (0, own.st_uid, folder.st_uid)


def _umask() -> int:
    """The process's umask, read without changing it (os.umask would, for every thread)."""
    try:
        return int(next(ln for ln in Path("/proc/self/status").read_text().splitlines()
                        if ln.startswith("Umask:")).split()[1], 8)
    except (OSError, ValueError, IndexError, StopIteration):
        umask = os.umask(0o022)
        os.umask(umask)
        return umask


def atomic_write_bytes(path: str | Path, write, placed=None) -> None:
    """Call ``write(tmp_path)`` then rename into place, so a crash never leaves a half file.

    The file gets the permissions a plain write would give (0666 less the umask), not the
    owner-only mode of a temporary file. A stop that comes during the rename waits for it and for
    ``placed()`` (the caller's note that the file is written), then is raised.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(p.parent, f".{p.name}.", r"-\w+\.tmp")      # (a write that was killed left its temporary file)
    tmp = None
    try:
        with stops_held():                 # (a stop raised with the file made and not yet named here left it behind)
            fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.{os.getpid()}-", suffix=".tmp", dir=p.parent)
            os.close(fd)
        write(tmp)
        raise_if_stopped()                 # (a Ctrl-C that a library swallowed while it wrote: not put in place)
        os.chmod(tmp, 0o666 & ~_umask())
        with stops_held():
            os.replace(tmp, p)
            tmp = None
            if placed is not None:
                placed()
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def as_file(value):
    """A path that exists as the file it names (./a and /abs/a compare equal); anything else as it is."""
    return str(Path(value).resolve()) if isinstance(value, str) and os.path.exists(value) else value


def remove_stale(folder: Path, head: str, rest: str = r"-\w+") -> None:
    """Remove what writers that were killed left in ``folder``: files and folders named ``head``, then
    their process's id (temporary names carry it for this), then what matches ``rest`` (a regular
    expression), whose process is gone. Only names of exactly that form: a user's ``.grid.png.2026``
    is not one."""
    import glob
    pattern = re.compile(re.escape(head) + r"(\d+)" + rest)
    for p in folder.glob(glob.escape(head) + "[0-9]*"):
        m = pattern.fullmatch(p.name)
        if m and not process_alive(int(m.group(1))):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _set_mode(path: str, mode: int) -> None:
    """``chmod`` where the mode differs: a chmod moves the change time, which the records of files
    found whole hold (ONNX Runtime's optimized copies, made by the export, were hashed again on
    the first open, and on every open of a directory its user could not write)."""
    if os.stat(path).st_mode & 0o7777 != mode:
        os.chmod(path, mode)


@contextmanager
def used_alone(target: str | Path, command: str, option: str = "--out", wait: bool = False) -> Iterator[None]:
    """This command writes ``target`` alone while the block runs: another command of this project that
    writes the same path meanwhile is refused at once, with one line. Two ``flowar-sample`` runs with
    other seeds into one new folder both ended with exit 0, the images of one under the other's
    run.json; two exports into one ``--out`` both said they had written it, and the directory held the
    second. An advisory lock (``flock``) on ``.NAME.lock`` beside ``target``, which the kernel releases
    however the holder ends (a killed one leaves only the empty file); the folders on the way are made
    for it (and removed again where the command leaves them empty); where the folder takes no lock
    (read-only, a file system without locks) the command runs unguarded, as before. ``wait``: the
    holder's work is waited for (a note says so) instead of refused."""
    try:
        import fcntl
    except ImportError:                          # (not POSIX)
        yield
        return
    t = Path(target).resolve()
    lock = t.with_name(f".{t.name}.lock")
    # (a lock file that is a symbolic link is not followed: one planted in a shared folder would have had
    # the file it points to truncated)
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    fd, tries, made = None, 0, []                # made: the folders on the way made for the lock (two runs
    while fd is None and tries < 10:             # into a new nested --out ran unguarded and mixed their images)
        tries += 1
        try:
            for d in reversed([q for q in t.parents if not q.exists()]):
                d.mkdir()
                made.insert(0, d)
        except OSError:
            pass
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | nofollow, 0o666)
        except FileNotFoundError:                # (its folders removed meanwhile by a holder that ended: taken for
            continue                             # a file system without locks, it ran unguarded, a third beside it)
        except PermissionError:                  # (another user's lock file: read-only is enough for flock)
            try:
                fd = os.open(lock, os.O_RDONLY | nofollow)
            except OSError:
                break
        except OSError:
            break
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").split()
            who = f"process {holder[0]}" if holder and holder[0].isdigit() else "another process"
            if wait:
                import sys
                print(f"note: waiting for {who}, which writes {t} ({command})", file=sys.stderr, flush=True)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except BaseException:
                    os.close(fd)
                    raise
            else:
                os.close(fd)
                raise FlowARError(f"{option} that no other command is writing", f"{t} is being written by {who} "
                                  f"(another {command}, or a command that writes the same path)",
                                  f"wait for it to end, or choose another {option}") from None
        except OSError:                          # (no locks there)
            os.close(fd)
            fd = None
            break
        try:                                     # the lock must still be the file at that name (a holder that
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino          # ended removed it: a new one is made)
        except OSError:
            same = False
        if not same:
            os.close(fd)
            fd = None
            continue
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:                          # (opened read-only: the holder is not named)
            pass
    try:
        yield
    finally:
        if fd is not None:
            try:
                os.unlink(lock)                  # (before the unlock: a command that opens it after makes a new one)
            except OSError:
                pass
            os.close(fd)
        for d in made:                           # (a refused or failed command leaves no folders behind)
            try:
                d.rmdir()
            except OSError:
                break


@contextmanager
def staged_directory(target: str | Path, marker: str, option: str = "--out",
                     owned: Callable[[Path], set[str] | None] | None = None) -> Iterator[Path]:
    """Build into a temporary sibling; on success swap it into ``target``; on failure remove it.
    A folder at ``target`` is replaced only if it is one this command made (:func:`check_replaceable`,
    checked at the swap; callers check it before their work too, so that a refusal costs nothing).

    A crash at any point leaves either the previous complete directory or no directory at
    ``target``, never a partial one (the temporary name starts with '.' and has no manifest
    until the very end). The temporary name carries this process's id, so the next export into
    the same place removes what a killed one left (only folders of that naming whose process is gone).
    """
    target = Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target.parent, f".{target.name}.tmp-")       # (an export that was killed left its folder)
    remove_stale(target.parent, f".{target.name}.old-", "")
    tmp = None
    try:
        with stops_held():                 # (a stop raised with the folder made and not yet named here left it behind)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
        yield tmp
        raise_if_stopped()                 # (a Ctrl-C that a library swallowed while the work ran: nothing swapped in)
        umask = _umask()                   # what a plain write gives: files made owner-only (safetensors
        _set_mode(str(tmp), 0o777 & ~umask)      # writes 0600, temporary folders are 0700) readable by others too,
        for root, dirs, files in os.walk(tmp):   # and under umask 077 not (the folder itself was made 0755)
            for d in dirs:
                _set_mode(os.path.join(root, d), 0o777 & ~umask)
            for f in files:
                p = os.path.join(root, f)
                if not os.path.islink(p):
                    _set_mode(p, (0o777 if os.access(p, os.X_OK) else 0o666) & ~umask)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    with stops_held():                     # (the swap is one step: a stop that comes meanwhile ends the command after it)
        try:
            check_replaceable(target, marker, option, owned=owned)
        except FlowARError as e:       # (files appeared there meanwhile)
            raise _kept(tmp, target, e) from None
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            try:
                os.replace(target, old)
            except OSError as e:       # (one this user may not move, found only now)
                raise _kept(tmp, target, FlowARError(f"{option} a folder this user may replace", f"{target}: "
                                                     f"{e.strerror or e}", f"choose a new folder for {option}")) from None
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _kept(tmp: Path, target: Path, e: FlowARError) -> FlowARError:
    """The finished directory ``tmp`` kept beside ``target`` under a name the next export does not
    remove (the work is not thrown away, nor left hidden: a refusal at the swap left it as
    ``.NAME.tmp-...``, owner-only, unnamed in the line), and ``e`` saying where it is."""
    kept = Path(tempfile.mkdtemp(prefix=f".{target.name}.kept-", dir=target.parent))
    os.replace(tmp, kept)             # (its mode that of a plain mkdir, as the swap would have given it)
    return FlowARError(e.expected, e.got, f"{e.fix}; the finished directory is kept at {kept}: move it where you want it")
