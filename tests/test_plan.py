"""`llama4-jax plan` compiles a real training step for a TPU slice on this CPU host (libtpu's topology
description) and reports whether it fits; the MoE layer's compiled FLOPs match the analytic count."""

import pathlib

import pytest

pytest.importorskip("libtpu", reason="plans need jax[tpu] (libtpu) to describe TPU slices")

from llama4_jax import cli  # noqa: E402
from llama4_jax.experiment import load_experiment  # noqa: E402
from llama4_jax.plan import moe_layer_flops, parse_topology, topology_devices  # noqa: E402
from llama4_jax.sharding import make_mesh  # noqa: E402

EXPERIMENT = pathlib.Path(__file__).parent.parent / "experiments" / "tiny_plan.py"


def test_topology_names():
    assert parse_topology("v5p-8").libtpu_name == "v5p:2x2x1"
    assert parse_topology("v5p-256").libtpu_name == "v5p:4x4x8" and parse_topology("v5p-256").chips == 128
    assert parse_topology("v5e-16").libtpu_name == "v5e:4x4"
    assert parse_topology("v6e-64").libtpu_name == "v6e:8x8"
    with pytest.raises(ValueError, match="v5p-8"):
        parse_topology("tpu-9000")


def test_plan_cli_fits_on_v5p_8(capsys):
    assert cli.main(["plan", str(EXPERIMENT), "--topology", "v5p-8", "--no-flops"]) == 0
    out = capsys.readouterr().out
    assert "FITS" in out and "expert=2" in out and "optimizer state" in out


def test_plan_cli_reports_no_fit_with_exit_code(capsys):
    # 64 GiB of embedding rows on 4 chips of 95 GB: cannot fit.
    code = cli.main(["plan", str(EXPERIMENT), "--topology", "v5p-8", "--no-flops", "--set", "model=scout"])
    assert code == 1 and "DOES NOT FIT" in capsys.readouterr().out


def test_moe_layer_compiled_flops_match_analytic():
    experiment = load_experiment(EXPERIMENT)
    mesh = make_mesh(experiment.mesh, topology_devices(parse_topology("v5p-8")))
    compiled, analytic = moe_layer_flops(experiment, mesh)
    assert abs(compiled / analytic - 1) < 0.10, (compiled, analytic)


def test_distillation_plan_counts_the_frozen_teacher(capsys):
    """The distillation step compiles for the slice with the teacher's bf16 params sharded over every chip."""
    from llama4_jax.counting import count_params
    from llama4_jax.plan import plan

    experiment = load_experiment(EXPERIMENT.with_name("tiny_distill_plan.py"))
    report = plan(experiment, "v5p-8", count_flops=False)
    teacher = count_params(experiment.distill.teacher).total
    # bf16 weights over 4 chips; the norms (a few KiB) are replicated.
    assert teacher * 2 / 4 <= report.teacher_bytes <= teacher * 2 / 4 * 1.01, (report.teacher_bytes, teacher)
    assert report.fits and report.optimizer_bytes > 0
    assert report.analytic_flops > 0
