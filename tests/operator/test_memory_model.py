"""The memory model's model-state terms against DeepSpeed's own estimators, and its directions.

Real: DeepSpeed's `estimate_zero2_model_states_mem_needs` and
`estimate_zero3_model_states_mem_needs` (the functions behind its `…_all_cold` helpers) and
kubetrain_contract.memory. Emulated: nothing;
no tensor is built (tests/trainer/test_memory_measured.py measures tensors). The shapes are
Llama-3.1-8B and Llama-3.2-1B from their published config.json numbers.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from bench.memory_probe import LLAMA_1B, LLAMA_8B, PUBLISHED_PARAMETERS, model_states, setup
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from kubetrain_contract.memory import GIB, ModelShape, Setup, estimate, refusal

SHAPES = pytest.mark.parametrize("shape", [LLAMA_8B, LLAMA_1B], ids=["8b", "1b"])
WORLDS = pytest.mark.parametrize("world", [1, 2, 8])
OFFLOAD = pytest.mark.parametrize("offload", [False, True], ids=["on-gpu", "offload"])


def _zero(shape: ModelShape, stage: int, world: int, offload: bool) -> Setup:
    """A bf16 AdamW full fine-tune on `world` GPUs of one node: what the estimators assume."""
    return setup(zero_stage=stage, world_size=world, procs_per_node=world, offload=offload)


@SHAPES
def test_parameters_are_the_published_counts(shape: ModelShape) -> None:
    assert shape.parameters == PUBLISHED_PARAMETERS[shape]


@SHAPES
@WORLDS
@OFFLOAD
def test_zero2_model_states_equal_deepspeeds_estimate(
    shape: ModelShape, world: int, offload: bool
) -> None:
    """2 bytes of 16-bit weights whole, 2 + 4 + 4 + 8 bytes of 16-bit and fp32 gradients, fp32
    master and Adam state partitioned; offloaded, only the 16-bit weights stay. Exact but for
    integer division of each partition (a byte per term)."""
    _, deepspeed_gpu = estimate_zero2_model_states_mem_needs(
        shape.parameters, num_gpus_per_node=world, num_nodes=1, cpu_offload=offload
    )
    ours = model_states(shape, _zero(shape, 2, world, offload))
    assert abs(ours - deepspeed_gpu) <= 4


@SHAPES
@WORLDS
@OFFLOAD
def test_zero3_model_states_are_deepspeeds_plus_the_16bit_partition(
    shape: ModelShape, world: int, offload: bool
) -> None:
    """DeepSpeed's ZeRO-3 estimator counts 18 bytes per parameter partitioned (16-bit and fp32
    gradients, fp32 master, Adam's two moments) plus the largest layer gathered, and leaves out
    the 16-bit parameter partition every rank holds between gathers (`param.ds_tensor`, 2 bytes
    per parameter / world): that partition is real device memory when parameters are not
    offloaded, so our model counts it, and the difference is exactly 2P / world. Offloaded
    (`offload_param` with `offload_optimizer`, as `distributed.offload: cpu` plans it), only the
    gathered layer stays and the two agree."""
    _, deepspeed_gpu, gathered = estimate_zero3_model_states_mem_needs(
        shape.parameters,
        shape.largest_layer_parameters,
        num_gpus_per_node=world,
        num_nodes=1,
        cpu_offload=offload,
        cpu_offload_params=offload,
    )
    s = _zero(shape, 3, world, offload)
    assert estimate(shape, s).term("ZeRO-3 gathered layer") == gathered
    partition16 = 0 if offload else 2 * shape.parameters // world
    assert abs(model_states(shape, s) - deepspeed_gpu - partition16) <= 4


def test_the_largest_gathered_module_is_the_8b_embedding() -> None:
    """DeepSpeed's largest layer is its largest module (for Llama-3.1-8B the 128256 × 4096
    embedding, larger than a whole decoder layer's linears): the model picks the same one."""
    assert LLAMA_8B.largest_layer_parameters == 128256 * 4096
    assert LLAMA_8B.layer_linear_parameters < LLAMA_8B.embedding_parameters


# ----------------------------------------------------------------------------- directions


@SHAPES
@pytest.mark.parametrize("adapter", ["none", "lora"])
@OFFLOAD
def test_more_gpus_never_more_memory_per_gpu_under_zero3(
    shape: ModelShape, adapter: str, offload: bool
) -> None:
    """What the allocator hands out never grows with the world; the total may grow once, from
    one process to two, by NCCL's buffers (a cost of having peers at all), and never after."""
    worlds = (1, 2, 4, 8, 16, 64)
    runs = [estimate(shape, replace(_zero(shape, 3, n, offload), adapter=adapter)) for n in worlds]
    allocated = [e.allocated for e in runs]
    assert allocated == sorted(allocated, reverse=True)
    totals = [e.total for e in runs[1:]]
    assert totals == sorted(totals, reverse=True)
    if adapter == "none" and not offload:
        assert allocated[-1] < allocated[0] / 4  # and the partitioned states do shrink


@SHAPES
@pytest.mark.parametrize("adapter", ["none", "lora", "qlora"])
def test_gradient_checkpointing_reduces_activations(shape: ModelShape, adapter: str) -> None:
    def activations(gc: bool) -> int:
        e = estimate(shape, setup(adapter=adapter, gradient_checkpointing=gc, block_size=4096))
        return e.term("activations") + e.term("recomputed layer")

    assert activations(True) * 4 < activations(False)


@SHAPES
def test_precomputed_reference_is_smaller_than_a_reference_model(shape: ModelShape) -> None:
    dpo = setup(method="dpo", reference="model", zero_stage=3, world_size=8, procs_per_node=8)
    with_model = estimate(shape, dpo)
    precomputed = estimate(shape, replace(dpo, reference="precomputed"))
    assert with_model.term("reference model") > 0 == precomputed.term("reference model")
    assert precomputed.total < with_model.total


@SHAPES
@pytest.mark.parametrize("adapter", ["none", "lora"])
def test_an_8bit_optimizer_is_smaller_than_adamw(shape: ModelShape, adapter: str) -> None:
    adamw = estimate(shape, setup(adapter=adapter))
    eight = estimate(shape, setup(adapter=adapter, optimizer="paged_adamw_8bit"))
    # adamw_torch keeps its moments in the weights' dtype: 4 bytes per bf16 weight, 8 per fp32
    # adapter weight; bitsandbytes' 8-bit: about 2.
    assert eight.term("optimizer state") * 1.9 < adamw.term("optimizer state")
    assert eight.total < adamw.total


@SHAPES
@pytest.mark.parametrize("block", [4096, 8192])
def test_eager_attention_costs_more_than_sdpa_at_long_blocks(shape: ModelShape, block: int) -> None:
    """Eager attention keeps heads × block² scores per layer (checkpointed: the recomputed
    layer's). LoRA, where activations make the peak: a full fine-tune's peak under adamw_torch
    can be its optimizer step, which attention does not change."""

    def gap(block: int, gc: bool) -> int:
        s = setup(adapter="lora", block_size=block, gradient_checkpointing=gc)
        return estimate(shape, replace(s, attention="eager")).total - estimate(shape, s).total

    for gc in (True, False):
        assert gap(block, gc) > 0
        assert gap(2 * block, gc) > 3 * gap(block, gc)  # quadratic in the block


# ------------------------------------------------------------------------------- refusals

CAPACITY = 80 * GIB
REFUSALS = {
    # 8B full fine-tune on one GPU, fp32 weights: 4 + 4 + 8 bytes per parameter.
    "8b fp32 weights": (
        setup(weight_precision="fp32"),
        "spec.training.weightPrecision: bf16",
        {"weight_precision": "bf16"},
    ),
    # 8B full DPO on one GPU under ZeRO-3 (examples/tulu-dpo.yaml's old first rung).
    "8b dpo zero3 on 1 gpu": (
        setup(method="dpo", reference="model", zero_stage=3),
        "spec.distributed.offload: cpu with spec.distributed.zeroStage: 3",
        {"offload": True},
    ),
    # 8B DPO on 8 GPUs under ZeRO-2 on 48 GiB cards: the whole reference copy per GPU.
    "8b dpo zero2 on 8 gpus": (
        setup(method="dpo", reference="model", zero_stage=2, world_size=8, procs_per_node=8),
        "spec.method.dpo.precomputeReferenceLogProbs: true",
        {"reference": "precomputed"},
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_refusal_names_the_path_the_largest_terms_and_a_fix_that_fits(case: str) -> None:
    s, fix, changes = REFUSALS[case]
    capacity = 48 * GIB if "8 gpus" in case else CAPACITY
    e = estimate(LLAMA_8B, s)
    assert e.total > capacity
    message = refusal(e, LLAMA_8B, capacity, "resources.gpuMemory=80Gi")
    assert message.startswith(f"{s.stage} on {s.world_size} process(es) needs about")
    assert "resources.gpuMemory=80Gi" in message
    largest = message.split("largest: ")[1].split(" — ")[0]
    assert [part.rsplit(" ", 2)[0] for part in largest.split(", ")] == [t.name for t in e.largest()]
    assert fix in message.split("fits with: ")[1]
    # Re-estimated here, not taken from the message: the named fix does fit.
    assert estimate(LLAMA_8B, replace(s, **changes)).total <= capacity


def test_a_combined_fix_names_each_field_once() -> None:
    """Halving the micro-batch twice is one change to microBatchSize, said once."""
    s = setup(weight_precision="fp32", gradient_checkpointing=False, micro_batch_size=4)
    message = refusal(estimate(LLAMA_8B, s), LLAMA_8B, CAPACITY, "test")
    way = message.split("fits with: ")[1]
    assert way.count("spec.training.microBatchSize") == 1, way
    assert "spec.training.microBatchSize: 1" in way


def test_no_fix_is_offered_when_none_fits() -> None:
    """An 8B full fine-tune on a 16 GiB card: no setting of one GPU makes it fit."""
    s = setup(optimizer="adamw_torch")
    message = refusal(estimate(LLAMA_8B, s), LLAMA_8B, 16 * GIB, "test")
    assert "no single setting makes it fit" in message
