"""The install as a user meets it: nothing in the repo shadows an installed distribution (Hugging Face's `kernels`,
which transformers >= 5.25 imports, against our kernels/ folder), the CLI and torchrun run from the repo root, the
wheel carries the kernels, the benchmarks and the data and runs outside the repo, `fastpref train` names a floor it
is below, and `make test-latest`'s drift report names the release that moved. The `smoke` ones are what
`make test-latest` runs on the newest releases."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
from importlib.metadata import packages_distributions, version
from pathlib import Path

import pytest

from fastpref import cli, requirements

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
# The environment of a user's shell: no PYTHONPATH, no interpreter flags that would keep the root off sys.path.
USER_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")} | {"OMP_NUM_THREADS": "1"}


def run(command: list[str], cwd: Path, timeout: float = 300, env: dict | None = None) -> str:
    done = subprocess.run(command, cwd=cwd, env=env or USER_ENV, capture_output=True, text=True, timeout=timeout)
    shown = " ".join(map(str, command))
    assert done.returncode == 0, f"{shown} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def top_level_names(folder: Path) -> set[str]:
    """What `folder` on sys.path lets `import X` find first: X.py modules and X/__init__.py packages (a folder
    without __init__.py is only a namespace portion and never beats an installed package)."""
    return {p.stem for p in folder.glob("*.py")} | {p.parent.name for p in folder.glob("*/__init__.py")}


def test_no_top_level_name_shadows_an_installed_distribution():
    """The repo root (python -m, torchrun) and tests/ (pytest's rootdir-less import mode) go first on sys.path:
    none of their importable names may be one that an installed distribution provides."""
    provided = {name for name, dists in packages_distributions().items() if "fastpref" not in dists}
    for folder in (REPO, REPO / "tests"):
        clash = top_level_names(folder) & provided - {"conftest"}
        assert not clash, f"{folder} shadows installed {sorted(clash)}: {[packages_distributions()[n] for n in clash]}"
    assert {"kernels", "bench"} <= {p.name for p in REPO.iterdir() if p.is_dir()}  # where the design keeps them


@pytest.mark.smoke
def test_hugging_face_kernels_imports_from_the_repo_root():
    """transformers >= 5.25 imports HF's `kernels` while loading its activations: from the root it must be theirs."""
    assert version("kernels"), "the test extra installs Hugging Face's `kernels`"  # PackageNotFoundError without
    site = sysconfig.get_paths()["purelib"]
    out = run([PYTHON, "-c", "import kernels, transformers.activations, fastpref.kernels.token_logps as k; "
                             "print(kernels.__file__); print(k.__file__)"], cwd=REPO)
    hf_kernels, ours = out.split()[:2]
    assert hf_kernels.startswith(site), hf_kernels
    assert Path(ours).resolve() == REPO / "kernels" / "token_logps.py"


@pytest.mark.smoke
def test_train_dpo_runs_from_the_repo_root(tmp_path):
    out = run([PYTHON, "-m", "fastpref.cli", "train", "dpo", "--max_steps", "2", "--output_dir", str(tmp_path / "run")],
              cwd=REPO)
    assert "done: 2 steps" in out, out[-2000:]
    assert (tmp_path / "run" / "config.json").exists()


@pytest.mark.smoke
def test_torchrun_two_processes_from_the_repo_root(tmp_path):
    log = tmp_path / "job.log"
    command = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "fastpref.cli",
               "train", "dpo", "--max_steps", "2", "--torch_threads", "1", "--output_dir", str(tmp_path / "run")]
    with open(log, "w") as sink:  # a file, not a pipe: torchrun's helpers can hold a pipe open past the job
        code = subprocess.run(command, cwd=REPO, env=USER_ENV, stdout=sink, stderr=subprocess.STDOUT, timeout=300)
    text = log.read_text()
    assert code.returncode == 0, text[-4000:]
    assert text.count("done: 2 steps") == 1, text[-4000:]  # rank 0 prints the summary
    assert (tmp_path / "run" / "config.json").exists()


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory) -> tuple[Path, dict]:
    """A venv outside the repo holding only fastpref's wheel (built from this checkout); its dependencies come from
    the test venv's site-packages on a path line, whose own .pth files (the editable install) are not run."""
    tmp = tmp_path_factory.mktemp("wheel")
    run([PYTHON, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp), str(REPO)], cwd=tmp)
    (wheel,) = tmp.glob("fastpref-*.whl")
    venv.create(tmp / "venv", with_pip=True)
    bin_dir = tmp / "venv" / "bin"
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    clean_site = subprocess.check_output([bin_dir / "python", "-c", where], text=True).strip()
    Path(clean_site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([bin_dir / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], cwd=tmp)
    env = USER_ENV | {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return tmp, env


@pytest.mark.smoke
def test_wheel_runs_kernels_training_and_bench_outside_the_repo(wheel_env):
    tmp, env = wheel_env
    probe = (
        "import fastpref, torch\n"
        "from importlib import resources\n"
        "assert 'site-packages' in fastpref.__file__, fastpref.__file__\n"
        "import fastpref.kernels.token_logps, fastpref.bench.harness\n"
        "assert resources.files('fastpref.data').joinpath('hhh_alignment.jsonl').is_file()\n"
        "logits, labels = torch.randn(3, 5, 37), torch.randint(0, 37, (3, 5))\n"
        "got = fastpref.token_logps(logits, labels)\n"
        "want = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]\n"
        "torch.testing.assert_close(got, want)\n"
        "print('kernels ok')\n"
    )
    interpret = env | {"TRITON_INTERPRET": "1", "FASTPREF_BACKEND": "triton"}
    assert "kernels ok" in run([tmp / "venv" / "bin" / "python", "-c", probe], cwd=tmp, env=interpret)
    out = run(["fastpref", "train", "dpo", "--max_steps", "2", "--output_dir", str(tmp / "run")], cwd=tmp, env=env)
    assert "done: 2 steps" in out, out[-2000:]
    assert "usage:" in run(["fastpref", "bench", "--help"], cwd=tmp, env=env)


def test_train_names_the_floor_it_is_below(monkeypatch, capsys):
    """Below the train extra's torch floor (DCP's consolidation API), `fastpref train` stops before anything
    loads, naming the version it needs and the one it found."""
    real = requirements.version
    monkeypatch.setattr(requirements, "version", lambda name: "2.8.0" if name == "torch" else real(name))
    assert cli.main(["train", "dpo", "--max_steps", "1"]) == 1
    err = capsys.readouterr().err
    assert "needs torch>=2.9 (installed: 2.8.0)" in err, err
    assert "pip install 'fastpref[train]'" in err


@pytest.mark.smoke
def test_drift_report_names_the_release_that_moved(tmp_path):
    import transformers

    lock = tmp_path / "constraints.txt"
    lock.write_text("# pinned\ntransformers==0.0.1\ntorch==" + __import__("torch").__version__.split("+")[0] + "\n")
    out = run([PYTHON, str(REPO / ".ci" / "drift.py"), str(lock)], cwd=REPO)
    assert f"transformers {transformers.__version__} (pinned 0.0.1)" in out, out
    assert "torch " not in out.replace("(pinned", ""), out  # an unchanged pin is not reported
