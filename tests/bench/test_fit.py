"""The fit search: bisection on fake probe functions with a known limit (monotone, flaky at the edge, with a
hole), the fit suite's cells, and run_fit_suite with a fake measure (rows, card order, starts, resume)."""

import functools
import itertools

import pytest

from optkit.bench import fit
from optkit.bench import runner as runner
from optkit.bench.card import CARDS
from optkit.config.compose import compose
from optkit.results.rows import ROW_FIELDS, read_rows


def _monotone(limit, calls=None):
    def probe(value):
        if calls is not None:
            calls.append(value)
        return value <= limit

    return probe


@pytest.mark.parametrize("limit", [511, 512, 700, 4096, 21848, 99999, 131071])
@pytest.mark.parametrize("start", [None, 512, 3000, 50000, 200000])
def test_finds_the_known_limit_to_one_step(limit, start):
    calls = []
    found = fit.search_largest(_monotone(limit, calls), 512, 131072, step=256, start=start)
    expected = (limit // 256) * 256 if limit >= 512 else None
    assert found.largest_fit == expected
    if expected is None:
        assert found.smallest_failure == 512
    elif expected < 131072:
        assert found.smallest_failure == expected + 256
    assert all(v % 256 == 0 and 512 <= v <= 131072 for v in calls)
    assert len(calls) <= 2 * 10 + 3  # gallop + bisect over 2^9 grid steps, plus the confirming probe
    assert found.stopped is None and not found.flaky and not found.contradictions


def test_everything_fits_ends_at_the_top_and_a_start_is_rounded_up():
    calls = []
    found = fit.search_largest(_monotone(10**9, calls), 512, 8192, step=256, start=2972)
    assert calls[0] == 3072, "a figure to beat is probed at or above it"
    assert found.largest_fit == 8192 and found.smallest_failure is None


def test_relative_tolerance_stops_early_with_the_gap_it_promises():
    calls = []
    found = fit.search_largest(_monotone(77777, calls), 512, 524288, step=256, start=78475, growth=1.5, rel_tol=0.1)
    assert found.largest_fit <= 77777 < found.smallest_failure
    assert found.smallest_failure - found.largest_fit <= 0.1 * found.largest_fit
    assert len(calls) <= 7


def test_batch_search_on_a_unit_grid():
    found = fit.search_largest(_monotone(37), 1, 256, step=1)
    assert (found.largest_fit, found.smallest_failure) == (37, 38)


def test_a_flaky_edge_is_never_the_answer():
    """The limit fits once and fails the second time (noise at the edge): confirming moves the answer down."""
    seen = {}

    def probe(value):
        seen[value] = seen.get(value, 0) + 1
        if value == 4096:
            return seen[value] == 1
        return value < 4096

    found = fit.search_largest(probe, 512, 65536, step=256)
    assert found.largest_fit == 3840 and found.smallest_failure == 4096
    assert found.flaky == [4096]
    assert all(found.outcomes(found.largest_fit))


def test_a_first_failure_that_later_fits_keeps_the_answer_below_it():
    seen = {}

    def probe(value):
        seen[value] = seen.get(value, 0) + 1
        return value <= 5000 and not (value == 4864 and seen[value] == 1)

    found = fit.search_largest(probe, 512, 65536, step=256)
    assert found.largest_fit is not None and found.largest_fit < found.smallest_failure
    assert all(found.outcomes(found.largest_fit))


@pytest.mark.parametrize("start, expected", [(None, "edge below the hole"), (9000, 10240)])
def test_non_monotone_fit_gives_an_edge(start, expected):
    """Fits up to 10240 except in a hole at 4000..5000 (e.g. an allocator cliff): from below the search stops
    at the hole's edge (fits, one step more fails); from above it finds the top."""
    hole = range(4000, 5001)

    def probe(value):
        return value <= 10240 and value not in hole

    found = fit.search_largest(probe, 512, 65536, step=256, start=start)
    if start is None:
        assert found.largest_fit == 3840 and found.smallest_failure == 4096
    else:
        assert found.largest_fit == expected and found.smallest_failure == expected + 256
    assert probe(found.largest_fit) and not probe(found.smallest_failure)


def test_contradictions_are_listed():
    found = fit.Search(probes=[(4096, True), (2048, False), (1024, True)])
    assert found.contradictions == [(4096, 2048)]


def test_a_skipped_probe_ends_the_search():
    found = fit.search_largest(lambda value: None if value > 1024 else True, 512, 65536, step=512)
    assert found.stopped and "skipped" in found.stopped and found.largest_fit == 1024


def test_bad_ranges_are_refused():
    with pytest.raises(ValueError, match="multiple of"):
        fit.search_largest(_monotone(10), 600, 700, step=512)


def test_a_probe_fits_when_it_ran_and_stayed_on_its_card():
    assert fit.probe_fits({"status": "ok", "card_exceeded": False}) is True
    assert fit.probe_fits({"status": "ok", "card_exceeded": None}) is True
    assert fit.probe_fits({"status": "ok", "card_exceeded": True}) is False
    assert fit.probe_fits({"status": "oom"}) is False
    assert fit.probe_fits({"status": "timeout"}) is False
    assert fit.probe_fits({"status": "skipped"}) is None


# --------------------------------------------------------------------------- the suite


def _cells(*user):
    suite = compose(["suite=fit_quick"]).suite
    return fit.fit_cells(suite, list(user), runner.expand_points)


def test_fit_suites_cross_every_stack_with_every_card():
    cells = _cells()
    cfgs = [compose(c) for c in cells]
    assert {(c.opt.name, c.bench.card) for c in cfgs} == {
        (opt, card) for opt in ("full_tiled_mlp", "baseline") for card in ("gpu_8gb", "rtx3060", "rtx4080", "rtx4090")
    }
    assert all(c.suite.kind == "fit" and c.train.method == "qlora" and c.train.lora_r == 32 for c in cfgs)
    full = compose(["suite=fit"])
    assert len(fit.fit_cells(full.suite, [], runner.expand_points)) == len(full.suite.points) * 6
    assert len(_cells("bench.card=rtx4090")) == 2, "a user's card replaces the card axis"


@functools.lru_cache(maxsize=None)
def _composed(point):
    return compose(list(point))


def _compose(point):
    """compose, once per point (a search composes each probe; the tests run the same searches twice)."""
    return _composed(tuple(point))


def _fake_run(limits, log):
    """A probe 'process': fits while seq_len x batch <= the card's limit (tokens), as a card would."""

    def run_point(point, cfg):
        tokens = cfg.data.seq_len * cfg.train.batch_size
        limit = limits[cfg.bench.card]
        if cfg.bench.card_mode == "ballast":
            limit += 100  # a ballast alone leaves the allocator a little more than the cap did
        log.append((cfg.opt.name, cfg.bench.card, cfg.bench.card_mode, cfg.data.seq_len, cfg.train.batch_size))
        status = "ok" if tokens <= limit else "oom"
        return [{"status": status, "config": runner._container(cfg), "card": cfg.bench.card}]

    return run_point


def test_run_fit_suite_records_every_probe_and_orders_cards(tmp_path):
    limits = {"gpu_8gb": 5000, "rtx3060": 30000, "rtx4080": 52000, "rtx4090": 90000}
    log, recorded = [], []
    measure = fit.recorded_measure(_fake_run(limits, log), runner._container, recorded.append)
    summaries = fit.run_fit_suite(_cells(), _compose, measure)
    answers = {(_compose(s["cell"]).opt.name, _compose(s["cell"]).bench.card): s for s in summaries}
    assert len(answers) == 8
    for (opt, card), summary in answers.items():
        assert summary["largest_fit"] <= limits[card] < summary["smallest_failure"], (opt, card)
        assert summary["smallest_failure"] - summary["largest_fit"] <= max(256, 0.1 * summary["largest_fit"])
    assert len(recorded) == len(log), "every probe is a row"
    assert all(r["fit_search"] == "seq_len" and isinstance(r["fit_probe"], int) for r in recorded)
    assert {"fit_search", "fit_probe"} <= set(ROW_FIELDS)
    full = [entry for entry in log if entry[0] == "full_tiled_mlp" and entry[2] != "ballast"]
    firsts = [next(e for e in full if e[1] == card) for card in ("gpu_8gb", "rtx3060", "rtx4080", "rtx4090")]
    assert [e[3] for e in firsts] == [3072, 22016, 40960, 78592], "optkit starts at the published figures, rounded up"
    baseline = [e for e in log if e[0] == "baseline"]
    assert baseline[0][3] == 512 and [e[1] for e in baseline][0] == "gpu_8gb", "baseline from the bottom, 8 GB first"
    first_12gb = next(e for e in baseline if e[1] == "rtx3060")
    assert first_12gb[3] == answers[("baseline", "gpu_8gb")]["largest_fit"], "a bigger card starts at a smaller one's"
    honesty = [e for e in log if e[2] == "ballast"]
    assert {e[1] for e in honesty} == {"rtx3060"} and len(honesty) == 4  # answer and failure, both stacks
    assert all(e[4] == 1 for e in log)


def test_resuming_replays_recorded_probes_and_measures_only_the_rest():
    limits = {"gpu_8gb": 5000, "rtx3060": 30000, "rtx4080": 52000, "rtx4090": 90000}
    log, recorded = [], []
    fit.run_fit_suite(
        _cells(), _compose, fit.recorded_measure(_fake_run(limits, log), runner._container, recorded.append)
    )
    half = recorded[: len(recorded) // 2]
    again, more = [], []
    measure = fit.recorded_measure(_fake_run(limits, again), runner._container, more.append, earlier_rows=half)
    fit.run_fit_suite(_cells(), _compose, measure)
    assert len(again) == len(log) - len(half), "the recorded half is not measured again"
    assert [r["fit_probe"] for r in half + more] == [r["fit_probe"] for r in recorded]


def test_a_search_stopped_early_goes_on_when_resumed_with_more_probes():
    """suite.fit.max_probes=1 first (one probe per card: a published figure beaten or not), then the same run
    resumed without the limit: the recorded probes are read back, not run again, and the searches converge."""
    limits = {"gpu_8gb": 5000, "rtx4080": 52000}
    cards = "bench.card=gpu_8gb,rtx4080"
    first_log, first_rows = [], []
    first = fit.run_fit_suite(
        _cells(cards, "suite.fit.max_probes=1"),
        _compose,
        fit.recorded_measure(_fake_run(limits, first_log), runner._container, first_rows.append),
    )
    assert all(len(s["probes"]) == 1 and s["stopped"] for s in first)
    rest_log = []
    measure = fit.recorded_measure(_fake_run(limits, rest_log), runner._container, [].append, earlier_rows=first_rows)
    resumed = fit.run_fit_suite(_cells(cards), _compose, measure)
    optkit_firsts = [e for e in first_log if e[0] == "full_tiled_mlp" and e[2] == "cap_and_ballast"]
    assert len(optkit_firsts) == 2 and not set(optkit_firsts) & set(rest_log), "recorded probes are not run again"
    for summary in resumed:
        limit = limits[_compose(summary["cell"]).bench.card]
        assert summary["largest_fit"] <= limit < summary["smallest_failure"]
        assert summary["smallest_failure"] - summary["largest_fit"] <= max(256, 0.1 * summary["largest_fit"])


def test_the_published_figures_are_cards_of_the_table():
    cfg = compose(["suite=fit"]).suite
    assert set(cfg.fit.seq_len_start) <= set(CARDS) and set(cfg.axes["bench.card"]) <= set(CARDS)
    assert list(itertools.chain(cfg.fit.check_ballast_on)) == ["rtx3060"]


def test_a_fit_sweep_runs_probes_as_point_processes(tmp_path, monkeypatch):
    """Through the runner: every probe an isolated point and a row of the run (here an injected OOM, so the
    search ends at its first probe: one process)."""
    monkeypatch.setenv("OPTKIT_INJECT_FAULT", "oom@tiny_llama")
    run_dir = runner.run_sweep(["suite=fit_smoke", f"bench.results_dir={tmp_path}", "bench.progress=false"])
    rows = read_rows(run_dir / "results.jsonl")
    assert [(r["status"], r["fit_search"], r["fit_probe"], r["seq_len"], r["batch_size"]) for r in rows] == [
        ("oom", "seq_len", 0, 16, 1)
    ]
