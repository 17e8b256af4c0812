"""The memory planner (lmforge.parallel.planner, `lmforge plan`): its parameter counts against the built model,
its per-block activations against the tensors autograd really saves, and its peak against the peak torch's
allocator reaches in real training steps (the measurement of benchmarks/memory_plan.py)."""

from __future__ import annotations

import json

import pytest
import torch
from parallel_helpers import run

from benchmarks.memory_plan import Case, Dist, measure, peak_allocated, predict
from lmforge.config import ModelConfig
from lmforge.models import build_model
from lmforge.parallel.planner import (
    GiB,
    Hardware,
    Layout,
    Workload,
    _loss_bytes,
    count_parameters,
    estimate,
    layer_activations,
    layouts,
    max_batch,
    parse_bytes,
    plan,
    train_command,
)


@pytest.mark.parametrize("name, changes", [("tiny-gpt2", {}), ("tiny-llama", {}), ("tiny-bert", {}),
                                           ("tiny-roberta", {}), ("tiny-gpt2", {"tie_embeddings": False})])
def test_parameter_counts_match_the_built_model(name, changes):
    cfg = ModelConfig.from_name(name, **changes)
    counts = count_parameters(cfg)
    model = build_model(cfg)
    unique = {id(p): p for p in model.parameters()}.values()
    assert counts.total == sum(p.numel() for p in unique)
    assert counts.layer == sum(p.numel() for p in model.layers[0].parameters())
    assert counts.largest == max(p.numel() for p in unique)


def test_bert_presets_have_the_published_sizes():
    # BERT-base 110M and BERT-large 340M (Devlin et al.), less the pooler that masked-LM training leaves out
    assert round(count_parameters(ModelConfig.from_name("bert-base-uncased")).total / 1e6) == 110
    assert round(count_parameters(ModelConfig.from_name("bert-large-uncased")).total / 1e6) == 335


def _saved_bytes(block: torch.nn.Module, x: torch.Tensor, mask, is_causal, rotary, precision: str) -> int:
    """Bytes of the distinct storages one block's forward saves for backward (parameters and the inputs
    shared by every block excluded), counted by autograd's saved-tensor hooks."""
    skip = {p.untyped_storage().data_ptr() for p in block.parameters()}
    skip |= {t.untyped_storage().data_ptr() for t in (mask, *(rotary or ())) if t is not None}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
        block(x, mask, is_causal, rotary)
    return sum(seen.values())


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-bert"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_layer_activations_match_what_autograd_saves(name, precision, one_thread):
    from lmforge.models.blocks import rotary_cos_sin

    cfg = ModelConfig.from_name(name, d_model=64, d_ff=192, n_head=4)
    B, T = 3, 40
    block = build_model(cfg).layers[0].train()
    x = torch.randn(B, T, cfg.d_model, requires_grad=True)
    mask = torch.ones(B, 1, 1, T, dtype=torch.bool) if cfg.arch == "encoder" else None
    rotary = (rotary_cos_sin(torch.arange(T).expand(B, T), cfg.head_dim, cfg.rope_theta, x.dtype)
              if cfg.position == "rotary" else None)
    measured = _saved_bytes(block, x, mask, cfg.arch == "decoder", rotary, precision)
    predicted = sum(layer_activations(cfg, B, T, precision, "cpu", mask=mask is not None).values())
    if precision == "bf16":  # autocast's cast weights, saved by each linear (the planner counts them apart)
        predicted += 2 * count_parameters(cfg).layer_linear
    assert predicted == pytest.approx(measured, rel=0.02)


@pytest.mark.parametrize("case", [
    Case("tiny-gpt2", 4, 64, sizes=(("vocab_size", 2000),)),
    Case("tiny-llama", 8, 64, "bf16", checkpointing=True, sizes=(("n_layer", 4), ("d_model", 64), ("d_ff", 256))),
    Case("tiny-bert", 4, 64, optimizer="sgd", sizes=(("vocab_size", 1000), ("d_ff", 256))),
], ids=lambda c: c.name)
def test_predicted_peak_within_15_percent_of_measured(case, one_thread):
    measured = measure(case)  # torch.profiler's allocation records over two real training steps
    predicted = predict(case).peak
    assert predicted == pytest.approx(measured, rel=0.15), (predicted, measured)


def _bert(precision: str = "fp32") -> Workload:
    return Workload(ModelConfig.from_name("bert-base-uncased"), batch=16, seq=512, precision=precision)


def test_layouts_cover_every_factorization_of_the_devices():
    # GPT-2's vocabulary of 50,257 is padded for tp 2 and 4 (to 50,258 and 50,260 rows)
    gpt = Workload(ModelConfig.from_name("gpt2"), batch=16, seq=512)
    found = layouts(gpt, 4)
    assert {(lay.dp, lay.tp, lay.pp) for lay in found} == {(4, 1, 1), (2, 2, 1), (1, 4, 1), (2, 1, 2), (1, 2, 2),
                                                          (1, 1, 4)}
    assert all(lay.devices == 4 for lay in found)
    assert any(lay.strategy == "fsdp" and lay.tp > 1 for lay in found)  # 2-D FSDP x TP
    assert {lay.schedule for lay in found if lay.pp > 1} == {"gpipe", "1f1b"}
    assert any(lay.pp > 1 and lay.tp > 1 for lay in found)  # PP x TP
    # what lmforge train refuses is not planned: pipelines with FSDP or checkpointing, or of an encoder
    assert not any(lay.pp > 1 and (lay.strategy == "fsdp" or lay.activation_checkpointing) for lay in found)
    assert any(lay.dp > 1 and lay.pp > 1 and lay.tp > 1 for lay in layouts(gpt, 8))  # DP x PP x TP
    found = layouts(_bert(), 4)  # BERT's vocabulary of 30,522 padded to 30,524 rows at tp 4; encoders: no pipelines
    assert {(lay.dp, lay.tp, lay.pp) for lay in found} == {(4, 1, 1), (2, 2, 1), (1, 4, 1)}
    assert all(lay.activation_checkpointing for lay in layouts(_bert(), 4, checkpointing=True))


def test_memory_moves_the_way_each_technique_promises():
    w, hw = _bert(), Hardware()
    single = estimate(w, Layout(), hw)
    ac = estimate(w, Layout(activation_checkpointing=True), hw)
    amp = estimate(_bert("bf16"), Layout(), hw)
    fsdp = estimate(w, Layout(dp=4, strategy="fsdp"), hw)
    allreduce = estimate(w, Layout(dp=4, strategy="allreduce"), hw)
    gpipe = estimate(w, Layout(pp=2, schedule="gpipe", microbatches=8), hw)
    one_f_one_b = estimate(w, Layout(pp=2, schedule="1f1b", microbatches=8), hw)
    assert ac.peak < single.peak and amp.peak < single.peak
    assert fsdp.parameters * 4 == pytest.approx(single.parameters, rel=1e-6)
    assert fsdp.optimizer * 4 == pytest.approx(single.optimizer, rel=1e-6)
    assert allreduce.buffers >= single.parameters  # the DistributedOptimizer's gradient buckets
    assert one_f_one_b.peak < gpipe.peak
    assert ac.step_time > single.step_time  # recomputation costs a forward
    assert gpipe.bubble == pytest.approx(1 / 9)


def test_plan_ranks_fitting_layouts_by_step_time_and_prints_their_command():
    estimates = plan(_bert("bf16"), Hardware(memory=16 * GiB), 4, model="bert-base-uncased")
    fits = [e for e in estimates if e.fits]
    assert fits and estimates[:len(fits)] == fits
    assert [e.step_time for e in fits] == sorted(e.step_time for e in fits)
    assert all(e.peak <= Hardware().usable for e in fits)
    assert fits[0].command.startswith("torchrun --nproc-per-node 4 -m lmforge train --model bert-base-uncased")


def test_train_command_has_the_layout_flags():
    cmd = train_command(_bert("bf16"), Layout(dp=2, pp=2, strategy="fsdp", schedule="gpipe", microbatches=4,
                                              activation_checkpointing=True), "bert-base-uncased", "corpus")
    assert cmd == ("torchrun --nproc-per-node 4 -m lmforge train --model bert-base-uncased --from-scratch --data "
                   "corpus --run-dir runs/planned --block-size 512 --batch-size 8 --precision bf16 --strategy fsdp "
                   "--dp 2 --tp 1 --pp 2 --pp-schedule gpipe --microbatches 4 --activation-checkpointing")
    assert "--strategy allreduce --dp 1 --tp 2 --pp 1" in train_command(_bert(), Layout(tp=2))
    assert train_command(_bert(), Layout(), "m").startswith("lmforge train --model m --data")


@pytest.mark.parametrize("devices", [4, 8])
def test_every_planned_command_passes_lmforge_trains_layout_checks(devices, monkeypatch):
    """What `lmforge plan` lists, `lmforge train` runs: each layout's command passes train's own validation of
    the layout (the checks that refuse pipelines x FSDP, sequence parallelism without tp, ...) at its world
    size; both families, with FSDP x TP, PP x TP and DP x PP x TP among them."""
    import argparse
    import shlex

    from lmforge.cli import COMMANDS, _check_layout

    parser = argparse.ArgumentParser()
    COMMANDS["train"][1](parser)
    gpt = Workload(ModelConfig.from_name("gpt2", vocab_size=50304), batch=64, seq=512)
    found = [(w, lay) for w in (gpt, _bert()) for lay in layouts(w, devices)]
    assert any(lay.strategy == "fsdp" and lay.tp > 1 for _, lay in found)
    assert any(lay.pp > 1 and lay.tp > 1 for _, lay in found)
    monkeypatch.setenv("WORLD_SIZE", str(devices))
    for workload, lay in found:
        args = shlex.split(train_command(workload, lay))
        _check_layout(parser.parse_args(args[args.index("train") + 1:]))


def test_max_batch_is_the_largest_that_fits():
    hw = Hardware(memory=16 * GiB)
    for layout in (Layout(), Layout(dp=4, strategy="fsdp", activation_checkpointing=True)):
        best = max_batch(_bert(), layout, hw)
        assert best > 0
        fits = estimate(Workload(_bert().config, best * layout.dp, 512), layout, hw)
        over = estimate(Workload(_bert().config, (best + 1) * layout.dp, 512), layout, hw)
        assert fits.fits and not over.fits


def test_parse_bytes():
    assert parse_bytes("16GB") == parse_bytes("16 GiB") == 16 * GiB
    assert parse_bytes("512MB") == 512 * 2**20 and parse_bytes("1e9") == 10**9
    for bad in ("", "lots", "-4GB", "16XB"):
        with pytest.raises(ValueError, match="memory size"):
            parse_bytes(bad)


def test_cli_plan_table_json_and_nothing_fits(run_cli):
    code, out, err = run_cli("plan", "--model", "bert-base-uncased", "--batch", "32", "--seq", "512", "--dtype",
                             "bf16", "--devices", "4", "--device-memory", "16GB")
    assert code == 0, err
    assert "best:" in out and "torchrun --nproc-per-node 4 -m lmforge train" in out
    code, out, err = run_cli("plan", "--model", "gpt2", "--batch", "32", "--seq", "512", "--devices", "4", "--json")
    result = json.loads(out)
    assert code == 0 and result["best"]["fits"] and len(result["layouts"]) > 10
    code, out, _ = run_cli("plan", "--model", "gpt2", "--batch", "8", "--seq", "1024", "--device-memory", "1GB")
    assert code == 1 and "none fits" in out
    code, out, _ = run_cli("plan", "--model", "smollm2-135m", "--batch", "4", "--seq", "2048", "--generate",
                           "--dtype", "bf16", "--json")
    kv = json.loads(out)["layouts"][0]["kv_cache"]
    assert code == 0 and kv == 2 * 30 * 4 * 3 * 2048 * 64 * 2  # layers x batch x kv heads x slots x head size



def test_generation_peak_within_15_percent_of_measured(one_thread):
    from benchmarks.memory_plan import peak_allocated
    from lmforge.parallel.planner import generation_plan

    cfg = ModelConfig.from_name("tiny-llama", vocab_size=2000, d_model=128, d_ff=512, max_seq_len=256)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    ids = torch.randint(5, cfg.vocab_size, (4, 120))
    with torch.no_grad():
        measured = sum(p.numel() * 4 for p in model.parameters()) + peak_allocated(
            lambda: model.generate(ids, max_new_tokens=2, do_sample=False))
    predicted = generation_plan(cfg, 4, 122, "fp32", Hardware(device="cpu"), 1)[0].peak
    assert predicted == pytest.approx(measured, rel=0.15), (predicted, measured)


# --- tensor and pipeline parallelism: the terms the measured runs of benchmarks/memory_plan.py corrected -------


def _loss_rank(tokens: int, vocab: int) -> float:
    """The bytes torch's allocator adds during cross-entropy forward + backward on logits (tokens, vocab) that
    already exist: on 2 ranks under loss_parallel (a DTensor sharded over the vocabulary), or in one process."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.parallel import loss_parallel

    import lmforge.parallel as hvd
    from lmforge.parallel.mesh import Layout, sub_mesh

    hvd.init()
    mesh = sub_mesh(Layout.parse(tp=2).build(), "tp")
    local = torch.randn(tokens, vocab // 2, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        with loss_parallel():
            F.cross_entropy(DTensor.from_local(local, mesh, [Shard(1)], run_check=False), targets).backward()

    step()  # the first call allocates the mesh's buffers
    local.grad = None
    peak = peak_allocated(step)
    dist.barrier()
    return peak


def test_loss_bytes_under_loss_parallel_are_what_its_backward_holds(one_thread):
    """torch's loss_parallel backward holds four (N, V / t) float32 tensors at once (log-softmax, the zeros
    with -1 at the targets, exp of the log-softmax, their sum), one more than F.cross_entropy's three: the planner
    counted three under tensor parallelism too, 11% and 13% under the measured tp2 peaks of a GPT-2 and a BERT
    shape whose loss sets the peak."""
    tokens, vocab = 1024, 2000
    cfg = ModelConfig.from_name("tiny-gpt2", vocab_size=vocab)
    for measured in run(_loss_rank, 2, tokens, vocab, timeout=120):
        assert measured == pytest.approx(_loss_bytes(cfg, tokens, 1, tp=2)[1], rel=0.02)
    logits = torch.randn(tokens, vocab, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    measured = peak_allocated(lambda: torch.nn.functional.cross_entropy(logits, targets).backward())
    assert measured == pytest.approx(_loss_bytes(cfg, tokens, 1, tp=1)[1], rel=0.02)


_SMALL = (("n_layer", 4), ("d_model", 128), ("n_head", 4), ("d_ff", 512), ("vocab_size", 2000), ("max_seq_len", 64))
MODEL_PARALLEL_RUNS = [
    Dist("single", Case("tiny-gpt2", 8, 64, sizes=_SMALL), dp=1, pp=2, schedule="gpipe", microbatches=2),
    Dist("single", Case("tiny-gpt2", 8, 64, sizes=_SMALL), dp=1, pp=2, schedule="1f1b", microbatches=8),
    Dist("single", Case("tiny-gpt2", 8, 64, sizes=_SMALL), dp=1, tp=2),
]


def _measure_rank(runs: list[Dist]) -> list[int]:
    return [measure(r.case, run=r) for r in runs]


def test_pipeline_and_tensor_parallel_peaks_match_measured_runs():
    """Two training steps of pp2 (GPipe m2, 1F1B m8) and tp2 on real gloo ranks, the busiest rank against the
    planner. Pipelines within 5% (their peaks measured the same in every run): a stage keeps each micro-batch's
    output (logits on the last stage) from forward to backward and a receive buffer per micro-batch, the step's
    first backward has no gradients yet, and torch's schedule must not keep every micro-batch's logits to the
    next step (`return_outputs=False`; with them benchmarks/memory_plan.py's 1F1B m8 GPT-2 run peaked at 1.44x
    the prediction). Tensor
    parallelism within 15% (gloo's asynchronous all-reduces move its peak by a few percent between runs)."""
    measured = [max(peaks) for peaks in zip(*run(_measure_rank, 2, MODEL_PARALLEL_RUNS, timeout=240),
                                                          strict=True)]
    for r, peak in zip(MODEL_PARALLEL_RUNS, measured, strict=True):
        predicted = predict(r.case, r).peak
        assert predicted == pytest.approx(peak, rel=0.05 if r.pp > 1 else 0.15), (r.name, predicted, peak)


def test_data_parallel_over_tensor_or_pipeline_ranks_keeps_no_gradient_buckets():
    """MeshStrategy (dp x tp) and PipelineStrategy (dp x pp) average gradients over dp with one flat copy after
    the step's last backward, not with the DistributedOptimizer's buckets kept through the step: below that
    moment, dp2 x tp2 of a batch b per replica peaks where tp2 of batch b does (the planner added a bucket copy
    of the gradients: 1.12x the measured dp2 x tp2 peak of a Llama shape)."""
    cfg = ModelConfig.from_name("tiny-llama", n_layer=6, d_model=256, n_head=8, n_kv_head=2, d_ff=1024,
                                vocab_size=512, max_seq_len=256)
    hw = Hardware(device="cpu")
    for extra in (dict(tp=2), dict(pp=2, microbatches=2)):
        alone = estimate(Workload(cfg, 2, 256), Layout(**extra), hw)
        replicated = estimate(Workload(cfg, 4, 256), Layout(dp=2, strategy="allreduce", **extra), hw)
        assert replicated.phase == alone.phase and replicated.peak == alone.peak
        assert replicated.peak > replicated.parameters * 3 + replicated.optimizer  # the copy is not the peak
