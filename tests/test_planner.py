"""The memory planner as a decision table: pure inputs, checked outputs."""

from __future__ import annotations

import pytest

from dataclasses import replace

from zimage.planner import (
    GIB,
    TIME_TIE_SHARE,
    ComponentSizes,
    cast_bytes_per_request,
    PROFILES_FASTEST_FIRST,
    PUBLISHED_CONTROLNET,
    PUBLISHED_CONTROLNET_HINTS,
    PUBLISHED_SIZES,
    DeviceFacts,
    GpuFacts,
    PlanError,
    RequestSize,
    choose_device,
    choose_dtype,
    cpu_has_native_bf16,
    hypothetical_devices,
    plan_memory,
    DEFAULT_THROUGHPUT,
    bytes_moved_per_request,
    predict_peak_bytes,
    predict_seconds,
    safe_dtype_after_nan,
    with_controlnet,
)
from zimage.timing import KNOWN_GPUS, Throughput, find_gpu

LOSSY = ("fp8-storage", "te-fp8-storage")


def lossy_count(plan_or_candidate) -> int:
    return sum(o in LOSSY for o in plan_or_candidate.options)


def gguf(quant: str | None) -> ComponentSizes:
    """The published sizes with the transformer as a GGUF file of ``quant`` (bytes per weight of Q8_0: 34/32, Q4_0:
    18/32, as gguf's GGML_QUANT_SIZES), or as published for None."""
    if quant is None:
        return PUBLISHED_SIZES
    per_32 = {"Q8_0": 34, "Q4_0": 18}[quant]
    stored = PUBLISHED_SIZES.transformer.params * per_32 // 32
    return replace(PUBLISHED_SIZES, transformer=replace(PUBLISHED_SIZES.transformer, stored_bytes=stored))


#: The rates of the H200 the models were calibrated on (its start-up probe, benchmarks/results/...-run3.json).
H200 = Throughput(bf16_tflops=743.0, h2d_gbps=55.27, memory_gbps=4130.8, source="H200 probe", pageable_gbps=1.39)


# Expected choices for the real model (published sizes, 1 GiB reserve, bf16), without and with a GGUF transformer,
# with the default assumed rates: a 70 TFLOP/s card on a 25 GB/s link, where compute dominates. Streaming the
# transformer (group offload, eager: its hooks break compilation) then hides under the compute, and fp8 storage's
# casts cost more than the copies it saves; so 8 and 12 GB cards stream, losslessly. Compilation (on CUDA by default)
# makes the resident placements the fast ones where they fit.
@pytest.mark.parametrize(
    ("vram_gb", "gpus", "side", "quant", "profile", "options", "compiled"),
    [
        (8, 1, 512, None, "group-offload", (), False),
        (8, 1, 1024, None, "group-offload", (), False),
        (8, 1, 2048, None, "group-offload", ("vae-tiling",), False),
        (12, 1, 1024, None, "group-offload", (), False),
        (16, 1, 512, None, "transformer-resident", (), True),
        # The 1024x1024 decode (2.6 GB of activations, measured) tips the resident transformer over 14.5 GiB.
        (16, 1, 1024, None, "transformer-resident", ("vae-tiling",), True),
        (16, 1, 2048, None, "model-offload", (), True),
        (24, 1, 512, None, "full", (), True),
        (24, 1, 1024, None, "full", (), True),
        (24, 1, 2048, None, "full", ("vae-tiling",), True),
        (80, 1, 2048, None, "full", (), True),
        (24, 2, 1024, None, "full", (), True),
        (16, 2, 1024, None, "balanced", (), True),
        (0, 0, 1024, None, "cpu", (), False),
        # A GGUF transformer is the user's choice of file: its quantization is not a lossy option of the planner's;
        # it is never compiled (dequantized in Python at every layer).
        (8, 1, 1024, "Q8_0", "group-offload", (), False),
        (12, 1, 1024, "Q4_0", "transformer-resident", (), False),
        (16, 1, 1024, "Q8_0", "transformer-resident", (), False),
        (24, 1, 1024, "Q4_0", "full", (), False),
    ],
)
def test_decision_table(vram_gb: float, gpus: int, side: int, quant: str | None, profile: str,
                        options: tuple, compiled: bool) -> None:
    plan = plan_memory(hypothetical_devices(vram_gb, gpus), gguf(quant), RequestSize(side, side))
    assert (plan.profile, plan.options, plan.compiled) == (profile, options, compiled), plan.reason
    assert plan.fits
    if profile != "cpu":
        assert plan.predicted_peak_bytes <= plan.budget_bytes
        assert plan.dtype == "bf16" and plan.device == "cuda:0"
        assert plan.predicted_seconds > 0 and plan.candidates


# The same with the H200's measured rates (a fast card on a PCIe 5 link), where copies and casts matter: fp8 storage
# there buys more than 5% where the weights would otherwise stream or not fit, and a GGUF file's dequantization
# (0.97 s per image, measured) makes streaming the bf16 transformer the faster 8 GB placement.
@pytest.mark.parametrize(
    ("vram_gb", "side", "quant", "profile", "options", "compiled"),
    [
        (8, 1024, None, "group-offload", ("fp8-storage", "te-fp8-storage"), False),
        (8, 2048, None, "group-offload", ("vae-tiling",), False),
        (12, 1024, None, "transformer-resident", ("fp8-storage", "te-fp8-storage", "vae-tiling"), False),
        (16, 1024, None, "transformer-resident", ("te-fp8-storage", "vae-tiling"), True),
        (16, 2048, None, "full", ("fp8-storage", "te-fp8-storage", "vae-tiling"), False),
        (24, 1024, None, "full", (), True),
        (8, 1024, "Q4_0", "group-offload", (), False),
        (16, 1024, "Q4_0", "full", ("vae-tiling",), False),
    ],
)
def test_decision_table_at_the_h200_rates(vram_gb: float, side: int, quant: str | None, profile: str, options: tuple,
                                          compiled: bool) -> None:
    plan = plan_memory(hypothetical_devices(vram_gb, throughput=H200, compute_capability=(9, 0)), gguf(quant),
                       RequestSize(side, side))
    assert (plan.profile, plan.options, plan.compiled) == (profile, options, compiled), plan.reason
    assert plan.fits and plan.predicted_peak_bytes <= plan.budget_bytes
    _check_the_lossy_rule(plan)


VRAM_SWEEP_GB = (4, 6, 8, 9, 10, 11, 12, 13, 14, 14.3, 14.6, 15, 16, 18, 20, 22, 24, 32, 48, 80)


@pytest.mark.parametrize("quant", [None, "Q8_0", "Q4_0"])
@pytest.mark.parametrize("side", [512, 1024, 2048])
@pytest.mark.parametrize("num_images", [1, 4])
@pytest.mark.parametrize("card", [None, "RTX 3060 12GB", "RTX 4090 24GB", "H100 80GB"])
def test_more_memory_never_picks_a_slower_placement(quant: str | None, side: int, num_images: int,
                                                     card: str | None) -> None:
    # Monotonic in memory: more memory only adds fitting candidates, so the fastest fitting one never gets slower,
    # and the choice stays within the tie share of it. Without lossy options the choice is the fastest: strictly
    # monotonic. Checked with the default rates and three cards' spec-sheet rates, with and without a GGUF file.
    throughput = find_gpu(card).throughput() if card else None
    for auto_fp8, slack in ((True, 1 + TIME_TIE_SHARE), (False, 1.0)):
        previous = None
        for vram_gb in VRAM_SWEEP_GB:
            plan = plan_memory(hypothetical_devices(vram_gb, throughput=throughput), gguf(quant),
                               RequestSize(side, side, num_images), auto_fp8=auto_fp8)
            if previous is not None and plan.fits and previous.fits:
                assert plan.predicted_seconds <= previous.predicted_seconds * slack + 1e-9, (
                    vram_gb, plan.describe(), previous.describe())
            previous = plan


def test_bigger_requests_never_pick_a_faster_placement() -> None:
    for vram_gb in (8, 12, 16, 24):
        previous = None
        for side in (256, 512, 1024, 1536, 2048):
            plan = plan_memory(hypothetical_devices(vram_gb), PUBLISHED_SIZES, RequestSize(side, side, 2))
            if previous is not None and plan.fits:
                assert plan.predicted_seconds * (1 + TIME_TIE_SHARE) >= previous.predicted_seconds, (vram_gb, side)
            previous = plan


def _check_the_lossy_rule(plan) -> None:
    """The choice is within the tie share of the fastest fitting candidate and, when it is lossy, more than that share
    faster than every lossless candidate that fits."""
    fitting = [c for c in plan.candidates if c.fits]
    if not fitting:
        assert not plan.fits
        return
    fastest = min(c.predicted_seconds for c in fitting)
    assert plan.predicted_seconds <= fastest * (1 + TIME_TIE_SHARE) + 1e-12
    if lossy_count(plan):
        lossless = [c for c in fitting if not c.lossy]
        assert all(plan.predicted_seconds * (1 + TIME_TIE_SHARE) < c.predicted_seconds for c in lossless), plan.reason
        assert "faster than the fastest lossless one" in plan.reason or "nothing lossless fits" in plan.reason


@pytest.mark.parametrize("vram_gb", VRAM_SWEEP_GB)
@pytest.mark.parametrize("card", [None, "RTX 4060 8GB", "RTX 4090 24GB", "H100 80GB"])
@pytest.mark.parametrize("side", [1024, 2048])
def test_the_choice_is_the_fastest_fitting_and_lossy_only_where_it_buys_speed(vram_gb: float, card: str | None,
                                                                               side: int) -> None:
    throughput = find_gpu(card).throughput() if card else None
    _check_the_lossy_rule(plan_memory(hypothetical_devices(vram_gb, throughput=throughput), PUBLISHED_SIZES,
                                      RequestSize(side, side)))


# Rates where lossy placements with one lossy option were only 3-4% ahead of the best lossless one and were chosen
# (a user's sweep: the choice was compared with the fastest candidate only, not with the lossless ones). The rule:
# every lossy option has to make the choice more than 5% faster than every lossless placement that fits.
@pytest.mark.parametrize(("vram_gb", "tflops", "h2d_gbps", "memory_gbps", "side", "profile", "options"), [
    # A lossy te-fp8-storage would be 1.9% faster: not enough.
    (14.5, 5, 3, 5000, 1024, "model-offload", ()),
    # The H100's spec-sheet rates on a 16 GB budget: two lossy options would be 4.9% faster: not enough.
    (16, 692.6, 50.4, 2680, 2048, "group-offload", ()),
    # A slow link: streaming half of the text encoder's bytes buys 5.4%, just enough.
    (14.5, 50, 5, 100, 1024, "group-offload", ("te-fp8-storage",)),
])
def test_a_lossy_option_must_beat_the_lossless_choice_itself(vram_gb: float, tflops: float, h2d_gbps: float,
                                                             memory_gbps: float, side: int, profile: str,
                                                             options: tuple) -> None:
    rates = Throughput(bf16_tflops=tflops, h2d_gbps=h2d_gbps, memory_gbps=memory_gbps, source="test")
    plan = plan_memory(hypothetical_devices(vram_gb, throughput=rates), PUBLISHED_SIZES, RequestSize(side, side))
    assert (plan.profile, plan.options) == (profile, options), plan.reason
    _check_the_lossy_rule(plan)


def test_fp32_never_gets_fp8_storage_and_a_gguf_file_never_gets_it_even_on_the_cpu() -> None:
    for vram_gb in (8, 12, 16, 24):
        plan = plan_memory(hypothetical_devices(vram_gb), PUBLISHED_SIZES, dtype="fp32")
        assert not set(plan.options) & set(LOSSY) and not any(c.lossy for c in plan.candidates), vram_gb
    for devices in (hypothetical_devices(0, cpu_bf16=True), hypothetical_devices(8)):
        with pytest.raises(PlanError, match="fp8-storage cannot be combined with a GGUF transformer"):
            plan_memory(devices, gguf("Q8_0"), forced_options=("fp8-storage",))
    # A GGUF transformer computing in fp32 still pays for its dequantization (4 bytes per weight written).
    q8 = gguf("Q8_0")
    assert (cast_bytes_per_request((), q8, RequestSize(), "fp32")
            == (q8.transformer.stored_bytes + 4 * q8.transformer.params) * 8)


@pytest.mark.parametrize("card", [None, "RTX 4060 Ti 16GB", "RTX 5090 32GB", "A100 80GB"])
@pytest.mark.parametrize("request_size", [RequestSize(), RequestSize(2048, 2048, 2), RequestSize(guidance=True)])
def test_predicted_time_ordering_is_consistent(card: str | None, request_size: RequestSize) -> None:
    throughput = find_gpu(card).throughput() if card else DEFAULT_THROUGHPUT

    def seconds(profile: str, options: tuple = ()) -> float:
        return predict_seconds(profile, options, PUBLISHED_SIZES, request_size, "bf16", throughput)

    # Same compute everywhere; the placements differ in what they copy, and each copy can only add time. Whether
    # model offload (each component once per image, through pageable memory) beats group offload (the transformer
    # at every step, from pinned memory, under the compute) is the host's pageable rate against its link's.
    full, resident, model, group, sequential = (seconds(p) for p in ("full", "transformer-resident", "model-offload",
                                                                     "group-offload", "sequential-offload"))
    assert full <= resident <= group and full < model <= sequential and group < sequential
    assert seconds("balanced") == seconds("full")
    # Storing weights in fp8 halves what offloading moves, but costs casts on the GPU: where the copies hide under
    # the compute, it only costs (on a fast card whose link is the bottleneck, it pays: the H200 table).
    moved = lambda options: bytes_moved_per_request("group-offload", options, PUBLISHED_SIZES, request_size,  # noqa
                                                    "bf16")
    assert moved(("fp8-storage",)) < moved(()) * 0.6
    assert seconds("full", ("fp8-storage",)) > seconds("full")
    h200 = lambda options: predict_seconds("group-offload", options, PUBLISHED_SIZES, request_size, "bf16",  # noqa
                                           H200)
    if request_size == RequestSize():  # at 1024x1024 and one prompt the link is the bottleneck there
        assert h200(("fp8-storage",)) < h200(())
    assert seconds("full", ("vae-tiling",)) == seconds("full")  # tiling is not modelled as a cost
    plan = plan_memory(hypothetical_devices(16, throughput=throughput), PUBLISHED_SIZES, request_size)
    ranked = [c.predicted_seconds for c in plan.candidates]
    assert ranked == sorted(ranked)


def test_casting_costs_follow_the_stored_weights() -> None:
    request = RequestSize()
    tr = PUBLISHED_SIZES.transformer.params
    te_blocks = PUBLISHED_SIZES.text_encoder.params - PUBLISHED_SIZES.text_encoder.non_block_params
    assert cast_bytes_per_request((), PUBLISHED_SIZES, request, "bf16") == 0
    # Layerwise casting: up to bf16 before each forward (1 read + 2 written), back to fp8 after (2 + 1), every step.
    assert cast_bytes_per_request(("fp8-storage",), PUBLISHED_SIZES, request, "bf16") == 6 * tr * 8
    assert cast_bytes_per_request(("te-fp8-storage",), PUBLISHED_SIZES, request, "bf16") == 6 * te_blocks
    assert cast_bytes_per_request(("te-fp8-storage",), PUBLISHED_SIZES, RequestSize(guidance=True),
                                  "bf16") == 12 * te_blocks  # the negative prompt is encoded too
    # GGUF: the quantized bytes read and the bf16 weights written at every step.
    q4 = gguf("Q4_0")
    assert cast_bytes_per_request((), q4, request, "bf16") == (q4.transformer.stored_bytes + 2 * tr) * 8
    slow_memory = replace(DEFAULT_THROUGHPUT, memory_gbps=DEFAULT_THROUGHPUT.memory_gbps / 4)
    for options in (("fp8-storage",), ("te-fp8-storage",)):
        assert (predict_seconds("full", options, PUBLISHED_SIZES, request, "bf16", slow_memory)
                > predict_seconds("full", options, PUBLISHED_SIZES, request, "bf16", DEFAULT_THROUGHPUT))
    assert (predict_seconds("full", (), PUBLISHED_SIZES, request, "bf16", slow_memory)
            == predict_seconds("full", (), PUBLISHED_SIZES, request, "bf16", DEFAULT_THROUGHPUT))


def test_bytes_moved_per_image_by_placement() -> None:
    request = RequestSize()
    te = PUBLISHED_SIZES.text_encoder.params * 2
    tr = PUBLISHED_SIZES.transformer.params * 2
    vae = PUBLISHED_SIZES.vae.params * 2
    assert bytes_moved_per_request("full", (), PUBLISHED_SIZES, request, "bf16") == 0
    assert bytes_moved_per_request("transformer-resident", (), PUBLISHED_SIZES, request, "bf16") == te
    assert bytes_moved_per_request("transformer-resident", (), PUBLISHED_SIZES, RequestSize(guidance=True),
                                   "bf16") == 2 * te  # the prompt and the negative prompt each stream it
    assert bytes_moved_per_request("model-offload", (), PUBLISHED_SIZES, request, "bf16") == te + tr + vae
    assert bytes_moved_per_request("group-offload", (), PUBLISHED_SIZES, request, "bf16") == te + 8 * tr
    plan = plan_memory(hypothetical_devices(12), PUBLISHED_SIZES, RequestSize(num_images=2))
    assert plan.bytes_moved_per_image == bytes_moved_per_request(plan.profile, plan.options, PUBLISHED_SIZES,
                                                                 RequestSize(num_images=2), "bf16") // 2


def test_auto_fp8_off_never_picks_a_lossy_option() -> None:
    for vram_gb in (8, 10, 12, 14, 16, 20, 24):
        plan = plan_memory(hypothetical_devices(vram_gb), PUBLISHED_SIZES, auto_fp8=False)
        assert not set(plan.options) & set(LOSSY), vram_gb
        assert not any(c.lossy for c in plan.candidates)


def test_gpu_table_lookup_and_errors() -> None:
    assert find_gpu("4090").name == "RTX 4090 24GB" and find_gpu("rtx 4060 ti 16gb").pcie_lanes == 8
    assert find_gpu("H100").pcie_gen == 5
    for spec in KNOWN_GPUS:
        assert spec.source and spec.dense_bf16_tflops > 0 and spec.pcie_gen in (3, 4, 5)
        assert "not measured" in spec.throughput().source
    with pytest.raises(ValueError, match="'RTX 9999' is not in the table: use one of RTX 3060 12GB"):
        find_gpu("RTX 9999")
    # Short names the README lists pick their card, not a longer name that contains them; words are whole.
    assert [find_gpu(n).name for n in ("A10", "L4", "4060", "4060 Ti", "4060ti16gb", "A100")] == [
        "A10 24GB", "L4 24GB", "RTX 4060 8GB", "RTX 4060 Ti 16GB", "RTX 4060 Ti 16GB", "A100 80GB"]
    with pytest.raises(ValueError, match="'L40' is not in the table"):
        find_gpu("L40")  # a different card from the L40S
    with pytest.raises(ValueError, match=r"matches several cards: RTX 3060 12GB, RTX 4060 8GB, .*RTX 5090 32GB; give"):
        find_gpu("RTX")


def test_peaks_shrink_down_the_profile_order() -> None:
    request = RequestSize()
    peaks = [predict_peak_bytes(p, (), PUBLISHED_SIZES, request, "bf16", p in ("group-offload", "transformer-resident"))
             for p in PROFILES_FASTEST_FIRST if p != "balanced"]
    assert peaks == sorted(peaks, reverse=True)
    # Weights alone are 20.5 GB in bf16; everything-on-GPU cannot be predicted below that.
    assert peaks[0] > 19 * GIB
    with_fp8 = predict_peak_bytes("model-offload", ("fp8-storage",), PUBLISHED_SIZES, request, "bf16")
    assert with_fp8 < peaks[1] * 0.7
    tiled = predict_peak_bytes("full", ("vae-tiling",), PUBLISHED_SIZES, RequestSize(2048, 2048), "bf16")
    assert tiled < predict_peak_bytes("full", (), PUBLISHED_SIZES, RequestSize(2048, 2048), "bf16")


def test_cfg_doubles_transformer_activations() -> None:
    plain = predict_peak_bytes("model-offload", (), PUBLISHED_SIZES, RequestSize(), "bf16")
    cfg = predict_peak_bytes("model-offload", (), PUBLISHED_SIZES, RequestSize(guidance=True), "bf16")
    assert cfg > plain


def test_nothing_fits_picks_the_leanest_and_warns() -> None:
    plan = plan_memory(hypothetical_devices(1), PUBLISHED_SIZES, RequestSize(2048, 2048, 4))
    assert plan.profile == "sequential-offload" and not plan.fits
    assert any("expect out-of-memory" in w for w in plan.warnings)


def test_reserve_is_respected() -> None:
    roomy = plan_memory(hypothetical_devices(24), PUBLISHED_SIZES, reserve_bytes=1 * GIB)
    cautious = plan_memory(hypothetical_devices(24), PUBLISHED_SIZES, reserve_bytes=6 * GIB)
    assert roomy.profile == "full" and cautious.profile == "transformer-resident"
    assert cautious.budget_bytes == roomy.budget_bytes - 5 * GIB


def test_free_memory_not_total_is_what_counts() -> None:
    busy_card = DeviceFacts(gpus=(GpuFacts(0, "busy 24 GB", 24 * GIB, 9 * GIB, throughput=H200),),
                            ram_total_bytes=64 * GIB, ram_available_bytes=64 * GIB)
    plan = plan_memory(busy_card, PUBLISHED_SIZES)
    assert (plan.profile, plan.options) == ("group-offload", ("fp8-storage", "te-fp8-storage"))
    assert plan_memory(busy_card, PUBLISHED_SIZES, auto_fp8=False).profile == "group-offload"
    assert "8.0 GiB usable" in plan.reason


def test_no_fp8_keeps_weights_lossless() -> None:
    plan = plan_memory(hypothetical_devices(12), PUBLISHED_SIZES, auto_fp8=False)
    assert plan.profile == "group-offload" and "fp8-storage" not in plan.options


def test_explicit_profile_is_honoured_and_forced_options_kept() -> None:
    plan = plan_memory(hypothetical_devices(80), PUBLISHED_SIZES, requested_profile="sequential-offload",
                       forced_options=("attention-slicing",))
    assert plan.profile == "sequential-offload"
    assert "attention-slicing" in plan.options
    assert plan.reason.startswith("sequential-offload was asked for: predicted ")
    # What forcing costs: the reason names auto's pick, and the table weighs it beside the forced placement.
    auto = plan_memory(hypothetical_devices(80), PUBLISHED_SIZES, forced_options=("attention-slicing",))
    assert auto.profile == "full" and auto.predicted_seconds < plan.predicted_seconds
    assert f"auto would pick full + attention-slicing ({auto.predicted_seconds:.2f} s" in plan.reason
    ranked = {(c.profile, c.options): c.predicted_seconds for c in plan.candidates}
    assert ranked[("sequential-offload", plan.options)] == plan.predicted_seconds
    assert ranked[("full", auto.options)] == auto.predicted_seconds
    # Forcing the placement auto picks anyway says nothing more.
    same = plan_memory(hypothetical_devices(80), PUBLISHED_SIZES, requested_profile="full",
                       forced_options=("attention-slicing",))
    assert "auto would pick" not in same.reason and same.predicted_seconds == auto.predicted_seconds


def test_a_forced_profile_that_does_not_fit_says_so_and_names_what_would() -> None:
    plan = plan_memory(hypothetical_devices(12), PUBLISHED_SIZES, requested_profile="full")
    auto = plan_memory(hypothetical_devices(12), PUBLISHED_SIZES)
    assert not plan.fits and plan.predicted_seconds < auto.predicted_seconds  # faster, if only it fitted
    assert "(it does not fit); auto would pick " + auto.describe().split(" on ")[0] + ", which fits" in plan.reason
    # Two 12 GB cards cannot hold the 12.3 GB transformer whole: balanced's peak is the real overflow, not a
    # placeholder, and it is marked as not fitting.
    balanced = plan_memory(hypothetical_devices(12, gpus=2), PUBLISHED_SIZES, requested_profile="balanced")
    assert not balanced.fits and 12 * GIB < balanced.predicted_peak_bytes < 20 * GIB
    assert all(c.predicted_peak_bytes < 64 * GIB for c in balanced.candidates)
    assert balanced.describe() == "balanced, compiled on cuda:0, cuda:1 (bf16)"  # where its components go


@pytest.mark.parametrize("profile", ["model-offload", "group-offload", "sequential-offload", "full", "balanced"])
def test_gpu_profiles_are_refused_without_a_gpu(profile: str) -> None:
    with pytest.raises(PlanError, match="needs a CUDA GPU"):
        plan_memory(hypothetical_devices(0), PUBLISHED_SIZES, requested_profile=profile)


def test_balanced_needs_two_gpus_and_missing_device_is_named() -> None:
    with pytest.raises(PlanError, match="has 1"):
        plan_memory(hypothetical_devices(24), PUBLISHED_SIZES, requested_profile="balanced")
    with pytest.raises(PlanError, match="device='cuda:3' was asked for but this machine has cuda:0"):
        plan_memory(hypothetical_devices(24), PUBLISHED_SIZES, device="cuda:3")


def test_dtype_choice() -> None:
    ampere = hypothetical_devices(24)
    turing = DeviceFacts(gpus=(GpuFacts(0, "T4", 16 * GIB, 15 * GIB, supports_bf16=False),), ram_total_bytes=0,
                         ram_available_bytes=0)
    assert choose_dtype("auto", "cuda:0", ampere) == "bf16"
    assert choose_dtype("auto", "cuda:0", turing) == "fp16"
    assert choose_dtype("auto", "cpu", hypothetical_devices(0, cpu_bf16=True)) == "bf16"
    assert choose_dtype("auto", "cpu", hypothetical_devices(0)) == "fp32"  # bf16 support unknown: fp32
    assert choose_dtype("fp32", "cuda:0", ampere) == "fp32"
    assert safe_dtype_after_nan("fp16", "cuda:0", ampere) == "bf16"
    assert safe_dtype_after_nan("fp16", "cuda:0", turing) == "fp32"
    assert safe_dtype_after_nan("bf16", "cuda:0", ampere) is None
    assert plan_memory(turing, PUBLISHED_SIZES).dtype == "fp16"


def test_fp32_doubles_the_weights() -> None:
    bf16 = predict_peak_bytes("full", (), PUBLISHED_SIZES, RequestSize(), "bf16")
    fp32 = predict_peak_bytes("full", (), PUBLISHED_SIZES, RequestSize(), "fp32")
    assert fp32 - bf16 > 19 * GIB


def test_ram_shortage_is_warned() -> None:
    plan = plan_memory(hypothetical_devices(16, ram_gb=8), PUBLISHED_SIZES)
    assert any("RAM" in w for w in plan.warnings)


def test_plan_json_shape() -> None:
    data = plan_memory(hypothetical_devices(16), PUBLISHED_SIZES).to_json()
    assert {"profile", "options", "predicted_peak_bytes", "reason"} <= set(data)
    assert isinstance(data["options"], list) and isinstance(data["predicted_peak_bytes"], int)
    assert data["predicted_seconds"] > 0 and data["bytes_moved_per_image"] > 0  # transformer-resident streams
    assert set(data["throughput"]) == {"bf16_tflops", "h2d_gbps", "memory_gbps", "pageable_gbps", "source"}
    assert data["allocator"] == "expandable" and isinstance(data["compiled"], bool)
    assert data["candidates"] and all({"predicted_seconds", "bytes_moved_per_image", "fits", "lossy"} <= set(c)
                                      for c in data["candidates"])


# Flags as /proc/cpuinfo lists them (abridged).
ZEN3_FLAGS = frozenset("fpu sse2 avx avx2 fma bmi2 sha_ni".split())  # no bf16 instructions
SKYLAKE_X_FLAGS = frozenset("avx2 avx512f avx512dq avx512bw avx512vl avx512_vnni".split())  # AVX-512 without BF16
ZEN4_FLAGS = frozenset("avx2 avx512f avx512_bf16 avx512_vnni".split())
SAPPHIRE_RAPIDS_FLAGS = frozenset("avx512f avx512_bf16 amx_bf16 amx_tile amx_int8".split())
AMX_ONLY_FLAGS = frozenset("avx2 amx_bf16".split())
NEOVERSE_V1_FEATURES = frozenset("fp asimd sve bf16 i8mm".split())  # aarch64 "Features" line
NEOVERSE_N1_FEATURES = frozenset("fp asimd aes sha1 crc32 atomics".split())


@pytest.mark.parametrize(("flags", "native", "dtype"), [
    (ZEN3_FLAGS, False, "fp32"),
    (SKYLAKE_X_FLAGS, False, "fp32"),
    (ZEN4_FLAGS, True, "bf16"),
    (SAPPHIRE_RAPIDS_FLAGS, True, "bf16"),
    (AMX_ONLY_FLAGS, True, "bf16"),
    (NEOVERSE_V1_FEATURES, True, "bf16"),
    (NEOVERSE_N1_FEATURES, False, "fp32"),
    (frozenset({"AVX512_BF16"}), True, "bf16"),  # case does not matter
    (frozenset(), False, "fp32"),  # flags unknown (no /proc): fp32
])
def test_cpu_flags_decide_the_auto_dtype_on_the_cpu(flags: frozenset, native: bool, dtype: str) -> None:
    assert cpu_has_native_bf16(flags) is native
    machine = hypothetical_devices(0, cpu_bf16=cpu_has_native_bf16(flags))
    assert choose_dtype("auto", "cpu", machine) == dtype
    plan = plan_memory(machine, PUBLISHED_SIZES)
    assert (plan.profile, plan.dtype) == ("cpu", dtype)
    # An explicit choice is kept either way (the user may know better, e.g. to compare).
    assert choose_dtype("bf16", "cpu", machine) == "bf16" and choose_dtype("fp32", "cpu", machine) == "fp32"


def test_cpu_bf16_does_not_change_the_gpu_choice() -> None:
    assert plan_memory(hypothetical_devices(24, cpu_bf16=False), PUBLISHED_SIZES).dtype == "bf16"
    turing = DeviceFacts(gpus=(GpuFacts(0, "T4", 16 * GIB, 15 * GIB, supports_bf16=False),), ram_total_bytes=0,
                         ram_available_bytes=0, cpu_bf16=True)
    assert plan_memory(turing, PUBLISHED_SIZES).dtype == "fp16"


@pytest.mark.parametrize("cpu_bf16", [False, True])
def test_fp16_on_the_cpu_is_refused_once_the_device_is_resolved(cpu_bf16: bool) -> None:
    no_gpu = hypothetical_devices(0, cpu_bf16=cpu_bf16)
    assert choose_device("auto", no_gpu) == "cpu"
    with pytest.raises(PlanError, match=r"--dtype fp16 would run on the CPU \(this machine has no CUDA GPU\)"
                                        r".*use --dtype auto.*bf16 or fp32"):
        plan_memory(no_gpu, PUBLISHED_SIZES, dtype="fp16", device="auto")
    with pytest.raises(PlanError, match=r"--dtype fp16.*--device cpu was asked for"):
        choose_dtype("fp16", "cpu", hypothetical_devices(24, cpu_bf16=cpu_bf16))
    # With a GPU, --device auto resolves to it and fp16 is allowed there.
    assert plan_memory(hypothetical_devices(24), PUBLISHED_SIZES, dtype="fp16", device="auto").dtype == "fp16"


# --- ControlNet weights and the VAE encode of an input ------------------------------------------------------

WITH_CONTROLNET = with_controlnet(PUBLISHED_SIZES, PUBLISHED_CONTROLNET, PUBLISHED_CONTROLNET_HINTS)
TEXT, IMAGE, CONTROL = RequestSize(), RequestSize(encode=True), RequestSize(encode=True, controlnet=True)


# Extra GiB reserved at 1024x1024, bf16, with the published Union 2.1 ControlNet (6.25 GiB of its own weights):
# configured but unused (text), used (controlnet request), and an input encoded (img2img) over text.
@pytest.mark.parametrize(("profile", "options", "configured", "used", "encoded"), [
    # Resident with the transformer: every request pays its weights (and the allocator's 3% on them). Its hints and
    # the VAE encode of the control image stay under the 1024x1024 decode, the largest stage.
    ("full", (), 6.439, 0.0, 0.0),
    # On the GPU only for its requests, with the transformer and the VAE that encodes the control image
    # (zimage.loader.denoise_placement); an input image keeps the VAE beside the text encoder's stage.
    ("model-offload", (), 0.0, 8.438, 0.161),
    # fp8 halves the ControlNet too; the text encoder beside the VAE encoding the input is now the peak.
    ("model-offload", ("fp8-storage",), 0.0, 4.684, 2.527),
    # One control block at a time (and its hints) stays under the decode stage.
    ("group-offload", (), 0.0, 0.0, 0.0),
    ("sequential-offload", (), 0.0, 0.0, 0.0),
])
def test_controlnet_and_encode_peaks_per_placement(profile: str, options: tuple, configured: float, used: float,
                                                   encoded: float) -> None:
    def peak(sizes, request) -> float:
        return predict_peak_bytes(profile, options, sizes, request, "bf16", profile == "group-offload") / GIB

    assert peak(WITH_CONTROLNET, TEXT) - peak(PUBLISHED_SIZES, TEXT) == pytest.approx(configured, abs=0.001)
    assert peak(WITH_CONTROLNET, CONTROL) - peak(WITH_CONTROLNET, TEXT) == pytest.approx(used, abs=0.001)
    assert peak(WITH_CONTROLNET, IMAGE) - peak(WITH_CONTROLNET, TEXT) == pytest.approx(encoded, abs=0.001)


def test_the_vae_encode_is_its_own_stage() -> None:
    from zimage.planner import activation_bytes

    text = activation_bytes(PUBLISHED_SIZES, TEXT, 2, vae_tiling=False)
    image = activation_bytes(PUBLISHED_SIZES, IMAGE, 2, vae_tiling=False)
    tiled = activation_bytes(PUBLISHED_SIZES, RequestSize(2048, 2048, encode=True), 2, vae_tiling=True)
    assert text["vae_encode"] == 0
    # 1024^2 px x 128 channels x 19.5 bytes x 2 / 2 (the decoder's measured constant), plus the input's pixels in bf16.
    assert image["vae_encode"] == int(1024 * 1024 * 128 * 19.5 + 1024 * 1024 * 3 * 2)
    assert tiled["vae_encode"] < activation_bytes(PUBLISHED_SIZES, RequestSize(2048, 2048, encode=True), 2,
                                                  vae_tiling=False)["vae_encode"]


def test_a_controlnet_changes_the_start_placement_only_where_it_is_resident() -> None:
    # 24 GB: full would need the ControlNet resident (27 GiB), so text requests move to transformer-resident
    # (the ControlNet stays beside the transformer; the text encoder is streamed).
    assert plan_memory(hypothetical_devices(24), PUBLISHED_SIZES).profile == "full"
    assert plan_memory(hypothetical_devices(24), WITH_CONTROLNET).profile == "transformer-resident"
    # 80 GB: everything stays resident.
    assert plan_memory(hypothetical_devices(80), WITH_CONTROLNET).profile == "full"
    assert WITH_CONTROLNET.total_params == PUBLISHED_SIZES.total_params + 3_356_225_792


def test_the_readme_shows_the_planner_tables_as_the_planner_makes_them() -> None:
    """README.md's ranked tables for 8/12/16/24 GB cards are scripts/planner_tables.py's output: a change to the
    planner that changes a choice or a figure fails here until `scripts/planner_tables.py --write` is run."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("planner_tables", root / "scripts" / "planner_tables.py")
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    readme = (root / "README.md").read_text()
    assert tables.replace_block(readme, tables.markdown()) == readme, "run scripts/planner_tables.py --write"
    assert tables.replace_block(readme, tables.gpu_markdown(), tables.GPU_BEGIN, tables.GPU_END) == readme, \
        "run scripts/planner_tables.py --write"
    assert "| run 3 | full | yes | 22.03 GiB |" in readme  # the measured H200 rows, beside the predictions
    block = readme[readme.index(tables.BEGIN):readme.index(tables.END)]
    for card in ("RTX 4060 8GB", "RTX 4070 12GB", "RTX 4060 Ti 16GB", "RTX 4090 24GB"):
        assert f"<summary>{card}: every placement weighed" in block
    # At spec-sheet rates the 8 and 12 GB cards are compute bound: streaming the transformer hides under the
    # compute (and a GGUF file's dequantization, measured at 0.97 s per image on an H200, is no gain there); 16 GB
    # keeps it resident, compiled; 24 GB everything.
    assert "| RTX 4060 8GB | Q4_0 | group-offload |" in block
    assert "| RTX 4070 12GB | bf16 | group-offload |" in block
    assert "| RTX 4060 Ti 16GB | bf16 | transformer-resident + vae-tiling, compiled |" in block
    assert "| RTX 4090 24GB | bf16 | full, compiled |" in block
    with pytest.raises(ValueError, match="markers"):
        tables.replace_block("no markers here", "x")


# --- fp8 compute, step cache and compilation ----------------------------------------------------------------------

def ada(vram_gb: float = 16, library: bool = True, capability: tuple[int, int] | None = (8, 9)) -> DeviceFacts:
    return hypothetical_devices(vram_gb, compute_capability=capability, fp8_compute_library=library)


def test_fp8_compute_is_planned_where_it_can_run_and_halves_the_transformer() -> None:
    plan = plan_memory(ada(), PUBLISHED_SIZES, requested_profile="transformer-resident",
                       forced_options=("fp8-compute",))
    assert plan.options == ("fp8-compute",) and plan.compiled  # torchao's float8 layers compile
    peak = lambda options: predict_peak_bytes("transformer-resident", options, PUBLISHED_SIZES, RequestSize(),  # noqa
                                              "bf16", True)
    saved = peak(()) - peak(("fp8-compute",))
    assert abs(saved - PUBLISHED_SIZES.transformer.params) < 0.05 * PUBLISHED_SIZES.transformer.params
    # Assumed 1.5x on the linear layers, until a GPU run measures it.
    assert plan.predicted_seconds < predict_seconds("transformer-resident", (), PUBLISHED_SIZES, RequestSize(), "bf16",
                                                    plan.throughput, compiled=True)
    # Auto picks it only once a GPU run has measured it (zimage.time_model.FP8_LINEAR_SPEEDUP is assumed).
    for vram_gb in (8, 12, 16, 24, 80):
        auto = plan_memory(ada(vram_gb), PUBLISHED_SIZES)
        assert "fp8-compute" not in auto.options and not any("fp8-compute" in c.options for c in auto.candidates)


@pytest.mark.parametrize(("devices", "kwargs", "message"), [
    (hypothetical_devices(0, cpu_bf16=True), {}, "needs a CUDA GPU with fp8 tensor cores"),
    (ada(capability=(8, 6)), {}, "compute capability 8.6. Use fp8-storage instead"),
    (ada(capability=None), {}, "has an unknown compute capability"),
    (ada(library=False), {}, "needs the torchao package, which is not installed: pip install torchao"),
    (ada(), {"dtype": "fp16"}, "computes in bf16 around its float8 matmuls: use --dtype bf16"),
    (ada(), {"requested_profile": "model-offload"}, "runs on the full and transformer-resident placements"),
    (ada(), {"forced_options": ("fp8-compute", "fp8-storage")}, "both store the transformer in float8"),
])
def test_fp8_compute_is_refused_where_it_cannot_run(devices: DeviceFacts, kwargs: dict, message: str) -> None:
    kwargs = {"forced_options": ("fp8-compute",), **kwargs}
    with pytest.raises(PlanError, match=message.replace(".", r"\.").replace("(", r"\(")):
        plan_memory(devices, PUBLISHED_SIZES, **kwargs)
    with pytest.raises(PlanError, match="cannot be combined with a GGUF transformer"):
        plan_memory(ada(), gguf("Q8_0"), forced_options=("fp8-compute",))


def test_step_cache_is_opt_in_lossy_and_never_compiled() -> None:
    plan = plan_memory(ada(24), PUBLISHED_SIZES, forced_options=("step-cache",))
    assert "step-cache" in plan.options and not plan.compiled  # its hooks break the compiled graph
    assert all("step-cache" in c.options for c in plan.candidates)  # forced: on every candidate
    for vram_gb in (8, 16, 24):
        assert not any("step-cache" in c.options for c in plan_memory(ada(vram_gb), PUBLISHED_SIZES).candidates)
    eager = predict_seconds("full", (), PUBLISHED_SIZES, RequestSize(), "bf16", H200)
    assert predict_seconds("full", ("step-cache",), PUBLISHED_SIZES, RequestSize(), "bf16", H200) < eager
    with pytest.raises(PlanError, match="--compile on with full \\+ step-cache: step-cache hooks every"):
        plan_memory(ada(24), PUBLISHED_SIZES, requested_profile="full", forced_options=("step-cache",),
                    compile_mode="on")


@pytest.mark.parametrize(("profile", "options", "quantized", "composes"), [
    ("full", (), False, True), ("balanced", (), False, True), ("transformer-resident", ("te-fp8-storage",), False, True),
    ("model-offload", (), False, True),  # accelerate's hook sits on the whole transformer, outside the blocks
    ("full", ("fp8-compute",), False, True),
    ("group-offload", (), False, False), ("sequential-offload", (), False, False),  # hooks on every block
    ("full", ("fp8-storage",), False, False), ("full", ("step-cache",), False, False),  # hooks on every layer
    ("full", (), True, False),  # GGUF: not checked compiled
])
def test_where_compilation_composes(profile: str, options: tuple, quantized: bool, composes: bool) -> None:
    from zimage.planner import compile_problem, will_compile

    assert (compile_problem(profile, options, quantized) is None) is composes
    assert will_compile("auto", "cuda:0", profile, options, quantized) is composes
    assert will_compile("auto", "cpu", profile, options, quantized) is False  # auto: CUDA only
    assert will_compile("on", "cpu", profile, options, quantized) is composes
    assert will_compile("off", "cuda:0", profile, options, quantized) is False


def test_compilation_is_priced_and_off_keeps_everything_eager() -> None:
    compiled = plan_memory(ada(24), PUBLISHED_SIZES)
    eager = plan_memory(ada(24), PUBLISHED_SIZES, compile_mode="off")
    assert compiled.compiled and not eager.compiled and compiled.profile == eager.profile == "full"
    assert compiled.predicted_seconds < eager.predicted_seconds * 0.8  # 0.78 against 0.51 of the matmul rate
    assert not any(c.compiled for c in eager.candidates)
    assert plan_memory(hypothetical_devices(0), PUBLISHED_SIZES).compiled is False  # the CPU: auto does not
    assert plan_memory(hypothetical_devices(0), PUBLISHED_SIZES, compile_mode="on").compiled is True
    with pytest.raises(PlanError, match="--compile on with group-offload: group-offload hooks every transformer"):
        plan_memory(ada(24), PUBLISHED_SIZES, requested_profile="group-offload", compile_mode="on")
    only_compiled = plan_memory(ada(8), PUBLISHED_SIZES, compile_mode="on")
    assert all(c.compiled for c in only_compiled.candidates)


def test_the_default_allocator_reserves_more_than_expandable_segments() -> None:
    for profile in ("full", "transformer-resident", "group-offload"):
        streams = profile != "full"
        expandable_peak = predict_peak_bytes(profile, (), PUBLISHED_SIZES, RequestSize(), "bf16", streams)
        default_peak = predict_peak_bytes(profile, (), PUBLISHED_SIZES, RequestSize(), "bf16", streams, "default")
        assert default_peak > expandable_peak * 1.05, profile
    expandable = plan_memory(hypothetical_devices(24), PUBLISHED_SIZES)
    default = plan_memory(hypothetical_devices(24, allocator="default"), PUBLISHED_SIZES)
    assert (expandable.allocator, default.allocator) == ("expandable", "default")
    # 24 GB holds the whole model under expandable segments (22.4 GiB predicted, 22.0 measured on an H200), not under
    # the default allocator (24.5 GiB measured there): the text encoder is streamed instead.
    assert (expandable.profile, default.profile) == ("full", "transformer-resident")


@pytest.mark.parametrize(("sizes", "forced", "what"), [
    (PUBLISHED_SIZES, ("step-cache",), "--compile on with step-cache: step-cache hooks every"),
    (PUBLISHED_SIZES, ("fp8-storage",), "--compile on with fp8-storage: fp8-storage hooks every"),
    (gguf("Q4_0"), (), "--compile on with a GGUF transformer: a GGUF transformer dequantizes"),
])
def test_compile_on_with_what_cannot_compile_is_refused_on_any_placement(sizes, forced: tuple, what: str) -> None:
    # Auto's candidates were all filtered out here, and the planner failed with min() of an empty sequence.
    with pytest.raises(PlanError, match=what.replace("+", r"\+")):
        plan_memory(ada(24), sizes, forced_options=forced, compile_mode="on")


def test_compile_on_that_leaves_nothing_fitting_says_what_auto_would_weigh() -> None:
    plan = plan_memory(ada(4), PUBLISHED_SIZES, compile_mode="on")
    assert not plan.fits and "--compile on keeps only the placements that compile" in plan.reason


@pytest.mark.parametrize("devices", [hypothetical_devices(0), hypothetical_devices(24)])
def test_step_cache_runs_in_any_dtype_and_only_fp8_storage_needs_bf16(devices: DeviceFacts) -> None:
    plan = plan_memory(devices, PUBLISHED_SIZES, dtype="fp32", forced_options=("step-cache",))
    assert plan.options == ("step-cache",) and plan.dtype == "fp32"
    with pytest.raises(PlanError, match=r"^te-fp8-storage computes in bf16"):
        plan_memory(devices, PUBLISHED_SIZES, dtype="fp32", forced_options=("te-fp8-storage", "step-cache"))


def test_predicted_stages_are_per_image_like_the_seconds() -> None:
    plan = plan_memory(hypothetical_devices(24), PUBLISHED_SIZES, RequestSize(2048, 2048, 4))
    assert plan.stages.total == pytest.approx(plan.predicted_seconds)
    assert plan.to_json()["predicted_stages"]["denoise_s"] == pytest.approx(plan.stages.denoise)
