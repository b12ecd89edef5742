"""Issue 27, operating-system faults under every writing command (``train``, ``train-cf``,
``evaluate``, ``recommend``, ``compare``), two cases of each class per command:

* an output whose parent is a file (``F/x``, ``F/a/b``);
* a REAL read-only parent: a read-only bind mount in a private mount namespace
  (``unshare -m``; the tests run as root, whom ``chmod`` does not stop), ``RO/x`` and
  ``RO/new/x``;
* a missing parent: created when its nearest existing folder is writable (success), refused
  under a file or a read-only folder (the cases above);
* a full disk: a real ``ENOSPC`` (a tmpfs filled to the last byte, in a private mount
  namespace) and ``EFBIG`` (``RLIMIT_FSIZE``, ``ulimit -f``).

Every failure is one ``llmrec <command>: error:`` line with exit status 2 (refused before
anything starts) or 1 (an OS error met while writing); no temporary is left; and the digest of
every file the command did not create (the dataset, the runs it reads, the other files beside
its output) is the same before and after.
"""

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from llmrec.cli import main

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ("train", "train-cf", "evaluate", "recommend", "compare")
TINY = ["--rank", "2", "--alpha", "4", "--generator", "mlp", "--max-his", "3", "--tiny-hidden",
        "16", "--tiny-layers", "1", "--tiny-heads", "2", "--tiny-kv-heads", "1", "--tiny-vocab",
        "300", "--backend", "torch", "--batch-size", "16", "--max-length", "160",
        "--no-progress"]  # fmt: skip


def _can_mount() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs tmpfs /mnt"],
                           capture_output=True)  # fmt: skip
    return probe.returncode == 0


needs_mount = pytest.mark.skipif(
    not _can_mount(), reason="needs root and mount namespaces (unshare -m)"
)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Tiny CSV data, an MF run on it and a small CoRA run."""
    root = tmp_path_factory.mktemp("faults")
    data, mf = root / "data", root / "mf"
    assert main(["make-data", "--out", str(data), "--format", "csv", "--users", "30", "--items",
                 "20", "--per-user", "12", "--dim", "2"]) == 0  # fmt: skip
    assert main(["train-cf", "--data", str(data), "--out", str(mf), "--dim", "8", "--epochs", "2",
                 "--no-progress"]) == 0  # fmt: skip
    return {"root": root, "data": data, "mf": mf}


def argv_of(command: str, env, output) -> list:
    """``command`` writing its one output to ``output`` (a path)."""
    data, mf = env["data"], env["mf"]
    return [str(a) for a in {
        "train": ["train", "--method", "cora", "--data", data, "--cf", mf, "--epochs", "1",
                  "--max-steps", "1", *TINY, "--out", output],
        "train-cf": ["train-cf", "--data", data, "--out", output, "--dim", "8", "--epochs", "1",
                     "--no-progress"],
        "evaluate": ["evaluate", "--run", mf, "--predictions", output, "--no-progress"],
        "recommend": ["recommend", "--run", mf, "--retrieve", "5", "--out", output,
                      "--no-progress"],
        "compare": ["compare", mf, "--json", output, "--no-plot"],
    }[command]]  # fmt: skip


def tree_digest(folder: Path) -> dict:
    """sha256 of every file under ``folder`` (the run locks, emptied by every clean end, and
    Python's byte-code caches aside)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".llmrec.lock" and "__pycache__" not in p.parts
    }


def temporaries(folder: Path) -> list:
    return [p for p in folder.rglob("*") if p.name.startswith(".") and "tmp-" in p.name]


def one_error_line(err: str, command: str) -> str:
    assert "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(errors) == 1, err
    assert errors[0].startswith(f"llmrec {command}: error: "), errors[0]
    return errors[0]


def cli(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse
        rc = exc.code
    return rc, capsys.readouterr().err


def _python_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(ROOT / "python"), env.get("PYTHONPATH", "")]
    )
    return env


def in_mount_namespace(setup: str, commands, report: Path, after: str = "") -> list:
    """Run ``setup`` (shell: the mounts), each argv of ``commands`` with ``python -m
    llmrec.cli``, then ``after`` (shell) in one private mount namespace (its mounts vanish with
    it); each command's exit status and stderr go to files ``report.rc<j>`` / ``.err<j>``.
    Returns ``[(exit status, stderr)]``."""
    script = [setup]
    for j, argv in enumerate(commands):
        quoted = " ".join(f"'{a}'" for a in argv)
        script.append(f"{sys.executable} -m llmrec.cli {quoted} 2> '{report}.err{j}'; "
                      f"echo $? > '{report}.rc{j}'")  # fmt: skip
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", "\n".join([*script, after])], env=_python_env(),
        text=True, capture_output=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = []
    for j in range(len(commands)):
        out.append((int(Path(f"{report}.rc{j}").read_text()), Path(f"{report}.err{j}").read_text()))
    return out


# ---------------------------------------------------------------------------------------------
# a parent that is a file; a missing parent


@pytest.mark.parametrize("command", COMMANDS)
def test_an_output_under_a_file_is_refused(env, tmp_path, capsys, command):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    before = {"env": tree_digest(env["root"]), "here": tree_digest(tmp_path)}
    for output in (afile / "x.json", afile / "a" / "b"):
        rc, err = cli(argv_of(command, env, output), capsys)
        assert rc == 2, err
        assert f"{afile} is a file, not a directory" in one_error_line(err, command)
    assert {"env": tree_digest(env["root"]), "here": tree_digest(tmp_path)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_missing_parent_under_a_writable_folder_is_created(env, tmp_path, capsys, command):
    before = tree_digest(env["root"])
    output = tmp_path / "new" / "deeper" / ("out" if command.startswith("train") else "x.json")
    rc, err = cli(argv_of(command, env, output), capsys)
    assert rc == 0, err
    assert output.exists()
    assert not temporaries(tmp_path)
    now = tree_digest(env["root"])
    if command == "evaluate":  # its metrics file in the run, which evaluate always writes
        now.pop("mf/eval_test.json")
        before.pop("mf/eval_test.json", None)
    assert now == before


# ---------------------------------------------------------------------------------------------
# a real read-only parent


@needs_mount
def test_a_read_only_parent_is_refused_by_every_command(env, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "kept.txt").write_text("written before the folder became read-only")
    before = {"env": tree_digest(env["root"]), "ro": tree_digest(ro)}
    cases = [(c, output) for c in COMMANDS for output in (ro / "x", ro / "new" / "x")]
    setup = f"mount --bind '{ro}' '{ro}' && mount -o remount,bind,ro '{ro}' || exit 3"
    results = in_mount_namespace(setup, [argv_of(c, env, o) for c, o in cases], tmp_path / "r")
    for (command, _), (rc, err) in zip(cases, results):
        assert rc == 2, (command, err)
        assert f"{ro} is not writable" in one_error_line(err, command)
    assert {"env": tree_digest(env["root"]), "ro": tree_digest(ro)} == before


# ---------------------------------------------------------------------------------------------
# a full disk: ENOSPC (a filled tmpfs) and EFBIG (RLIMIT_FSIZE)


@needs_mount
def test_a_full_disk_is_one_line_under_every_command(env, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    report = tmp_path / "r"
    # a 256 KiB tmpfs filled by dd to the last byte: every later write fails with ENOSPC
    setup = (f"mount -t tmpfs -o size=256k tmpfs '{full}' || exit 3\n"
             f"dd if=/dev/urandom of='{full}/filler' bs=4096 2>/dev/null; true")  # fmt: skip
    outputs = {c: full / ("out" if c.startswith("train") else "x.json") for c in COMMANDS}
    before = tree_digest(env["root"])
    commands = [argv_of(c, env, outputs[c]) for c in COMMANDS]
    # what the tmpfs holds before and after the commands, listed from inside the namespace
    listing = "cd '{full}' && find . -type f -exec sha256sum {{}} + | sort > '{report}.{when}'"
    setup += "\n" + listing.format(full=full, report=report, when="before")
    after = listing.format(full=full, report=report, when="after")
    results = in_mount_namespace(setup, commands, report, after)
    for command, (rc, err) in zip(COMMANDS, results):
        assert rc == 1, (command, err)
        assert "No space left on device" in one_error_line(err, command)
    held = Path(f"{report}.before").read_text()
    assert "./filler" in held and Path(f"{report}.after").read_text() == held  # nothing else
    assert tree_digest(env["root"]) == before


def _file_size_limit(limit: int):
    def apply():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize("command", COMMANDS)
def test_a_file_size_limit_is_one_line_and_leaves_nothing_half_written(env, tmp_path, command):
    output = tmp_path / "w" / ("out" if command.startswith("train") else "x.json")
    output.parent.mkdir()
    (output.parent / "beside.txt").write_text("x" * 4096)  # more than the limit: kept as is
    before = {"env": tree_digest(env["root"]), "here": tree_digest(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "llmrec.cli", *argv_of(command, env, output)], env=_python_env(),
        text=True, capture_output=True, preexec_fn=_file_size_limit(200), timeout=600,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "File too large" in one_error_line(proc.stderr, command)
    assert not temporaries(tmp_path)
    after = tree_digest(tmp_path)
    made = {k: v for k, v in after.items() if k not in before["here"]}
    if command.startswith("train") and made:  # only a resumable run may stay
        assert json.loads(output.joinpath("run.json").read_text())["complete"] is False
    else:
        assert not made, made
    assert {k: after[k] for k in before["here"]} == before["here"]
    assert tree_digest(env["root"]) == before["env"]
