"""Card emulation: the card table, the ballast / allocator-cap arithmetic, the row fields, the keys."""

import hashlib
import json
from types import SimpleNamespace

import pytest
import torch

from optkit.bench import card as card_mod
from optkit.config.compose import compose
from optkit.results.rows import LATER_SWITCH_DEFAULTS, ROW_FIELDS, opt_key, setting_key

MIB, GIB = 1024**2, 1024**3
# An H100 80GB HBM3 as NVML and cudaMemGetInfo see it, with a 520 MiB context made.
H100_NVML_TOTAL = 81559 * MIB
H100_CUDA_TOTAL = 81090 * MIB
H100_CUDA_FREE = H100_CUDA_TOTAL - 520 * MIB


def test_cards_are_named_and_sized_in_nvidia_smi_mib():
    assert card_mod.card_of("rtx4090", None).total_bytes == 24564 * MIB
    assert card_mod.card_of("t4", None).total_bytes == 15360 * MIB
    assert card_mod.card_of(None, 12).total_bytes == 12 * GIB
    assert card_mod.card_of(None, 12).name == "12gib"
    assert card_mod.card_of(None, 7.5).total_bytes == int(7.5 * GIB)
    assert card_mod.card_of(None, None) is None
    sizes = {name: c.total_bytes / GIB for name, c in card_mod.CARDS.items()}
    assert sizes["gpu_8gb"] == 8 and 11.9 < sizes["rtx3060"] <= 12 and 79 < sizes["h100_80gb"] < 80


def test_unknown_card_names_the_choices():
    with pytest.raises(ValueError, match="rtx4090.*card_gib"):
        card_mod.card_of("rtx9090", None)
    with pytest.raises(ValueError, match="> 0"):
        card_mod.card_of(None, -1)


@pytest.mark.parametrize("name", ["gpu_8gb", "rtx3060", "rtx4090", "rtx6000_ada", "h100_80gb"])
@pytest.mark.parametrize("reserve_mib", [0, 256])
def test_ballast_plus_card_is_the_gpu_and_the_cap_fills_the_card(name, reserve_mib):
    card = card_mod.CARDS[name]
    plan = card_mod.plan(
        card.total_bytes, "cap_and_ballast", H100_NVML_TOTAL, H100_CUDA_TOTAL, H100_CUDA_FREE, reserve_mib * MIB
    )
    assert plan.ballast_bytes + card.total_bytes == H100_NVML_TOTAL
    driver_reserved = H100_NVML_TOTAL - H100_CUDA_TOTAL
    # the card = the driver's reservation + what was in use before the model + the allocator's cap + the reserve
    assert driver_reserved + plan.context_bytes + plan.allocator_cap_bytes + reserve_mib * MIB == card.total_bytes
    # what cudaMemGetInfo reports free once the ballast is taken: the card's free memory
    free_after = H100_CUDA_FREE - plan.ballast_bytes
    assert free_after == plan.allocator_cap_bytes + reserve_mib * MIB
    assert plan.allocator_fraction == pytest.approx(plan.allocator_cap_bytes / H100_CUDA_TOTAL)


def test_modes_ballast_alone_and_cap_alone():
    card = card_mod.CARDS["rtx4090"].total_bytes
    args = (H100_NVML_TOTAL, H100_CUDA_TOTAL, H100_CUDA_FREE, 256 * MIB)
    full = card_mod.plan(card, "cap_and_ballast", *args)
    ballast = card_mod.plan(card, "ballast", *args)
    cap = card_mod.plan(card, "cap", *args)
    assert ballast.ballast_bytes == full.ballast_bytes and ballast.allocator_cap_bytes is None
    assert ballast.allocator_fraction is None
    assert cap.ballast_bytes == 0 and cap.allocator_cap_bytes == full.allocator_cap_bytes


def test_plans_that_cannot_be_emulated_say_why():
    args = (H100_NVML_TOTAL, H100_CUDA_TOTAL, H100_CUDA_FREE, 256 * MIB)
    with pytest.raises(ValueError, match="no larger than the GPU"):
        card_mod.plan(card_mod.CARDS["a100_80gb"].total_bytes, "cap_and_ballast", *args)
    with pytest.raises(ValueError, match="other processes"):  # 60 GiB of the GPU held elsewhere: nothing left
        card_mod.plan(8 * GIB, "ballast", H100_NVML_TOTAL, H100_CUDA_TOTAL, H100_CUDA_TOTAL - 60 * GIB, 0)
    with pytest.raises(ValueError, match="leaves nothing for the allocator"):
        card_mod.plan(700 * MIB, "cap_and_ballast", *args)
    with pytest.raises(ValueError, match="card_mode"):
        card_mod.plan(8 * GIB, "shrink", *args)


def test_card_use_adds_back_the_v2_reservation_and_drops_the_ballast():
    assert card_mod.card_use_bytes(70 * GIB, None, 60 * GIB) == 10 * GIB
    assert card_mod.card_use_bytes(70 * GIB, GIB // 2, 60 * GIB) == 10 * GIB + GIB // 2
    assert card_mod.card_use_bytes(None, None, 60 * GIB) is None


def _emulation(mode="cap_and_ballast", optimizer="adamw"):
    card = card_mod.CARDS["rtx3060"]
    plan = card_mod.plan(card.total_bytes, mode, H100_NVML_TOTAL, H100_CUDA_TOTAL, H100_CUDA_FREE, 256 * MIB)
    notes = card_mod.fidelity_notes(mode, optimizer, "NVIDIA H100 80GB HBM3")
    return card_mod.Emulation(card, plan, notes, ballast=None)


def test_row_fields_mark_a_point_that_used_more_than_the_card():
    emulation = _emulation()
    ballast = emulation.plan.ballast_bytes
    inside = emulation.fields({"peak_device_used_bytes": ballast + 11 * GIB, "device_reserved_bytes": None})
    over = emulation.fields({"peak_device_used_bytes": ballast + 12 * GIB + MIB, "device_reserved_bytes": None})
    assert inside["card_exceeded"] is False and inside["card_peak_bytes"] == 11 * GIB
    assert over["card_exceeded"] is True
    unknown = emulation.fields(None)
    assert unknown["card_exceeded"] is None and "unknown" in unknown["card_note"]
    assert set(inside) <= set(ROW_FIELDS), "every card field is declared in the row schema"
    assert "speed not emulated" in inside["card_note"] and "H100" in inside["card_note"]


def test_notes_name_what_each_mode_and_a_paged_optimizer_miss():
    paged = card_mod.fidelity_notes("cap_and_ballast", "paged_adamw_8bit", "H100")
    assert any("managed memory" in n and "ballast" in n for n in paged)
    assert not any("managed memory" in n for n in card_mod.fidelity_notes("cap_and_ballast", "adamw", "H100"))
    assert any("69688" in n for n in card_mod.fidelity_notes("cap", "adamw", "H100"))
    assert not any("69688" in n for n in card_mod.fidelity_notes("ballast", "adamw", "H100"))
    assert any("only NVML" in n for n in card_mod.fidelity_notes("cap", "adamw", "H100"))


def test_config_accepts_a_card_and_refuses_two():
    cfg = compose(["bench.card=rtx4090"])
    assert card_mod.card_identity(cfg.bench) == {
        "card": "rtx4090",
        "card_bytes": 24564 * MIB,
        "card_mode": "cap_and_ballast",
    }
    with pytest.raises(Exception, match="not both"):
        compose(["bench.card=rtx4090", "bench.card_gib=12"])
    with pytest.raises(Exception, match="card_mode"):
        compose(["bench.card_mode=shrink"])


def test_start_card_skips_on_cpu_and_does_nothing_without_a_card():
    from optkit.bench.setup import SkipPoint

    assert card_mod.start_card(compose([]).bench, "adamw", torch.device("cpu")) is None
    with pytest.raises(SkipPoint, match="needs a GPU"):
        card_mod.start_card(compose(["bench.card=t4"]).bench, "adamw", torch.device("cpu"))


class _FakeBallast:
    released = 0

    def __init__(self, nbytes):
        self.nbytes = nbytes

    def release(self):
        _FakeBallast.released += 1


def _fake_cuda(monkeypatch, fraction_calls, fail_after_ballast=False):
    """start_card on a CPU machine: CUDA, NVML and the driver ballast replaced by fakes of an 80 GiB card."""
    import optkit.measure.nvml as nvml

    monkeypatch.setattr(nvml, "query_once", lambda index, fn: 80 * GIB)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (79 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(card_mod, "_Ballast", _FakeBallast)

    def set_fraction(fraction, index):
        if not isinstance(index, int):  # what torch itself refuses for a device without an index
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{index}")
        if fail_after_ballast:
            raise RuntimeError("the allocator refused")
        fraction_calls.append((fraction, index))

    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", set_fraction)


def test_start_card_on_a_device_without_an_index_caps_the_current_one(monkeypatch):
    calls = []
    _fake_cuda(monkeypatch, calls)
    bench = SimpleNamespace(card=None, card_gib=12, card_mode="cap_and_ballast", card_reserve_mib=256)
    emulation = card_mod.start_card(bench, "adamw", torch.device("cuda"))
    assert emulation.ballast.nbytes > 0
    assert len(calls) == 1 and calls[0][1] == 0 and 0 < calls[0][0] < 1


def test_start_card_gives_the_ballast_back_when_the_rest_fails(monkeypatch):
    _fake_cuda(monkeypatch, [], fail_after_ballast=True)
    bench = SimpleNamespace(card=None, card_gib=12, card_mode="cap_and_ballast", card_reserve_mib=256)
    before = _FakeBallast.released
    with pytest.raises(RuntimeError, match="refused"):
        card_mod.start_card(bench, "adamw", torch.device("cuda"))
    assert _FakeBallast.released == before + 1


def _config(overrides):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(compose(overrides), resolve=True)


def test_the_card_is_part_of_the_setting_key_only_when_set():
    plain = setting_key(_config(["model=tiny_llama"]))
    carded = setting_key(_config(["model=tiny_llama", "bench.card=rtx4090"]))
    assert "card" not in plain and carded == plain + "/card-rtx4090-cap_and_ballast"
    assert setting_key(_config(["bench.card_gib=12", "bench.card_mode=ballast"])).endswith("/card-12gib-ballast")


def test_opt_keys_of_older_opt_sets_do_not_move_with_later_switches():
    config = _config(["opt=full"])
    assert {"tiled_mlp", "tiled_mlp_chunk_tokens"} <= set(LATER_SWITCH_DEFAULTS)
    assert all(config["opt"][k] == v for k, v in LATER_SWITCH_DEFAULTS.items() if k in config["opt"])
    older = {k: v for k, v in config["opt"].items() if k != "name" and k not in LATER_SWITCH_DEFAULTS}
    digest = hashlib.sha256(json.dumps(older, sort_keys=True).encode()).hexdigest()[:6]
    assert opt_key(config) == f"full~{digest}"
    assert opt_key(_config(["opt=full", "opt.tiled_mlp=true"])) != opt_key(config)


@pytest.mark.gpu
def test_on_a_gpu_the_card_is_what_cuda_reports_free_and_the_allocator_stops_at_the_cap():
    device = torch.device("cuda")
    torch.empty(1, device=device)
    bench = SimpleNamespace(card=None, card_gib=8, card_mode="cap_and_ballast", card_reserve_mib=256)
    emulation = card_mod.start_card(bench, "adamw", device)
    try:
        free, _ = torch.cuda.mem_get_info(device)
        assert free <= 8 * GIB
        assert torch.cuda.memory_reserved(device) < GIB, "the ballast is not in the caching allocator"
        cap = emulation.plan.allocator_cap_bytes
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(cap + 64 * MIB, dtype=torch.uint8, device=device)
        kept = torch.empty(cap - 64 * MIB, dtype=torch.uint8, device=device)
        del kept
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, torch.cuda.current_device())
        emulation.ballast.release()
        torch.cuda.empty_cache()
