"""Start-up guards: query shipping only where no captured graph can bypass the
attention hooks, and no pooling under tensor parallelism. Decided from real
SGLang ServerArgs records (constructed unresolved, as the launcher hands them
over, and once resolved by SGLang's own pipeline on this CPU host)."""

import pytest
from sglang.srt.server_args import ServerArgs

from sglang_tokenlake.sglang.guards import (
    FLAGS_NO_GRAPHS,
    check_shipping,
    graphed_phases,
    pooling_refusal,
    shipping_decision,
)


def args(**kw) -> ServerArgs:
    return ServerArgs(model_path="unused-model", **kw)


NO_GRAPHS = dict(cuda_graph_backend_decode="disabled", cuda_graph_backend_prefill="disabled")


def test_cpu_has_no_graphs_and_ships():
    sa = args(device="cpu", disable_overlap_schedule=True)
    assert graphed_phases(sa, "cpu") == []
    assert shipping_decision(sa, "cpu").allowed
    for mode in ("ship", "auto", "pull"):
        assert check_shipping(sa, "cpu", mode).allowed


def test_cpu_resolved_by_sglang_ships(tiny_model):
    # SGLang resolves a decode graph backend ('full') even on CPU, where it captures
    # graphs only under torch.compile: shipping stays allowed.
    sa = ServerArgs(model_path=tiny_model, device="cpu", disable_overlap_schedule=True)
    sa.resolve_once()
    assert shipping_decision(sa, "cpu").allowed
    sa = ServerArgs(model_path=tiny_model, device="cpu", disable_overlap_schedule=True,
                    enable_torch_compile=True)
    d = shipping_decision(sa, "cpu")
    assert not d.allowed and "--enable-torch-compile" in d.reason


def test_cuda_defaults_capture_both_phases():
    sa = args(disable_overlap_schedule=True)
    assert graphed_phases(sa, "cuda") == ["decode", "prefill"]  # full decode, breakable prefill
    d = shipping_decision(sa, "cuda")
    assert not d.allowed and "decode and prefill" in d.reason and FLAGS_NO_GRAPHS in d.reason


def test_cuda_defaults_refuse_ship_and_disable_auto():
    sa = args(disable_overlap_schedule=True)
    with pytest.raises(ValueError, match="--cuda-graph-backend-prefill disabled"):
        check_shipping(sa, "cuda", "ship")
    assert not check_shipping(sa, "cuda", "auto").allowed  # auto: pull/recompute only
    assert not check_shipping(sa, "cuda", "pull").allowed  # pull never ships: no error


@pytest.mark.parametrize("kw", [
    NO_GRAPHS,
    dict(disable_cuda_graph=True),
    dict(disable_decode_cuda_graph=True, disable_prefill_cuda_graph=True),
    dict(cuda_graph_config={"decode": {"backend": "disabled"}, "prefill": {"backend": "disabled"}}),
], ids=["backend-flags", "disable-cuda-graph", "disable-per-phase", "json"])
def test_cuda_without_graphs_ships(kw):
    sa = args(disable_overlap_schedule=True, **kw)
    assert graphed_phases(sa, "cuda") == []
    assert check_shipping(sa, "cuda", "ship").allowed


@pytest.mark.parametrize("kw,phase", [
    (dict(disable_decode_cuda_graph=True), "prefill"),  # the breakable prefill default stays
    (dict(cuda_graph_backend_decode="disabled"), "prefill"),
    (dict(disable_prefill_cuda_graph=True), "decode"),
    (dict(disable_cuda_graph=True, cuda_graph_backend_prefill="breakable"), "prefill"),
    (dict(NO_GRAPHS, cuda_graph_config={"decode": {"backend": "full"}}), "decode"),
])
def test_cuda_any_graphed_phase_refuses(kw, phase):
    sa = args(disable_overlap_schedule=True, **kw)
    assert graphed_phases(sa, "cuda") == [phase]
    with pytest.raises(ValueError, match=f"CUDA graphs cover the {phase} passes"):
        check_shipping(sa, "cuda", "ship")


def test_overlap_schedule_refuses_ship():
    d = shipping_decision(args(**NO_GRAPHS), "cuda")
    assert not d.allowed and "--disable-overlap-schedule" in d.reason


def test_tp_refuses_pooling_even_without_peers():
    assert pooling_refusal(args().tp_size) is None
    msg = pooling_refusal(args(tp_size=2).tp_size)
    assert msg is not None and "--tp-size 1 only" in msg
