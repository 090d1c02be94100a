"""The progress line: printed on time, with the numbers a user needs to know when a run ends."""

from shared.progress import Progress, format_duration


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_a_line_every_interval_with_rate_eta_split_and_last_episodes(capsys):
    clock = FakeClock()
    progress = Progress("mt10 ppo_varshare seed 1", total_steps=1_000_000, interval=30.0, clock=clock)
    clock.now += 29.0
    assert progress.tick(10_000, "collecting") is None  # not yet 30 s
    clock.now += 1.0  # 30 s after the start: 20,000 steps at 666.7 steps/s
    progress.phase_times(rollout_time=12.0, update_time=18.0)
    progress.episodes([100.0, 300.0], [True, False])
    line = progress.tick(20_000, "updating")
    assert line == ("[mt10 ppo_varshare seed 1] 20,000/1,000,000 steps (2.0%) | 667 steps/s | ETA 24m30s "
                    "| rollout 40% / update 60% | last iteration: success 0.50, return 200.0 | updating")
    assert capsys.readouterr().out.strip() == line
    assert progress.tick(20_500, "updating") is None  # the next line waits another 30 s
    clock.now += 30.0
    assert progress.tick(40_000, "collecting").startswith("[mt10 ppo_varshare seed 1] 40,000/1,000,000 steps (4.0%)")


def test_toy_suites_report_return_only_and_durations_read_naturally():
    progress = Progress("cartpole-mt ppo_mtl_embed seed 1", total_steps=100, interval=0.0, clock=FakeClock())
    progress.episodes([500.0], None)
    assert progress.last_episodes == "last iteration: return 500.0"
    progress.episodes([], None)  # an iteration without a finished episode keeps the last report
    assert progress.last_episodes == "last iteration: return 500.0"
    assert format_duration(59) == "0m59s" and format_duration(3600 * 5 + 17 * 60) == "5h17m"
