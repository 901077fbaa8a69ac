"""bench.card / bench.card_gib: run a point as if the GPU had a smaller card's memory.

The emulation of a card of C bytes on a bigger GPU (bench.card_mode):

- ``cap_and_ballast`` (default): the rest of the physical memory (physical total - C) is taken as
  *ballast* through the CUDA driver, outside PyTorch's caching allocator, so ``cudaMemGetInfo`` (what
  ``torch.cuda.mem_get_info`` and libraries that size chunks from free memory read) reports the small
  card's free memory; the caching allocator is capped at what is left minus ``bench.card_reserve_mib``
  (``set_per_process_memory_fraction``), room for memory the allocator never sees (lazily loaded
  kernels, library workspaces), so the allocator fails with a clean OOM before the card is full.
- ``ballast``: the ballast alone (the allocator may take every free byte, as on a real card).
- ``cap``: the allocator cap alone (the naive emulation: what the allocator never sees is not bounded).

Whatever the mode, NVML is sampled for the whole point; the card's use is the device's peak "used"
(plus the driver's reservation NVML v2 reports apart) minus the ballast, and a point whose use ever
exceeded C is marked ``card_exceeded`` and never counted as fitting. With a ballast the GPU itself
bounds the use, so the check is the proof; under ``cap`` it is what catches the misses.

What emulation cannot make faithful (each row's ``card_note`` names the ones that apply to it):
- the CUDA context and driver reservation are the big GPU's, standing in for the card's;
- the allocator cap is checked after the allocator's own decisions (PyTorch issue 69688): block
  splitting and fragmentation near the limit differ from a real card's;
- managed memory (bitsandbytes' paged optimizers) is outside the allocator cap: only the ballast
  bounds it (under ``cap`` nothing does), and it pages to the host instead of failing;
- ``mem_get_info``'s total still reads the physical GPU (its free is the card's);
- speed is not emulated: tokens/s are the big GPU's, never the small card's.

The table and arithmetic below are pure (tested on CPU); ``start_card`` applies them in the point
process before the model is built.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

MIB, GIB = 1024**2, 1024**3


@dataclass(frozen=True)
class Card:
    name: str  # bench.card value
    label: str  # as a user names it
    gb: int  # the size it is sold as (what published fit tables are keyed by)
    total_mib: int  # memory total as nvidia-smi reports it (MiB), what the card's driver can hand out

    @property
    def total_bytes(self) -> int:
        return self.total_mib * MIB


# nvidia-smi "Total" of each card (MiB), each read off public nvidia-smi listings of that card (the
# driver's figure is a little under the marketed size: an RTX 4060 Ti 16 GB shows 16380, an A10G 23028);
# gpu_8gb stands for the 8 GB laptop / entry cards, whose listings vary (7.8-8 GiB): 8192 is the upper end.
CARDS: Dict[str, Card] = {
    c.name: c
    for c in (
        Card("gpu_8gb", "generic 8 GB", 8, 8192),
        Card("rtx3060", "RTX 3060 12 GB", 12, 12288),
        Card("rtx4060ti_16gb", "RTX 4060 Ti 16 GB", 16, 16380),
        Card("rtx4080", "RTX 4080 16 GB", 16, 16376),
        Card("t4", "T4 16 GB", 16, 15360),
        Card("rtx4090", "RTX 4090 24 GB", 24, 24564),
        Card("l4", "L4 24 GB", 24, 23034),
        Card("a10g", "A10G 24 GB", 24, 23028),
        Card("rtx6000_ada", "RTX 6000 Ada 48 GB", 48, 49140),
        Card("a100_40gb", "A100 40 GB", 40, 40960),
        Card("a100_80gb", "A100 80 GB", 80, 81920),
        Card("h100_80gb", "H100 80 GB", 80, 81559),
    )
}


def card_of(name: Optional[str], gib: Optional[float]) -> Optional[Card]:
    """The card bench.card / bench.card_gib ask for (None: no emulation; the schema refuses both set)."""
    if gib:
        if gib <= 0:
            raise ValueError(f"bench.card_gib must be > 0, got {gib}")
        return Card(f"{gib:g}gib", f"{gib:g} GiB card", round(gib), int(round(gib * 1024)))
    if not name:
        return None
    if name not in CARDS:
        raise ValueError(f"bench.card={name!r} is unknown; choose one of: {', '.join(CARDS)} (or bench.card_gib=<n>)")
    return CARDS[name]


@dataclass(frozen=True)
class Plan:
    """How a card of ``card_bytes`` is emulated on this GPU (all byte counts)."""

    card_bytes: int
    mode: str
    ballast_bytes: int  # held outside the allocator: physical total - card
    allocator_cap_bytes: Optional[int]  # the caching allocator's limit (None under ``ballast``)
    allocator_fraction: Optional[float]  # set_per_process_memory_fraction's argument
    context_bytes: int  # in use before the point built anything (context, driver, other processes)


def plan(
    card_bytes: int,
    mode: str,
    nvml_total_bytes: int,
    cuda_total_bytes: int,
    cuda_free_bytes: int,
    reserve_bytes: int,
) -> Plan:
    """The ballast and allocator cap that leave this process a card of ``card_bytes``.

    ``nvml_total_bytes`` is the physical total on nvidia-smi's scale (the card table's scale);
    ``cuda_total_bytes``/``cuda_free_bytes`` are what cudaMemGetInfo says now, with the context made.
    The ballast is the difference of the totals, so the driver's own reservation (NVML total minus
    CUDA total) is counted as a real card counts it. The cap is what the card leaves free once the
    context is in: card - reservation - in-use, minus the reserve."""
    from optkit.config.schema import CARD_MODES  # not at import: reports read the card table without torch

    if mode not in CARD_MODES:
        raise ValueError(f"bench.card_mode={mode!r} is not valid; choose one of: {', '.join(CARD_MODES)}")
    if card_bytes > nvml_total_bytes:
        raise ValueError(
            f"a {card_bytes / GIB:.1f} GiB card cannot be emulated on this {nvml_total_bytes / GIB:.1f} GiB GPU: "
            "choose a card no larger than the GPU"
        )
    in_use = cuda_total_bytes - cuda_free_bytes
    driver_reserved = max(0, nvml_total_bytes - cuda_total_bytes)
    ballast = nvml_total_bytes - card_bytes if mode != "cap" else 0
    card_free = card_bytes - driver_reserved - in_use  # = cudaMemGetInfo's free once the ballast is taken
    room = card_free - (reserve_bytes if mode != "ballast" else 0)
    if room <= 0:
        raise ValueError(
            f"a {card_bytes / GIB:.2f} GiB card leaves nothing for the allocator: this GPU already holds "
            f"{(in_use + driver_reserved) / GIB:.2f} GiB (context, driver, other processes)"
            + (f" and bench.card_reserve_mib={reserve_bytes // MIB}" if mode != "ballast" else "")
        )
    if mode == "ballast":
        return Plan(card_bytes, mode, ballast, None, None, in_use)
    cap = room
    return Plan(card_bytes, mode, ballast, cap, cap / cuda_total_bytes, in_use)


def card_use_bytes(peak_device_used: Optional[int], driver_reserved: Optional[int], ballast: int) -> Optional[int]:
    """The card's use from NVML: the device's peak "used" (NVML v2 reports the driver's reservation
    apart: added back, as the card's total includes it) minus the ballast."""
    if peak_device_used is None:
        return None
    return peak_device_used + (driver_reserved or 0) - ballast


def fidelity_notes(mode: str, optimizer: str, gpu_name: Optional[str]) -> List[str]:
    """Where this point's emulation is not a real card (the row's card_note)."""
    notes = [f"speed not emulated: tokens/s measured on {gpu_name or 'the physical GPU'}"]
    notes.append(f"CUDA context and driver reservation of {gpu_name or 'the physical GPU'} stand in for the card's")
    if mode != "ballast":
        notes.append("allocator cap is checked after the allocator's decisions (PyTorch #69688): fragmentation differs")
    if mode == "cap":
        notes.append("no ballast: mem_get_info reports the physical GPU's free memory; only NVML bounds the card")
    else:
        notes.append("mem_get_info's total reads the physical GPU (its free is the card's)")
    if optimizer.startswith("paged"):
        bound = "nothing but the NVML check" if mode == "cap" else "the ballast"
        notes.append(f"paged optimizer: managed memory is outside the allocator cap, bounded by {bound}; pages to host")
    return notes


# --------------------------------------------------------------------------- applying it (CUDA only)


class _Ballast:
    """Device memory taken through the CUDA driver (cuMemAlloc), so the caching allocator never sees it."""

    CHUNK = 4 * GIB  # several allocations: one contiguous range of tens of GiB is not needed

    def __init__(self, nbytes: int):
        self.pointers: List[int] = []
        self.nbytes = 0
        if nbytes <= 0:
            return
        self._cuda = ctypes.CDLL("libcuda.so.1")  # loaded already by torch's CUDA init
        context = ctypes.c_void_p()
        if self._cuda.cuCtxGetCurrent(ctypes.byref(context)) != 0 or not context.value:
            raise RuntimeError("bench.card: no current CUDA context to take the ballast in (create it first)")
        while self.nbytes < nbytes:
            size = min(self.CHUNK, nbytes - self.nbytes)
            pointer = ctypes.c_uint64()
            code = self._cuda.cuMemAlloc_v2(ctypes.byref(pointer), ctypes.c_size_t(size))
            if code != 0:
                self.release()
                raise RuntimeError(f"bench.card: cuMemAlloc of the ballast failed (CUDA driver error {code})")
            self.pointers.append(pointer.value)
            self.nbytes += size

    def release(self) -> None:
        for pointer in self.pointers:
            self._cuda.cuMemFree_v2(ctypes.c_uint64(pointer))
        self.pointers, self.nbytes = [], 0


@dataclass
class Emulation:
    card: Card
    plan: Plan
    notes: List[str]
    ballast: Any  # _Ballast, held for the process's life

    def fields(self, nvml_report) -> Dict[str, Any]:
        """The row's card fields, given the point's NVML report (None: NVML did not sample)."""
        report = nvml_report.to_dict() if hasattr(nvml_report, "to_dict") else dict(nvml_report or {})
        use = card_use_bytes(
            report.get("peak_device_used_bytes"), report.get("device_reserved_bytes"), self.plan.ballast_bytes
        )
        notes = list(self.notes)
        if use is None:
            notes.append("NVML did not sample: whether the card was exceeded is unknown")
        return {
            "card": self.card.name,
            "card_bytes": self.card.total_bytes,
            "card_mode": self.plan.mode,
            "card_ballast_bytes": self.plan.ballast_bytes,
            "card_allocator_cap_bytes": self.plan.allocator_cap_bytes,
            "card_peak_bytes": use,
            "card_exceeded": None if use is None else use > self.card.total_bytes,
            "card_note": "; ".join(notes),
        }


def card_identity(bench_cfg) -> Dict[str, Any]:
    """The row fields that name the card asked for, set before anything can fail (a skipped row keeps them)."""
    card = card_of(bench_cfg.card, bench_cfg.card_gib)
    if card is None:
        return {}
    return {"card": card.name, "card_bytes": card.total_bytes, "card_mode": bench_cfg.card_mode}


def start_card(bench_cfg, optimizer: str, device) -> Optional[Emulation]:
    """Apply bench.card / bench.card_gib in this process (the CUDA context exists); None when not set.
    Raises SkipPoint where this machine cannot emulate the card (no GPU, no NVML, a bigger card)."""
    card = card_of(bench_cfg.card, bench_cfg.card_gib)
    if card is None:
        return None
    import torch

    from optkit.bench.setup import SkipPoint
    from optkit.measure.nvml import query_once, read_memory

    if device.type != "cuda":
        raise SkipPoint("bench.card emulates a smaller CUDA card: it needs a GPU (bench.device=cuda)")
    index = device.index if device.index is not None else torch.cuda.current_device()
    nvml_total = query_once(index, lambda nv, handle: read_memory(nv, handle)[2])
    if nvml_total is None:
        raise SkipPoint("bench.card needs NVML to size the ballast and check the card: pip install nvidia-ml-py")
    free, total = torch.cuda.mem_get_info(index)
    try:
        chosen = plan(card.total_bytes, bench_cfg.card_mode, nvml_total, total, free, bench_cfg.card_reserve_mib * MIB)
    except ValueError as exc:
        raise SkipPoint(f"bench.card={card.name}: {exc}") from None
    ballast = _Ballast(chosen.ballast_bytes)
    try:  # the ballast lives outside the allocator: nothing else would give it back if the rest failed
        if chosen.allocator_fraction is not None:
            # an index, not the device: torch refuses "cuda" without one here
            torch.cuda.set_per_process_memory_fraction(chosen.allocator_fraction, index)
        notes = fidelity_notes(chosen.mode, optimizer, torch.cuda.get_device_name(index))
    except BaseException:
        ballast.release()
        raise
    return Emulation(card, chosen, notes, ballast)
