"""Data-parallel training (issue 8, "training at scale"): several processes on the CPU (gloo) train like one process
with the same global batch, stop together, resume with another number of processes, and stream the cases.

The multi-process runs:

* one torchrun launch of two processes (``torchrun_session``) running this file (``--worker``): first the checks of
  the loss and gradient of the global batch, the collectives, and the trainer's batch shares, cancel, early
  stopping, validation split and resume (reports as JSON), then ``napari-mamba-seg train`` through ``cli.main``,
  compared with the same command in one process;
* slow: ``torchrun -m napari_mamba_seg.cli train`` interrupted by SIGINT (Ctrl-C) and resumed in one process, and an
  indivisible global batch.

Tolerance of the 1- vs 2-process comparisons: the runs do the same float32 operations except for the order of the
sums (each process sums its half of the batch, gloo adds the halves; one process sums all at once), about one
float32 rounding (6e-8 relative) per sum. Measured, after 24 AdamW steps: at most 2.2e-6 of a tensor's largest
value on any weight or Adam moment. ``RTOL`` = 1e-4 leaves a margin of 45 for other CPUs and BLAS builds; the
training moved every weight tensor by more than 10 ``RTOL`` (asserted, 3e-3 to 7e-3 measured), so wrong batch shares
or a missing gradient sync cannot pass (the loss of the global batch is checked at the gradient level, to 1e-6).

The model is test_unet with LeakyReLU slope 1 (``_smooth_unet``): with a kink (slope 0.01), a pre-activation within
~1e-8 of 0 (measured: 4e-9 in one step) lets a rounding difference flip the slope at that voxel and change the step's
gradient by 1e-4 (3e-3 of its scale; measured, the same when both gradients are computed in one process at the two
weight sets). That is a property of ReLU-type training, not of data parallelism, and no tolerance tied to float32
rounding covers it; a loss that is differentiable everywhere keeps the comparison tight.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[2]
CASES = tuple(f"BR_{number:03d}" for number in range(1, 7))
STEPS = 24
RTOL = 1e-4
RESUME_CONFIG = {"steps": 6, "checkpoint_every": 1}  # the worker runs that are resumed
TRAIN = [
    "--patch-size",
    "16",
    "16",
    "--device",
    "cpu",
    "--steps",
    str(STEPS),
    "--batch-size",
    "4",
    "--val-cases",
    "BR_001",
    "BR_002",
    "--val-every",
    "12",
    "--checkpoint-every",
    "4",
    "--seed",
    "3",
    "--quiet",
]


# -------------------------------------------------------------------------------------------------- data and runs


def _write_dataset(root: Path) -> Path:
    """Dataset042_Squares: 6 cases, a bright square of a different size in each = label 1."""
    from squares_dataset import write_squares_dataset  # here: torchrun runs this module without tests/ on the path

    return write_squares_dataset(root, {case: (3 + n, 5 + 2 * (n % 4)) for n, case in enumerate(CASES)})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_dataset(tmp_path_factory.mktemp("data"))


def _smooth_unet(num_classes: int, seed: int):
    """test_unet with LeakyReLU slope 1 (a loss differentiable everywhere; see the module docstring)."""
    from napari_mamba_seg.models import create_model

    torch.manual_seed(seed)
    return create_model("test_unet", in_channels=1, num_classes=num_classes, negative_slope=1.0)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model every CLI run starts from (``--from-bundle``)."""
    from napari_mamba_seg.bundles import ModelCard, save_bundle

    folder = tmp_path_factory.mktemp("bundle") / "smooth_unet"
    card = ModelCard(class_names=["background", "lesion"], channel_names=["T1"], normalization={"method": "zscore"})
    save_bundle(_smooth_unet(2, seed=3), folder, card)
    return folder


def _train_args(dataset: Path, output: Path, bundle: Path) -> list[str]:
    return [str(dataset), "-o", str(output), "--from-bundle", str(bundle), *TRAIN]


def _environment() -> dict[str, str]:
    """The environment of a child: one OpenMP thread per process (2 shared cores), no inherited torchrun values."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    return env


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]


def _train_in_this_process(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    """``napari-mamba-seg train ...`` as one process (no torchrun variables); (exit status, stdout)."""
    from napari_mamba_seg import cli

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = cli.main(["train", *argv])
    return status, stdout.getvalue()


@pytest.fixture(scope="module")
def one_process(dataset: Path, bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the run in one process, uninterrupted."""
    output = tmp_path_factory.mktemp("one") / "run"
    with pytest.MonkeyPatch.context() as patch:
        status, _ = _train_in_this_process(_train_args(dataset, output, bundle), patch)
    assert status == 0
    return output


def _relative_differences(a: Path, b: Path, files=("model.safetensors", "trainer_state.safetensors")) -> dict:
    """Tensor name -> max |a - b| / max |b| over the model weights and the optimizer moments of two checkpoints."""
    differences = {}
    for file in files:
        first, second = load_file(a / file), load_file(b / file)
        assert set(first) == set(second), file
        for name, tensor in first.items():
            scale = float(second[name].double().abs().max()) or 1.0
            differences[name] = float((tensor.double() - second[name].double()).abs().max()) / scale
    return differences


def _history(folder: Path) -> list[dict]:
    state = json.loads((folder / "trainer_state.json").read_text())
    return [{k: v for k, v in entry.items() if k != "time"} for entry in state["history"]]


def _assert_same_training(actual: Path, expected: Path, initial: Path) -> float:
    """The two ``last/`` checkpoints hold the same weights, optimizer moments, step and history (within ``RTOL`` of
    each tensor's scale), and training moved every weight tensor from ``initial`` by far more than that; returns the
    largest relative difference."""
    differences = _relative_differences(actual, expected)
    worst = max(differences, key=differences.get)
    assert differences[worst] <= RTOL, f"{worst} differs by {differences[worst]:.3g} of its scale (> {RTOL})"
    moved = _relative_differences(initial, expected, ["model.safetensors"])
    least = min(moved, key=moved.get)
    assert moved[least] > 10 * RTOL, f"training moved {least} by only {moved[least]:.3g}: nothing to compare"
    for got, want in zip(_history(actual), _history(expected), strict=True):
        assert got.keys() == want.keys() and got["step"] == want["step"]
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    return differences[worst]


# ------------------------------------------------------------------------------------------- torchrun, end to end


def test_two_processes_with_torchrun_train_like_one_process_with_the_same_global_batch(
    torchrun_session: dict, bundle: Path, one_process: Path
) -> None:
    run, output = torchrun_session["run"], torchrun_session["output"]
    assert run.returncode == 0, run.stderr[-3000:]
    # process 0 alone prints (the split, the two validations, the outcome), once
    assert run.stdout.count("validation case(s)") == 1 and run.stdout.count("last checkpoint:") == 1
    assert run.stdout.count("step 12: validation mean Dice") == 1 and "Traceback" not in run.stderr
    difference = _assert_same_training(output / "last", one_process / "last", bundle)
    print(f"\nlargest weight or moment difference, 2 vs 1 process(es), {STEPS} steps: {difference:.3g} of its scale")
    # the best bundle (validation split between the processes, metrics gathered) is the same too
    best = json.loads((output / "best" / "card.json").read_text())["metrics"]
    expected = json.loads((one_process / "best" / "card.json").read_text())["metrics"]
    assert best["step"] == expected["step"] and best["mean_dice"] == pytest.approx(expected["mean_dice"], abs=1e-4)
    state = json.loads((output / "last" / "trainer_state.json").read_text())
    assert state["processes"] == 2 and state["config"]["batch_size"] == 4  # the global batch is recorded


@pytest.mark.slow  # two more torchrun launches; fast variants: the worker_reports tests below
def test_ctrl_c_stops_both_processes_and_one_process_resumes_to_the_uninterrupted_result(
    dataset: Path, bundle: Path, one_process: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "cut"
    command = _torchrun("-m", "napari_mamba_seg.cli", "train", *_train_args(dataset, output, bundle))
    launcher = subprocess.Popen(
        command, cwd=REPO_ROOT, env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        state_file = output / "last" / "trainer_state.json"
        deadline = time.monotonic() + 240
        while not state_file.is_file() and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        launcher.send_signal(signal.SIGINT)  # Ctrl-C in the terminal: torchrun passes it on to both processes
        _, stderr = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    step = json.loads(state_file.read_text())["step"]
    assert 1 <= step < STEPS, f"the run was not interrupted before its end (last checkpoint at step {step})"
    # both processes stopped after the same step, by themselves (torchrun did not have to kill one), once reported
    assert stderr.count("interrupted at step") == 1 and f"the last checkpoint is {output / 'last'}" in stderr
    assert "forcefully" not in stderr and "[rank" not in stderr

    status, stdout = _train_in_this_process([str(dataset), "-o", str(output), "--resume", "-q"], monkeypatch)
    assert status == 0 and f"last checkpoint: {output / 'last'} (step {STEPS})" in stdout
    _assert_same_training(output / "last", one_process / "last", bundle)


@pytest.mark.slow
def test_an_indivisible_global_batch_is_refused_in_one_line_by_every_process(
    dataset: Path, bundle: Path, tmp_path: Path
) -> None:
    argv = [*_train_args(dataset, tmp_path / "out", bundle)[:-1], "--batch-size", "3"]
    command = _torchrun("-m", "napari_mamba_seg.cli", "train", *argv)
    run = subprocess.run(
        command, cwd=REPO_ROOT, env=_environment(), capture_output=True, text=True, timeout=300, check=False
    )
    lines = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert run.returncode != 0 and len(lines) == 1, run.stderr[-3000:]
    assert "global batch size 3 is not divisible by the number of processes 2" in lines[0]
    assert "--batch-size 2 or 4" in lines[0]
    assert "exitcode  : 2" in run.stderr  # process 0 gave up with the usage status (torchrun may stop the other)
    assert not (tmp_path / "out" / "last").exists()


# ---------------------------------------------------------------------------------- collectives, in two processes


@pytest.fixture(scope="module")
def torchrun_session(
    dataset: Path, bundle: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> dict:
    """One torchrun launch of two processes running this file (``--worker``; one launch, not two, to save time).

    Each process first runs the checks of :func:`_worker` (a process group of its own, over a file store; a report
    ``rank<N>.json`` each), then ``napari-mamba-seg train`` through ``cli.main``: exactly what ``torchrun -m
    napari_mamba_seg.cli train`` runs, the process group set up from torchrun's variables. The one-process
    reference (``one_process``) trains meanwhile.
    """
    folder = tmp_path_factory.mktemp("workers")
    output = folder / "two"
    command = _torchrun(__file__, "--worker", str(folder), "--", *_train_args(dataset, output, bundle))
    launcher = subprocess.Popen(
        command, cwd=REPO_ROOT, env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        request.getfixturevalue("one_process")
        stdout, stderr = launcher.communicate(timeout=600)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    run = subprocess.CompletedProcess(command, launcher.returncode, stdout, stderr)
    reports = [folder / f"rank{rank}.json" for rank in range(2)]
    return {
        "run": run,
        "output": output,
        "reports": [json.loads(p.read_text()) if p.is_file() else None for p in reports],
    }


@pytest.fixture(scope="module")
def worker_reports(torchrun_session: dict) -> list[dict]:
    """Each rank's report of :func:`_worker`."""
    reports = torchrun_session["reports"]
    assert None not in reports, torchrun_session["run"].stderr[-4000:]
    return reports


@pytest.mark.parametrize("case", ["per_sample_dice", "batch_dice"])
def test_the_loss_and_gradient_are_those_of_the_global_batch(worker_reports: list[dict], case: str) -> None:
    for report in worker_reports:
        result = report["loss"][case]
        assert result["loss"] == pytest.approx(result["reference_loss"], rel=1e-6)
        assert result["gradient_difference"] <= 1e-6 * result["gradient_scale"]
    # without the sums across the processes (each process's own loss, gradients averaged) the gradient is wrong:
    # the trusted-voxel mean of the cross-entropy (and the batch Dice) do not decompose over the processes
    naive = worker_reports[0]["loss"][case]
    assert naive["naive_gradient_difference"] > 1e-3 * naive["gradient_scale"]


def test_every_process_stops_at_the_step_where_any_one_cancelled(worker_reports: list[dict]) -> None:
    for report in worker_reports:
        drawn = report["cancel"].pop("drawn")
        assert report["cancel"] == {"cancelled": True, "step": 3, "last_step": 2, "files": report["rank"] == 0}
        # each process drew its half of the global batches of steps 1-3 (samples 0-11 in batches of 4), no more
        rank = report["rank"]
        assert drawn == [4 * step + 2 * rank + i for step in range(3) for i in range(2)]


def test_a_run_resumes_with_another_number_of_processes_like_an_uninterrupted_run(
    worker_reports: list[dict], tmp_path: Path
) -> None:
    from napari_mamba_seg.bundles import save_bundle
    from napari_mamba_seg.training import Trainer

    save_bundle(_smooth_unet(3, seed=0), tmp_path / "initial")
    straight = _trainer(RESUME_CONFIG, output_dir=tmp_path / "straight").train()
    assert straight.step == RESUME_CONFIG["steps"]
    # 2 processes -> 1: the run the two workers cancelled after step 3 (checkpoint at step 2), resumed here
    folder = Path(worker_reports[0]["folder"])
    resumed = Trainer.resume(folder / "cancel0", _trainer_cases())
    assert resumed.step == 2
    resumed.train()
    _assert_same_training(folder / "cancel0" / "last", tmp_path / "straight" / "last", tmp_path / "initial")
    # 1 process -> 2: rank 0 alone trained 2 steps, both workers resumed to the end
    assert [report["resumed_from_one"] for report in worker_reports] == [RESUME_CONFIG["steps"]] * 2
    _assert_same_training(folder / "one" / "last", tmp_path / "straight" / "last", tmp_path / "initial")


def test_every_process_takes_the_same_early_stopping_decision_on_the_same_metrics(worker_reports: list[dict]) -> None:
    first, second = (report["early_stop"] for report in worker_reports)
    assert first["stopped_early"] and first["step"] == 4 and len(first["validations"]) == 2
    assert first == second  # same metrics (gathered from the split validation), same decision, same weights
    # the metrics gathered from the split validation are those of one process validating every case
    assert first["validations"][-1] == pytest.approx(first["single_process_validation"], rel=1e-12)


def test_collective_helpers(worker_reports: list[dict]) -> None:
    for rank, report in enumerate(worker_reports):
        helpers = report["helpers"]
        assert helpers["mean"] == {"a": 0.5, "b": 11.0} and helpers["max"] == {"a": 1.0, "b": 12.0}
        assert helpers["gathered"] == [["zero", "one", "two", "three"], True]
        assert helpers["main_first_saw_rank0_marker"] is True
        assert helpers["any"] == [True, False]
        expected = "process 1 of 2 failed: ValueError: no data on 1" if rank == 0 else "ValueError: no data on 1"
        assert helpers["failure_on_1"] == expected
        assert helpers["indivisible"].startswith("ValueError: the global batch size 3 is not divisible")


def _worker(folder: Path, train_args: list[str]) -> int:
    """One rank of :func:`torchrun_session`: runs the checks, writes ``rank<N>.json``, then trains with the CLI."""
    from napari_mamba_seg import cli
    from napari_mamba_seg.training import distributed

    torch.set_num_threads(1)
    context = distributed.init_distributed("cpu", init_method=f"file://{folder / 'store'}")
    assert context is not None and context.backend == "gloo"
    try:
        report = {"rank": context.rank, "folder": str(folder), "loss": _loss_checks(context)}
        report["helpers"] = _helper_checks(context, folder)
        report["cancel"] = _cancel_check(context, folder)
        report["resumed_from_one"] = _resume_from_one_process(context, folder)
        report["early_stop"] = _early_stop_check()
    finally:
        distributed.shutdown_distributed()
    (folder / f"rank{context.rank}.json").write_text(json.dumps(report))
    return cli.main(["train", *train_args])  # a process group of its own again, from torchrun's variables


def _loss_checks(context) -> dict:
    from napari_mamba_seg.training import DiceCELoss, distributed

    generator = torch.Generator().manual_seed(5)  # the same global batch on every rank
    image = torch.randn(4, 1, 10, 10, generator=generator)
    labels = torch.randint(0, 3, (4, 10, 10), generator=generator)
    # rank 0's half is mostly trusted, rank 1's mostly not: a mean over the trusted voxels does not decompose
    trusted = torch.rand(4, 10, 10, generator=generator) < torch.tensor([0.95, 0.9, 0.15, 0.05])[:, None, None]
    weight = torch.rand(4, 10, 10, generator=generator) + 0.5
    share = distributed.rank_slice(4, context.rank, context.world_size)
    results = {}
    for case, batch_dice in (("per_sample_dice", False), ("batch_dice", True)):
        torch.manual_seed(0)
        reference = torch.nn.Conv2d(1, 3, 3, padding=1)
        loss_fn = DiceCELoss(batch_dice=batch_dice)
        reference_loss = loss_fn(reference(image), labels, trusted, weight)
        reference_loss.backward()
        expected = torch.cat([p.grad.flatten() for p in reference.parameters()])
        gradients = {}
        for name, hook in (("global", distributed.global_sum), ("naive", None)):
            torch.manual_seed(0)
            model = distributed.wrap_model(torch.nn.Conv2d(1, 3, 3, padding=1), context)
            local_fn = DiceCELoss(batch_dice=batch_dice, sum_across_processes=hook)
            loss = local_fn(model(image[share]), labels[share], trusted[share], weight[share])
            loss.backward()  # DDP averages the gradients over the ranks
            gradients[name] = (float(loss), torch.cat([p.grad.flatten() for p in model.parameters()]))
        results[case] = {
            "loss": gradients["global"][0],
            "reference_loss": float(reference_loss),
            "gradient_difference": float((gradients["global"][1] - expected).abs().max()),
            "naive_gradient_difference": float((gradients["naive"][1] - expected).abs().max()),
            "gradient_scale": float(expected.abs().max()),
        }
    return results


def _helper_checks(context, folder: Path) -> dict:
    from napari_mamba_seg.training import distributed

    helpers = {
        "mean": distributed.all_reduce_metrics({"a": float(context.rank), "b": 10.0 + 2 * context.rank}),
        "max": distributed.all_reduce_metrics({"a": float(context.rank), "b": 10.0 + 2 * context.rank}, "max"),
        "any": [distributed.any_process(context.rank == 1), distributed.any_process(False)],
    }
    names = ["zero", "one", "two", "three"]
    mine = [(i, names[i]) for i in distributed.split_indices(len(names))]
    helpers["gathered"] = list(distributed.gather_indexed(mine, cancelled=context.rank == 1))
    marker = folder / "rank0_was_here"

    def build() -> bool:
        if context.is_main:
            time.sleep(0.3)  # rank 1 would see no marker if it did not wait
            marker.write_text("x")
        return marker.is_file()

    helpers["main_first_saw_rank0_marker"] = distributed.run_main_first(build)

    def fail_on_1() -> None:
        if context.rank == 1:
            raise ValueError("no data on 1")

    try:
        distributed.run_main_first(fail_on_1)
    except (ValueError, distributed.OtherProcessFailed) as error:
        helpers["failure_on_1"] = f"ValueError: {error}" if isinstance(error, ValueError) else str(error)
    helpers["indivisible"] = _trainer_error(batch_size=3)
    return helpers


def _trainer(config_changes: dict, *, output_dir: Path | None = None, validate: bool = False):
    from training_cases import cpu_config, synthetic_case

    from napari_mamba_seg.bundles import ModelCard
    from napari_mamba_seg.training import Trainer

    model = _smooth_unet(3, seed=0)
    val = [synthetic_case(f"val{i}", seed=10 + i) for i in range(3)] if validate else None
    card = ModelCard(class_names=["background", "breast", "lesion"], normalization={"method": "zscore"})
    config = cpu_config(**{"batch_size": 4, **config_changes})
    return Trainer(model, card, _trainer_cases(), val, config, output_dir)


def _trainer_cases() -> list:
    from training_cases import synthetic_case

    return [synthetic_case(f"case{i}", seed=i) for i in range(2)]


def _trainer_error(**config_changes) -> str:
    try:
        _trainer(config_changes)
    except ValueError as error:
        return f"ValueError: {error}"
    return "no error"


def _cancel_check(context, folder: Path) -> dict:
    """Rank 1 alone asks to stop after step 3; both stop there; rank 0 alone wrote ``last`` (step 2)."""
    output = folder / f"cancel{context.rank}"
    trainer = _trainer(RESUME_CONFIG, output_dir=output)
    drawn = []
    trainer.dataset = _RecordingDataset(trainer.dataset, drawn)
    result = trainer.train(cancel=lambda: context.rank == 1 and trainer.step >= 3)
    last_step = None
    if (output / "last").is_dir():
        last_step = json.loads((output / "last" / "trainer_state.json").read_text())["step"]
    gathered = _gather_from_rank0(last_step)
    report = {"cancelled": result.cancelled, "step": result.step, "last_step": gathered, "files": output.is_dir()}
    return report | {"drawn": drawn}


class _RecordingDataset:
    """A data set that records which global samples a trainer draws."""

    def __init__(self, dataset, drawn: list[int]) -> None:
        self.dataset, self.drawn = dataset, drawn

    def __getitem__(self, index: int):
        self.drawn.append(int(index))
        return self.dataset[index]


def _resume_from_one_process(context, folder: Path) -> int:
    """Rank 0 alone trains 2 of 6 steps (a checkpoint), then both ranks resume the run to its end."""
    from napari_mamba_seg.training import Trainer, distributed

    output = folder / "one"
    if context.is_main:
        with _single_process():
            trainer = _trainer(RESUME_CONFIG, output_dir=output)
            trainer.train(cancel=lambda: trainer.step >= 2)
    distributed.gather_objects(None)  # wait for rank 0's checkpoint
    return Trainer.resume(output, _trainer_cases()).train().step


def _gather_from_rank0(value):
    from napari_mamba_seg.training import distributed

    return distributed.gather_objects(value)[0]


def _early_stop_check() -> dict:
    """Validation split over the ranks; no improvement of 2 is possible, so the second validation stops the run."""
    trainer = _trainer(
        {"steps": 8, "val_every": 2, "early_stopping_patience": 1, "early_stopping_min_delta": 2.0}, validate=True
    )
    validations = []
    result = trainer.train(progress=lambda p: validations.append(p.metrics) if p.metrics else None)
    weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    trainer.distributed = None  # the same model validated by this process alone, over every case
    single = trainer.validate()
    return {
        "stopped_early": result.stopped_early,
        "step": result.step,
        "validations": validations,
        "weights_sum": float(weights.double().sum()),
        "single_process_validation": single,
    }


@contextlib.contextmanager
def _single_process():
    from napari_mamba_seg.training import distributed

    active, distributed._ACTIVE = distributed._ACTIVE, None
    try:
        yield
    finally:
        distributed._ACTIVE = active


# ---------------------------------------------------------------------------------- unit checks in this process


def test_the_ranks_draw_disjoint_equal_shares_that_make_up_the_global_batches() -> None:
    from napari_mamba_seg.training.distributed import GlobalBatchSampler, rank_slice

    assert [rank_slice(8, rank, 4) for rank in range(4)] == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    single = list(GlobalBatchSampler(3, 6, 8))
    assert single == [list(range(24, 32)), list(range(32, 40)), list(range(40, 48))]
    shares = [list(GlobalBatchSampler(3, 6, 8, rank, 4)) for rank in range(4)]
    for step, batch in enumerate(single):
        assert [index for rank in range(4) for index in shares[rank][step]] == batch
    assert len(GlobalBatchSampler(3, 6, 8, 1, 4)) == 3
    with pytest.raises(ValueError, match=r"global batch size 6 is not divisible by the number of processes 4"):
        rank_slice(6, 0, 4)


def test_torchrun_variables_are_read_and_bad_ones_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from napari_mamba_seg.training.distributed import init_distributed, is_main_process, launched_world

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert launched_world() == (0, 1, 0)
    assert init_distributed("cpu") is None and is_main_process()  # one process: nothing to set up
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert launched_world() == (2, 4, 0)
    monkeypatch.setenv("RANK", "two")
    with pytest.raises(ValueError, match="RANK='two'"):
        launched_world()
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="RANK=4, WORLD_SIZE=4"):
        launched_world()
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ValueError, match=r"each one uses the GPU cuda:LOCAL_RANK; give --device cuda"):
        init_distributed("cuda:1")


def test_a_streamed_data_set_holds_at_most_cache_size_prepared_cases(dataset: Path) -> None:
    from napari_mamba_seg.training import NnUNetRawDataset, SegmentationDataset
    from napari_mamba_seg.training.dataset import PreparedCase

    cases = NnUNetRawDataset(dataset)
    samples = SegmentationDataset(cases, (16, 16), spatial_dims=2, in_channels=1, num_classes=2, cache_size=2)
    alive: list[weakref.ref] = []
    prepare = samples.prepare

    def tracked(case, *args, **kwargs) -> PreparedCase:
        prepared = prepare(case, *args, **kwargs)
        alive.append(weakref.ref(prepared))
        return prepared

    samples.prepare = tracked
    drawn = {samples[index]["case"] for index in range(60)}
    assert len(drawn) == len(CASES)  # every case was read, ...
    assert len(alive) > len(CASES)  # ... some more than once (dropped from the cache, read again)
    assert sum(ref() is not None for ref in alive) <= 2  # ... and never more than 2 prepared cases are held


def test_the_train_command_streams_with_a_bounded_cache(dataset: Path, bundle: Path, tmp_path: Path) -> None:
    from napari_mamba_seg import _cli_training, cli

    def trainer_for(*options: str):
        args = cli.build_parser().parse_args(["train", *_train_args(dataset, tmp_path / "run", bundle), *options])
        return _cli_training._prepare_trainer(args)

    trainer = trainer_for()
    assert trainer.config.cache_size == _cli_training.DEFAULT_CACHE_CASES == trainer.dataset.cache_size
    assert trainer.dataset._lazy and len(trainer.dataset._cache) == 0  # nothing read up front
    assert trainer_for("--cache-cases", "3", "--overwrite").dataset.cache_size == 3


if __name__ == "__main__" and "--worker" in sys.argv:
    sys.exit(_worker(Path(sys.argv[sys.argv.index("--worker") + 1]), sys.argv[sys.argv.index("--") + 1 :]))
