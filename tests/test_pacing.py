"""The admission pacer: long prefill chunks run while streams decode only when their measured
time keeps each stream's wait between tokens within ``max_gap_steps`` decode steps."""
from __future__ import annotations

import pytest

from pllava.pacing import AdmissionPacer, queue_stretch


def test_a_chunk_runs_while_streams_decode_only_if_its_time_fits_the_wait():
    pacer = AdmissionPacer({("prefill", 256, 512): 1.2, ("prefill", 128, 1024): 0.6}, max_gap_steps=3.5,
                           untried_margin=1.0)
    assert not pacer.allows(128, 1024)  # no decode step measured yet
    pacer.step_ran(0.24)
    # wait = chunk + step: 0.6 + 0.24 <= 3.5 x 0.24, but 1.2 + 0.24 is not
    assert pacer.allows(128, 1024) and not pacer.allows(256, 512)
    assert not pacer.allows(64, 2048)  # never timed
    pacer.step_ran(1.24)  # more streams: longer steps allow longer chunks (median 0.24 -> 0.74)
    assert pacer.step_s == pytest.approx(0.74) and pacer.allows(256, 512)


def test_the_wait_allowed_counts_in_the_median_step_which_one_slow_step_does_not_move():
    pacer = AdmissionPacer({}, max_gap_steps=3.0, step_window=5)
    for seconds in (0.028, 0.030, 0.029, 0.060, 0.028):  # one slow step
        pacer.step_ran(seconds)
    assert pacer.step_s == 0.029
    for seconds in (0.040, 0.041, 0.042):  # a lasting change (more streams): the oldest steps leave the window
        pacer.step_ran(seconds)
    assert pacer.step_s == 0.041


def test_steps_timed_beside_fewer_streams_count_at_the_load_of_those_decoding_now():
    """While prompts enter, the streams decode in the chunks' calls, so the latest steps run
    alone may be of fewer streams: each counts scaled by what a step reads now."""
    pacer = AdmissionPacer({("prefill", 64, 1024): 0.05}, max_gap_steps=3.0, untried_margin=1.0)
    for seconds in (0.015, 0.016, 0.014):  # one stream: a step reads 1 (any unit)
        pacer.step_ran(seconds, load=1.0)
    assert pacer.step_at(None) == pacer.step_s == pytest.approx(0.015)
    assert pacer.step_at(2.0) == pytest.approx(0.030)
    # a chunk and a step: 0.05 + 0.015 > 3 x 0.015 at one stream's load, 0.05 + 0.03 <= 3 x 0.03 at twice it
    assert not pacer.allows(64, 1024, load=1.0) and pacer.allows(64, 1024, load=2.0)
    assert not pacer.allows(64, 1024)  # no load given: that of the latest step
    pacer.step_ran(0.060, load=4.0)  # the median of per-load times is unchanged (0.015)
    assert pacer.step_s == pytest.approx(0.060) and pacer.step_at(1.0) == pytest.approx(0.015)
    with pytest.raises(ValueError, match="load must be positive, got 0"):
        pacer.step_ran(0.01, load=0)


def test_measured_times_follow_the_machine():
    seconds = {("prefill", 128, 1024): 0.6}
    pacer = AdmissionPacer(seconds, max_gap_steps=3.5, smoothing=0.5, untried_margin=1.0)
    pacer.step_ran(0.25)
    assert pacer.allows(128, 1024)
    pacer.chunk_ran(128, 1024, 1.4)  # the machine got busy: the chunk now takes longer
    assert seconds[("prefill", 128, 1024)] == pytest.approx(1.0) and not pacer.allows(128, 1024)
    pacer.chunk_ran(64, 2048, 0.3)  # a chunk first seen running is timed from then on
    assert seconds[("prefill", 64, 2048)] == 0.3 and pacer.allows(64, 2048)


def test_one_step_of_wait_means_short_chunks_only():
    pacer = AdmissionPacer({("prefill", 256, 512): 0.001}, max_gap_steps=1)
    pacer.step_ran(1.0)
    assert not pacer.allows(256, 512)
    for refused in (0.5, float("nan")):
        with pytest.raises(ValueError, match="max_gap_steps must be at least 1"):
            AdmissionPacer(max_gap_steps=refused)


def test_a_warm_up_time_counts_with_a_margin_until_the_chunk_ran_beside_decode_steps():
    seconds = {("prefill", 64, 2048): 0.212}
    pacer = AdmissionPacer(seconds, max_gap_steps=3.5, smoothing=0.5, untried_margin=1.5, spread_margin=0.0)
    pacer.step_ran(0.086)
    # 0.212 + 0.086 fits 3.5 steps (0.301), but 1.5 x 0.212 + 0.086 does not
    assert not pacer.allows(64, 2048)
    pacer.chunk_ran(64, 2048, 0.200)  # alone (nothing decoding): still untried beside decode steps
    assert not pacer.allows(64, 2048)
    pacer.chunk_ran(64, 2048, 0.200, busy=True)  # measured where it matters: its own time counts
    assert ("prefill", 64, 2048) in pacer.tried and pacer.allows(64, 2048)


def test_a_chunk_run_with_the_decode_rows_is_the_whole_wait():
    """In one call with the decode rows, the streams wait that call alone: until it has run
    so, it counts as the chunk and a decode step apart; then its measured time, which may
    fit where the two apart do not."""
    pacer = AdmissionPacer({("prefill", 64, 1024): 0.7}, max_gap_steps=3.5, untried_margin=1.0)
    pacer.step_ran(0.24)
    # apart: 0.7 + 0.24 > 3.5 x 0.24 = 0.84, and so until measured together
    assert not pacer.allows(64, 1024) and not pacer.allows(64, 1024, with_decode=7)
    pacer.chunk_ran(64, 1024, 0.8, busy=True, with_decode=7)
    assert pacer.seconds[("prefill", 64, 1024)] == 0.7 and ("prefill", 64, 1024) not in pacer.tried
    assert pacer.allows(64, 1024, with_decode=7) and not pacer.allows(64, 1024)
    pacer.chunk_ran(64, 1024, 1.0, busy=True, with_decode=7)  # measured longer: 0.8 -> 0.86
    assert not pacer.allows(64, 1024, with_decode=7)


def test_the_wait_allowed_stretches_by_the_factor_given():
    pacer = AdmissionPacer({("prefill", 256, 512): 1.2}, max_gap_steps=3.5, untried_margin=1.0)
    pacer.step_ran(0.24)  # 1.2 + 0.24 > 3.5 x 0.24
    assert not pacer.allows(256, 512) and not pacer.allows(256, 512, stretch=0.5)
    assert pacer.allows(256, 512, stretch=2.0)  # <= 7 x 0.24
    pacer.chunk_ran(256, 512, 1.6, busy=True, with_decode=7)  # one call with the decode rows
    assert not pacer.allows(256, 512, with_decode=7, stretch=1.5) and pacer.allows(256, 512, 7, 2.0)


def test_the_stretch_grows_with_the_prompts_queued_behind_the_entering_one_over_the_streams():
    assert queue_stretch(1, 7, 4.0) == queue_stretch(1, 1, 4.0) == 1.0  # a lone admission: no stretch
    assert queue_stretch(2, 6, 4.0) == pytest.approx(1 + 4 / 6)  # the default weight: 4
    assert queue_stretch(3, 4, 8.0) == 3.0 and queue_stretch(3, 4, 8.0, queued_weight=1.0) == 1.5
    assert queue_stretch(6, 1, 4.0) == 4.0  # capped
    assert queue_stretch(6, 1, 1.0) == queue_stretch(6, 1, 4.0, queued_weight=0.0) == 1.0  # stretching off
    assert queue_stretch(2, 0, 4.0) == 1.0  # nothing decodes: no wait to stretch


def test_a_chunk_whose_time_scatters_counts_its_spread():
    """Mean time plus ``spread_margin`` mean deviations: the longest waits are what a stream
    feels, so a size that runs near the limit and scatters gives way to a shorter one."""
    steady = AdmissionPacer({}, max_gap_steps=3.5, smoothing=0.5, spread_margin=2.0)
    scattered = AdmissionPacer({}, max_gap_steps=3.5, smoothing=0.5, spread_margin=2.0)
    for pacer, times in ((steady, (0.10, 0.10, 0.10)), (scattered, (0.08, 0.12, 0.08))):
        pacer.step_ran(0.031)  # 3.5 steps: 0.1085
        for seconds in times:
            pacer.chunk_ran(64, 4096, seconds, busy=True, with_decode=7)
    # both average ~0.1 (the scattered one 0.09), within 3.5 steps; only the steady one fits with its spread
    assert scattered.seconds[("mixed", 64, 4096, 7)] == pytest.approx(0.09)
    assert scattered.deviation[("mixed", 64, 4096, 7)] == pytest.approx(0.03)  # |0.12 - 0.08|, then |0.08 - 0.10|
    assert steady.allows(64, 4096, with_decode=7) and steady.deviation[("mixed", 64, 4096, 7)] == 0
    assert not scattered.allows(64, 4096, with_decode=7)
    lenient = AdmissionPacer({}, max_gap_steps=3.5, smoothing=0.5, spread_margin=0.0)
    lenient.step_ran(0.031)
    for seconds in (0.08, 0.12, 0.08):
        lenient.chunk_ran(64, 4096, seconds, busy=True, with_decode=7)
    assert lenient.allows(64, 4096, with_decode=7)
    with pytest.raises(ValueError, match="spread_margin must be at least 0"):
        AdmissionPacer(spread_margin=-1.0)


def test_a_chunk_not_yet_run_with_the_decode_rows_counts_its_parts_with_the_margin():
    """Untried in one call with the decode rows, the chunk alone and a step count
    ``untried_margin`` times: such a call ran ~1.3x its parts apart."""
    pacer = AdmissionPacer({("prefill", 64, 128): 0.040}, max_gap_steps=3.5, untried_margin=1.5)
    pacer.step_ran(0.028)  # 3.5 steps: 0.098
    pacer.chunk_ran(64, 128, 0.040, busy=True)  # tried apart: 0.040 + 0.028 fits
    assert pacer.allows(64, 128)
    assert not pacer.allows(64, 128, with_decode=7)  # (0.040 + 0.028) x 1.5 = 0.102 does not
    assert pacer.allows(64, 128, with_decode=7, stretch=1.1)


def test_a_chunk_timed_beside_fewer_decode_rows_is_untried_beside_more():
    """Times in one call are kept per number of decode rows: beside 2 streams a chunk ran
    shorter than it does beside 7."""
    pacer = AdmissionPacer({("prefill", 64, 512): 0.065}, max_gap_steps=3.5, untried_margin=1.5)
    pacer.step_ran(0.028)  # 3.5 steps: 0.098
    pacer.chunk_ran(64, 512, 0.080, busy=True, with_decode=2)
    assert pacer.allows(64, 512, with_decode=2)
    assert not pacer.allows(64, 512, with_decode=7)  # (0.065 + 0.028) x 1.5 > 0.098
    pacer.chunk_ran(64, 512, 0.095, busy=True, with_decode=7)
    assert pacer.seconds[("mixed", 64, 512, 7)] == 0.095 and pacer.allows(64, 512, with_decode=7)


def test_a_chunk_untried_with_the_decode_rows_scales_a_shorter_ones_part_of_that_call():
    """Once a shorter chunk has run with the same decode rows at the same context, a longer
    one counts as a step plus that call's chunk part scaled by the sizes (the warm-up times
    of the two chunks alone no longer matter)."""
    seconds = {("prefill", 16, 4096): 0.032, ("prefill", 32, 4096): 0.033}  # warm-up: too close to scale by
    pacer = AdmissionPacer(seconds, max_gap_steps=3.0, untried_margin=1.5, spread_margin=0.0)
    pacer.step_ran(0.030)  # 3 steps: 0.090
    assert not pacer.allows(16, 4096, with_decode=7)  # parts apart: (0.032 + 0.030) x 1.5
    pacer.chunk_ran(16, 4096, 0.055, busy=True, with_decode=7)  # part of the call: 0.025
    assert pacer.allows(16, 4096, with_decode=7)
    assert pacer.allows(32, 4096, with_decode=7)  # 0.030 + 2 x 0.025 = 0.080
    assert not pacer.allows(64, 4096, with_decode=7)  # 0.030 + 4 x 0.025 = 0.130
    assert not pacer.allows(32, 4096, with_decode=6)  # beside other rows: untried, parts apart
    pacer.chunk_ran(16, 4096, 0.085, busy=True, with_decode=7)  # slower now (average 0.0715): part 0.0415
    assert not pacer.allows(32, 4096, with_decode=7)  # 0.030 + 2 x 0.0415 = 0.113


def test_a_chunk_run_in_parts_counts_as_the_whole_step_it_stands_for():
    """Each part of a chunk run in parts holds a decode step of the streams and a share of the
    chunk: the parts' sum less the steps they repeat is the whole step, judged as one."""
    pacer = AdmissionPacer({("prefill", 16, 4096): 0.1}, max_gap_steps=3.0, untried_margin=1.0, spread_margin=0.0)
    assert not pacer.judged_too_long(16, 4096, 7)  # no decode step measured: nothing to judge by
    pacer.parts_ran(16, 4096, [0.058, 0.060], 7)  # (nor anything to count a part's step by)
    assert ("mixed", 16, 4096, 7) not in pacer.seconds
    pacer.step_ran(0.040)
    # not run beside the decode rows yet: not judged (though 0.1 + 0.04 > 3 x 0.04 is not allowed)
    assert not pacer.allows(16, 4096, 7) and not pacer.judged_too_long(16, 4096, 7)
    pacer.parts_ran(16, 4096, [0.085, 0.085], 7)  # 0.17 - 0.04: the whole step took 0.13 > 0.12
    assert pacer.seconds[("mixed", 16, 4096, 7)] == pytest.approx(0.13)
    assert pacer.judged_too_long(16, 4096, 7) and not pacer.judged_too_long(16, 4096, 7, stretch=1.5)
    pacer.parts_ran(16, 4096, [0.06, 0.06], 7)  # the host sped up: 0.08, averaged in (0.13 -> 0.115)
    assert pacer.seconds[("mixed", 16, 4096, 7)] == pytest.approx(0.115) and not pacer.judged_too_long(16, 4096, 7)


def test_a_chunk_not_yet_run_at_a_context_is_judged_by_its_calls_at_the_bucket_below():
    """The first chunk of a new context bucket lies just past the last one of the bucket
    below: it is judged by that bucket's times, so it runs in parts when those were too long
    rather than whole until measured; once it has run at its own context, its own times count."""
    seconds = {("prefill", 16, 2048): 0.030, ("prefill", 16, 4096): 0.031, ("prefill", 32, 4096): 0.033}
    pacer = AdmissionPacer(seconds, max_gap_steps=2.5, untried_margin=1.5, spread_margin=0.0)
    pacer.step_ran(0.040)  # 2.5 steps: 0.100
    assert not pacer.judged_too_long(16, 4096, 7)  # run nowhere beside 7 rows: nothing to judge by
    pacer.chunk_ran(16, 1024, 0.050, busy=True, with_decode=7)
    pacer.chunk_ran(16, 2048, 0.110, busy=True, with_decode=7)
    assert pacer.judged_too_long(16, 4096, 7) and not pacer.allows(16, 4096, 7)  # the nearest: 0.110 at 2048
    assert not pacer.judged_too_long(16, 4096, 6)  # beside other rows: nothing to judge by
    assert not pacer.judged_too_long(16, 512, 7)  # the buckets above are no measure of one below
    assert not pacer.allows(32, 4096, 7)  # a longer chunk: its own calls below, none; untried margin
    pacer.chunk_ran(32, 2048, 0.090, busy=True, with_decode=7)
    assert pacer.allows(32, 4096, 7)  # its own call below: 0.090
    pacer.chunk_ran(16, 4096, 0.070, busy=True, with_decode=7)  # run at 4096: its own time counts
    assert not pacer.judged_too_long(16, 4096, 7) and pacer.allows(16, 4096, 7)
    assert pacer.allows(32, 4096, 7)  # now scaled from the 16 here: 0.040 + 2 x 0.030 = 0.100
