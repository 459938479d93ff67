"""make's parameters are checked before anything is written, output folders are safe, NPROC=1 sweeps work, the cache
reads only regular files and cleans up after killed runs, and killed launchers take their workers with them."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from argparse import Namespace
from pathlib import Path

import pytest
import torch

import mmflow.cache
from mmflow.errors import MmflowError
from mmflow.execute import notebook_parameters, record_default_cache, remove_stale_progress
from mmflow.params import check_output_folder, check_run_params

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
EXECUTED = ROOT / "notebooks" / "executed"


def make(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``make ARGS`` in the project root with this worktree's code, never refreshing the virtual environment."""
    stamp = subprocess.run(
        "cat requirements.lock pyproject.toml | cksum | cut -d' ' -f1", shell=True, cwd=ROOT, capture_output=True,
        text=True, check=True,
    ).stdout.strip()  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        ["make", "-o", f".venv/.installed-{stamp}", *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def tracked_state() -> tuple[str, dict[str, str]]:
    """What git sees as changed, and the hashes (and times) of the committed executed notebooks and figures."""
    status = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    files = sorted([*EXECUTED.glob("*.ipynb"), *(ROOT / "figures").glob("*")])
    return status, {str(p): f"{hashlib.sha1(p.read_bytes()).hexdigest()} {p.stat().st_mtime_ns}" for p in files}


@pytest.mark.parametrize(
    "parameter",
    [
        "DEVICE=cuda", "DTYPE=float8", "INPUTS=bogus", "KEEP=some", "ENGINE=turbo", "OUT=/", "OUT=",
        "CACHE=/etc/mmflow", "MODEL=./no-such-model", "MODELS=shapes-qwen bogus/../x", "JOBS=0",
    ],
)  # fmt: skip
def test_make_reproduce_refuses_a_bad_parameter_before_writing_anything(parameter):
    """Each was checked inside the notebook, after the committed executed copy had been overwritten (or, for OUT=/,
    after 32 files were written into /)."""
    if parameter == "DEVICE=cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    before = tracked_state()
    done = make("reproduce", parameter)
    name, value = parameter.split("=")
    assert done.returncode != 0
    assert f"make reproduce: {name}={value!r}" in done.stderr, done.stderr  # the make variable and its value
    assert "Traceback" not in done.stderr and "== 1_to_last_flow" not in done.stdout  # no notebook started
    assert tracked_state() == before  # nothing rewritten, nothing new
    assert not Path("/executed").exists() and not Path("/fig1_to_last.png").exists()


@pytest.mark.parametrize("parameter", ["CACHE=/", "KEEP=some", "DTYPE=float8", "ENGINE=turbo"])
def test_make_sweep_refuses_a_bad_parameter_before_starting_its_processes(parameter, tmp_path):
    done = make("sweep", parameter, timeout=120)
    name, value = parameter.split("=")
    assert done.returncode != 0 and f"make sweep: {name}={value!r}" in done.stderr, done.stderr
    assert "accelerate" not in done.stdout + done.stderr  # refused before the launcher started


def test_make_normalises_a_trailing_slash_of_out_and_cache():
    """OUT=figures/ is the default run (its executed copies are the committed ones), not figures/executed."""
    plain, slashed = make("-n", "reproduce"), make("-n", "reproduce", "OUT=figures/", "CACHE=results/")
    assert plain.returncode == slashed.returncode == 0
    assert slashed.stdout == plain.stdout and "notebooks/executed/1_to_last_flow.ipynb" in slashed.stdout
    assert '--out-dir "figures"' in slashed.stdout and '--cache-dir "results"' in slashed.stdout
    assert '--out-dir "/"' in make("-n", "reproduce", "OUT=/").stdout  # kept, so that it is refused


def test_make_hands_engine_to_the_notebooks_and_the_sweep():
    """ENGINE=naive reaches every notebook run and the sweep (the families whose fast engine refuses need it)."""
    assert '--engine "naive"' in make("-n", "reproduce", "ENGINE=naive").stdout
    assert '--engine "naive"' in make("-n", "sweep", "ENGINE=naive").stdout


@pytest.mark.parametrize(
    "folder, message",
    [
        ("/", "system folder"),
        ("/etc", "system folder"),
        ("/usr/local/figures", "system folder"),
        ("/proc/self", "system folder"),
        ("/tmp", "system folder"),
        ("~", "home folder|system folder"),  # /root for root
        (str(ROOT), "project root"),
        ("", "empty"),
        (" ", "empty"),
    ],
)
def test_an_output_folder_is_never_a_system_folder(folder, message):
    with pytest.raises(MmflowError, match=message) as err:
        check_output_folder(folder, "OUT")
    assert str(err.value).startswith("OUT")


def test_an_output_folder_of_ones_own_passes_and_a_file_does_not(tmp_path):
    assert check_output_folder(tmp_path / "new" / "deeper", "OUT", owned=True) == (tmp_path / "new" / "deeper")
    assert check_output_folder(f"{tmp_path}/", "CACHE") == tmp_path and check_output_folder(None, "OUT") is None
    assert check_output_folder(ROOT / "figures", "OUT", owned=True) == ROOT / "figures"
    (tmp_path / "file").write_text("x")
    with pytest.raises(MmflowError, match="is a file"):
        check_output_folder(tmp_path / "file" / "sub", "OUT")
    if os.geteuid() != 0:  # root may write anywhere
        (tmp_path / "locked").mkdir(mode=0o500)
        with pytest.raises(MmflowError, match="not writable"):
            check_output_folder(tmp_path / "locked" / "out", "OUT")


def test_run_parameters_are_checked_by_the_librarys_own_checkers(monkeypatch):
    check_run_params("shapes-llava", "cpu", "bfloat16", "paper", "all", "3", "figures", "results")
    check_run_params()  # every default
    if not torch.backends.mps.is_available():
        with pytest.raises(MmflowError, match=r"^DEVICE='mps'.*not available"):
            check_run_params(device="mps")
    with pytest.raises(MmflowError, match=r"^N='few'"):
        check_run_params(n="few")
    with pytest.raises(MmflowError, match=r"^DEVICE='gpu'.*torch device"):
        check_run_params(device="gpu")
    monkeypatch.setenv(mmflow.cache.TOKEN_BUDGET_ENV, "many")
    with pytest.raises(MmflowError, match=r"^TOKEN_BUDGET='many'"):
        check_run_params()


def test_the_parameter_checks_load_no_torch_and_name_every_engine():
    """Every make reproduce notebook process checks its parameters first (mmflow.execute): on the CPU that imports
    neither torch nor pandas (seconds per process), and refuses a bad value all the same; the engine names the
    checks accept are the engines there are."""
    from mmflow.engines import ENGINES
    from mmflow.params import ENGINE_NAMES

    assert tuple(ENGINES) == ENGINE_NAMES
    code = (
        "import sys, mmflow.execute as ex; from mmflow.params import check_run_params as c\n"
        "c('shapes-llava', 'cpu', 'float16', 'paper', 'all', '3', 'figures', 'results', 'naive')\n"
        "for bad in ({'engine': 'turbo'}, {'dtype': 'float8'}, {'keep': 'some'}, {'inputs': 'bogus'}):\n"
        "    try:\n        c(**bad)\n    except ex.MmflowError as err:\n        print(str(err).split('=')[0])\n"
        "print(sorted(m for m in ('torch', 'pandas', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["ENGINE", "DTYPE", "KEEP", "INPUTS", "[]"]


def test_load_model_names_an_unavailable_device():
    """It ended in torch's 'AssertionError: Torch not compiled with CUDA enabled', naming no parameter."""
    import mmflow_utils as mu

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(MmflowError, match="device 'cuda:0' is not available"):
        mu.load_model("shapes-llava", device="cuda:0")


def _executed_parameters(cache: str, tmp_path: Path) -> tuple[dict, str | None]:
    import papermill as pm

    source = ROOT / "notebooks" / "1_to_last_flow.ipynb"
    declared = pm.inspect_notebook(str(source))
    args = Namespace(source=source, executed=EXECUTED / source.name, model="shapes-llava", data="shapes",
                     images="", device="cpu", dtype="float32", out_dir="figures", cache_dir=cache, engine=None,
                     inputs="", keep="", n_per_task="")  # fmt: skip
    params = notebook_parameters(args, list(declared), relative_to=EXECUTED)
    return params, record_default_cache(params, declared, source, EXECUTED)


def test_another_cache_does_not_change_what_the_committed_executed_copies_record(tmp_path, monkeypatch):
    """The injected parameters (cell and papermill metadata) recorded CACHE's absolute path; now they record the
    default cache, the kernel gets the real one through MMFLOW_CACHE_DIR."""
    monkeypatch.chdir(ROOT)
    default, none = _executed_parameters("results", tmp_path)
    other, elsewhere = _executed_parameters(str(tmp_path / "cache"), tmp_path)
    assert none is None and default["cache_dir"] == "../../results"
    committed = json.loads((EXECUTED / "1_to_last_flow.ipynb").read_text())["metadata"]["papermill"]["parameters"]
    assert default == committed == other  # the same injected cell, the same metadata
    assert elsewhere == str(tmp_path / "cache")


def test_a_run_with_another_cache_uses_it_and_records_the_default(tmp_path):
    """make reproduce CACHE=elsewhere, on one notebook into a temporary copy: the results land in the cache named
    (the kernel reads it from MMFLOW_CACHE_DIR), the executed copy names the notebook's default cache relative to
    itself and nowhere the cache used."""
    executed, cache = tmp_path / "run" / "4_answer_casing.ipynb", tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "mmflow.execute", str(ROOT / "notebooks" / executed.name), str(executed),
               "--n", "1", "--out-dir", str(tmp_path / "figures"), "--cache-dir", str(cache)]  # fmt: skip
    subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert len(list(cache.rglob("*.json"))) >= 6  # answers and lens rows of 6 examples
    book = json.loads(executed.read_text())
    recorded = os.path.relpath(ROOT / "results", executed.parent)
    injected = next(c for c in book["cells"] if "injected-parameters" in c["metadata"].get("tags", []))
    assert f'cache_dir = "{recorded}"\n' in injected["source"] and str(cache) not in json.dumps(book)
    assert book["metadata"]["papermill"]["parameters"]["cache_dir"] == recorded


def test_make_sweep_runs_in_one_process(tmp_path):
    """NPROC=1 failed at once: Accelerate refuses --multi_gpu with fewer than 2 processes."""
    done = make("sweep", "NPROC=1", "N=1", f"CACHE={tmp_path}", timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "in 1 processes" in done.stdout
    assert len(list(tmp_path.rglob("*.json"))) == 6 * (1 + 4)  # answers + every analysis of 6 examples


def test_killing_the_launcher_stops_its_workers(tmp_path):
    """accelerate launch killed with SIGKILL left its workers running and writing into the cache."""
    import psutil

    command = [str(VENV_BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mmflow.sweep", "--n", "40",
               "--cache-dir", str(tmp_path)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip
    workers: list[psutil.Process] = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(tmp_path.rglob("*.json")):  # the workers are computing
            time.sleep(0.5)
        workers = [p for p in psutil.Process(launcher.pid).children(recursive=True) if "mmflow.sweep" in p.cmdline()]
        assert len(workers) == 2
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        gone, alive = psutil.wait_procs(workers, timeout=10)
        alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, [p.pid for p in alive]
    finally:
        for process in workers:
            if process.is_running():
                process.kill()
        if launcher.poll() is None:
            launcher.kill()


def test_the_cache_reads_only_regular_files_of_bounded_size(tmp_path):
    """A cache file linked to /dev/zero raised MemoryError; one linked to a FIFO hung the run forever."""
    cache = mmflow.cache.ResultCache(tmp_path, "key")
    cache.folder.mkdir()
    digests = ["a" * 40, "b" * 40, "c" * 40]
    cache.path(digests[0]).symlink_to("/dev/zero")
    os.mkfifo(cache.path(digests[1]))
    with cache.path(digests[2]).open("wb") as handle:  # sparse: more than a result can hold
        handle.truncate(mmflow.cache.MAX_RESULT_BYTES + 1)
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("reading a cache file hung"))
    signal.alarm(20)
    try:
        for digest, why in zip(digests, ["not a regular file", "not a regular file", "more than"]):
            with pytest.warns(UserWarning, match=why):
                assert cache.read(digest) is None
            written = cache.write(digest, {"rows": [1]})  # recomputed: the odd file is replaced
            assert cache.read(digest) == written and cache.path(digest).is_file()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_cache_files_are_written_with_the_umask(tmp_path, umask):
    """They were 0600 whatever the umask (tempfile.mkstemp), unreadable by the group sharing a cache."""
    previous = os.umask(umask)
    try:
        cache = mmflow.cache.ResultCache(tmp_path, "key")
        cache.write("d" * 40, {"rows": []})
    finally:
        os.umask(previous)
    assert cache.path("d" * 40).stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_killed_write_leaves_no_temporary_file_for_long(tmp_path):
    """A temporary file older than an hour is a killed write's: the next run removes it, never a fresh one."""
    cache = mmflow.cache.ResultCache(tmp_path, "key")
    cache.folder.mkdir()
    old, fresh = cache.folder / ".aaaaaaaaaaaa-x1.tmp", cache.folder / ".bbbbbbbbbbbb-x2.tmp"
    old.write_text("{"), fresh.write_text("{")
    hours_ago = time.time() - 2 * 3600
    os.utime(old, (hours_ago, hours_ago))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mmflow.cache.run_cached([], lambda e, d: {}, tmp_path, "key") == []
    assert not old.exists() and fresh.exists()


def test_a_killed_make_reproduce_leaves_no_progress_folder(tmp_path):
    """SIGTERM unwinds the run (the folder goes); after SIGKILL the next run removes the folder of the dead pid
    and never one of a live process."""
    import psutil

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "mmflow.execute", str(ROOT / "notebooks" / "4_answer_casing.ipynb"),
               str(tmp_path / "nb.ipynb"), "--out-dir", str(tmp_path / "figures"), "--cache-dir",
               str(tmp_path / "cache")]  # fmt: skip
    tmp = Path(tempfile.gettempdir())
    run = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not psutil.Process(run.pid).children():  # the kernel has started
            time.sleep(0.2)
        kernels = psutil.Process(run.pid).children(recursive=True)
        ours = list(tmp.glob(f"mmflow-progress-{run.pid}-*"))
        assert kernels and ours  # named by the pid, so that a later run can tell whether it is still alive
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=60) != 0
        assert not [folder for folder in ours if folder.exists()]
        _, alive = psutil.wait_procs(kernels, timeout=10)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]  # the kernel stopped too
    finally:
        if run.poll() is None:
            run.kill()
    dead = subprocess.Popen(["true"])
    dead.wait()
    left, live = tmp / f"mmflow-progress-{dead.pid}-killed", tmp / f"mmflow-progress-{os.getpid()}-live"
    left.mkdir(), live.mkdir()
    try:
        assert left in remove_stale_progress()
        assert not left.exists() and live.exists()
    finally:
        live.rmdir()


def test_notebooks_side_by_side_share_the_cores_and_label_their_progress(tmp_path, monkeypatch, capsys):
    """make reproduce JOBS=2: each kernel gets half the cores (unless the user set a thread count), and every
    progress update is a whole line naming its notebook (two bars would overwrite each other with carriage returns)."""
    from mmflow.cache import PROGRESS_ENV
    from mmflow.execute import kernel_threads, parallel_jobs, terminal_progress

    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MMFLOW_JOBS", "2")
    assert parallel_jobs() == 2 and kernel_threads(2, cpus=2) == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    assert kernel_threads(3, cpus=16)["OMP_NUM_THREADS"] == "5" and kernel_threads(1, cpus=16) == {}
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert kernel_threads(2, cpus=2) == {}  # the user's setting wins
    monkeypatch.setenv("MMFLOW_JOBS", "two")
    assert parallel_jobs() == 1
    with terminal_progress(interval=0.05, label="1_to_last_flow"), open(os.environ[PROGRESS_ENV], "a") as bar:
        bar.write("\rknockout:  10%|#  | 24/240\rknockout:  20%|## | 48/240")
        bar.flush()
        time.sleep(0.3)
        bar.write("\rknockout: 100%|###| 240/240\nshapes-llava: model forwards: 720\n")
    err = capsys.readouterr().err
    assert "\r" not in err
    assert [line for line in err.splitlines() if line] == [
        "[1_to_last_flow] knockout:  10%|#  | 24/240",
        "[1_to_last_flow] knockout:  20%|## | 48/240",
        "[1_to_last_flow] knockout: 100%|###| 240/240",
        "[1_to_last_flow] shapes-llava: model forwards: 720",
    ]


def _record_many(out_dir: str, start: int) -> None:
    from mmflow.figures import record_provenance

    for i in range(start, start + 25):
        record_provenance(out_dir, f"fig{i}", model="m", n=i)


def test_manifest_keeps_every_entry_when_notebooks_write_it_side_by_side(tmp_path):
    """Four processes add 25 figures each to one manifest at once: none is lost (the manifest is read, changed and
    replaced under a lock on the folder), and no lock file is left in the figures folder."""
    import multiprocessing

    from mmflow.figures import read_manifest

    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_record_many, args=(str(tmp_path), 25 * k)) for k in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [worker.exitcode for worker in workers] == [0, 0, 0, 0]
    manifest = read_manifest(tmp_path)
    assert sorted(manifest) == sorted(f"fig{i}" for i in range(100))
    assert manifest["fig42"] == {"model": "m", "n": 42}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_the_kernel_imports_this_checkout_first(monkeypatch):
    """A venv shared by two clones has its editable install point at one of them; the notebooks' kernels must run
    the checkout make runs in (seen: a kernel loaded another clone's older shapes-qwen, silently)."""
    from mmflow.execute import kernel_pythonpath

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["/elsewhere", str(ROOT), "/other"]))
    assert kernel_pythonpath().split(os.pathsep) == [str(ROOT), "/elsewhere", "/other"]
    monkeypatch.delenv("PYTHONPATH")
    assert kernel_pythonpath() == str(ROOT)
    done = subprocess.run(
        [sys.executable, "-c", "import mmflow; print(mmflow.__file__)"],
        env={**os.environ, "PYTHONPATH": kernel_pythonpath()}, cwd="/", capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert done.stdout.strip() == str(ROOT / "mmflow" / "__init__.py")


def test_warm_computes_exactly_the_models_notebook_6_gets_besides_model():
    """mmflow.warm and the notebook take their list from one rule (mmflow.execute.compared_models)."""
    from mmflow.warm import across_models

    source = ROOT / "notebooks" / "6_across_models.ipynb"
    assert across_models(source, "shapes-llava", "") == ["shapes-llava", "shapes-qwen"]  # the notebook's default
    assert across_models(source, "my/llava", " ") == ["my/llava"]
    assert across_models(source, "shapes-llava", "a/b ./c") == ["a/b", "./c"]
