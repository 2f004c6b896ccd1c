"""The [system] section and the simulated clock (issue #26): device profiles, traces, availability, round times,
deadlines, over-selection, time to accuracy; off by default."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from conftest import assert_config_error_names, scenario_config

from fedsim.config import SystemConfig
from fedsim.engine.clock import ClientTiming, SimClock
from fedsim.engine.runner import run_scenario
from fedsim.scenario import partition_for
from fedsim.system.devices import (
    MBIT,
    DeviceFleet,
    DeviceProfile,
    IntervalAvailability,
    MarkovAvailability,
    build_fleet,
)

CLIENTS = 6
EPOCHS = 2


def digits(strategy: str = "fedavg", system: str = "", fraction: float = 1.0, rounds: int = 1) -> str:
    """Small digits federation (6 Dirichlet clients, cnn width 8), inline, with a [system] section of ``system``."""
    return f"""
seed = 5
rounds = {rounds}
[data]
name = "digits"
max_train = 900
max_test = 300
[partition]
kind = "dirichlet"
num_clients = {CLIENTS}
alpha = 1.0
[model]
name = "cnn"
width = 8
[client]
epochs = {EPOCHS}
batch_size = 32
lr = 0.05
[simulation]
backend = "inline"
[strategy]
name = "{strategy}"
fraction_train = {fraction}
{system}
"""


# client 0 and 3 are slow phones (2 samples/s), the rest fast; bandwidths differ per client
SPEEDS = [2.0, 400.0, 300.0, 2.5, 500.0, 250.0]
DOWN = [10.0, 20.0, 5.0, 40.0, 8.0, 16.0]
UP = [2.0, 4.0, 1.0, 8.0, 3.0, 6.0]


def write_trace(tmp_path) -> str:
    path = tmp_path / "devices.csv"
    rows = ["client,speed,download_mbps,upload_mbps"] + [f"{i},{s},{d},{u}" for i, (s, d, u) in
                                                          enumerate(zip(SPEEDS, DOWN, UP))]
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def hand_times(config, metrics: pd.DataFrame, clients: list[int]) -> dict[int, float]:
    """Each client's round-1 time by hand: bytes / bandwidth + epochs * examples / speed (every client receives
    and sends the same model, so per-client bytes are the round's totals over the clients)."""
    sizes = [len(p) for p in partition_for(config)]
    row = metrics.iloc[1]
    down, up = row["round_bytes_down"] / len(clients), row["round_bytes_up"] / len(clients)
    return {i: down / (DOWN[i] * 1e6 / 8) + EPOCHS * sizes[i] / SPEEDS[i] + up / (UP[i] * 1e6 / 8) for i in clients}


def run(tmp_path, text: str, label: str):
    config = scenario_config(text, tmp_path, filename=f"{label}.toml")
    summary = run_scenario(config, tmp_path / label, show_progress=False)
    return config, summary, pd.read_csv(tmp_path / label / "metrics.csv")


def test_round_time_is_the_hand_computed_sum_and_a_deadline_drops_exactly_the_slow_clients(tmp_path):
    trace = write_trace(tmp_path)
    config, summary, metrics = run(tmp_path, digits(system=f'[system]\ntrace = "{trace}"\ntargets = [0.0, 1.0]'),
                                   "full")
    times = hand_times(config, metrics, list(range(CLIENTS)))
    assert metrics["sim_seconds"].iloc[1] == pytest.approx(max(times.values()), abs=1e-4)  # the last client
    assert summary["sim_seconds"] == metrics["sim_seconds"].iloc[-1]
    assert summary["time_to_accuracy"] == {"0": 0.0, "1": None}  # round 0 already reaches 0; 1.0 never
    assert metrics["dropped_clients"].iloc[-1] == 0 and metrics["failed_clients"].iloc[-1] == 0

    slow = {0, 3}
    deadline = (max(times[i] for i in times if i not in slow) + min(times[i] for i in slow)) / 2
    _, late, lmetrics = run(tmp_path, digits(system=f'[system]\ntrace = "{trace}"\ndeadline_s = {deadline}'),
                            "deadline")
    assert lmetrics["failed_clients"].iloc[1] == len(slow) == lmetrics["dropped_clients"].iloc[1]
    assert late["failed_client_rounds"] == len(slow)
    assert lmetrics["sim_seconds"].iloc[1] == pytest.approx(deadline, abs=1e-4)  # the server waits the deadline
    assert lmetrics["round_bytes_up"].iloc[1] == metrics["round_bytes_up"].iloc[1]  # their bytes still spent
    clients = pd.read_csv(tmp_path / "deadline" / "clients.csv")  # the per-client rows agree
    round1 = clients[clients["round"] == 1]
    assert set(round1.loc[round1["failed"].astype(bool), "client"]) == slow


def test_over_selection_keeps_the_first_answers_on_the_model_rounds_loop(tmp_path):
    trace = write_trace(tmp_path)
    # FedNova (model-rounds framework): m = 3 of 6, over-selected to 6; the 3 fastest are kept
    config, summary, metrics = run(tmp_path, digits("fednova", f'[system]\ntrace = "{trace}"\nover_selection = 2.0',
                                                    fraction=0.5), "over")
    times = hand_times(config, metrics, list(range(CLIENTS)))
    assert metrics["sim_seconds"].iloc[1] == pytest.approx(sorted(times.values())[2], abs=1e-4)
    assert metrics["dropped_clients"].iloc[1] == 3 and metrics["failed_clients"].iloc[1] == 0


def _system(**values) -> SystemConfig:
    return SystemConfig(**values)


def test_same_seed_same_fleet_and_availability():
    system = _system(availability="markov", online_mean_s=50.0, offline_mean_s=30.0)
    a, b, c = build_fleet(system, 20, seed=1), build_fleet(system, 20, seed=1), build_fleet(system, 20, seed=2)
    assert a.profiles == b.profiles and a.profiles != c.profiles
    # the availability of a client does not depend on the order of queries
    probes = np.linspace(0, 2000, 101)
    forward = [[a.availability.is_online(p, t) for t in probes] for p in range(20)]
    backward = [[b.availability.is_online(p, t) for t in probes[::-1]][::-1] for p in range(20)]
    assert forward == backward
    online = np.mean(forward)
    assert 0.45 < online < 0.8  # stationary share 50 / 80 = 0.625


def test_log_normal_draws_have_the_configured_medians():
    system = _system(speed_median=100.0, speed_sigma=0.5, download_median_mbps=20.0, upload_median_mbps=4.0)
    fleet = build_fleet(system, 4000, seed=0)
    speeds = np.array([p.speed for p in fleet.profiles])
    assert np.median(speeds) == pytest.approx(100.0, rel=0.05)
    assert np.std(np.log(speeds)) == pytest.approx(0.5, rel=0.05)
    assert np.median([p.upload for p in fleet.profiles]) == pytest.approx(4.0 * MBIT, rel=0.05)


def clock_for(tmp_path, fleet: DeviceFleet, system: str = "[system]") -> SimClock:
    config = scenario_config(digits(system=system), tmp_path)
    return SimClock(config, fleet)


def test_timing_is_the_sum_of_download_compute_upload(tmp_path):
    fleet = DeviceFleet([DeviceProfile(speed=50.0, download=1e6, upload=2.5e5)] * CLIENTS,
                        IntervalAvailability({p: [(0.0, 1e9)] for p in range(CLIENTS)}))
    clock = clock_for(tmp_path, fleet, "[system]\ndeadline_s = 100")
    t = clock.timing(2, 10.0, 3_000_000, 600.0, 500_000)
    assert (t.download, t.compute, t.upload) == (3.0, 12.0, 2.0) and t.finish == 27.0 and t.dropped is None
    late = clock.timing(2, 10.0, 3_000_000, 6000.0, 500_000, round_start=0.0)
    assert late.dropped.startswith("client 2: missed the deadline (system.deadline_s = 100)")


def test_clients_going_offline_mid_round_are_dropped_and_only_online_ones_sampled(tmp_path):
    # client 0 online [0, 5), client 1 from 100 on, the others never
    fleet = DeviceFleet([DeviceProfile(10.0, 1e6, 1e6)] * CLIENTS,
                        IntervalAvailability({0: [(0.0, 5.0)], 1: [(100.0, 200.0)]}))
    clock = clock_for(tmp_path, fleet)
    assert clock.timing(0, 0.0, 0, 100.0, 0).dropped.startswith("client 0: went offline at 5.0 s")
    assert clock.sample(3, round_=1) == [0] and clock.now == 0.0
    clock.now = 10.0  # nobody online: the round starts when client 1 comes online
    assert clock.sample(3, round_=2) == [1] and clock.now == 100.0
    clock.now = 300.0
    assert clock.sample(3, round_=3) == []
    assert isinstance(clock.timing(4, math.inf, 0, 1.0, 0), ClientTiming)


def test_markov_periods_alternate():
    avail = MarkovAvailability(3, online_mean=10.0, offline_mean=5.0, seed=4)
    t = 0.0
    for _ in range(50):
        start = avail.next_online(0, t)
        end = avail.online_until(0, start)
        assert start >= t and end > start and avail.is_online(0, start) and not avail.is_online(0, end)
        t = end


def test_off_by_default(tmp_path):
    config = scenario_config(digits(), tmp_path)
    assert config.system is None and "system" not in config.to_dict()
    assert SimClock.for_config(config) is None


TRACE_ERRORS = [
    ("client,speed,download_mbps\n0,1,2\n", "has no column upload_mbps"),
    ("client,speed,download_mbps,upload_mbps\n", "has a header but no rows"),
    ("client,speed,download_mbps,upload_mbps\n0,fast,2,3\n", "line 2: speed 'fast' is not a finite number > 0"),
    ("client,speed,download_mbps,upload_mbps\n0,0,2,3\n", "line 2: speed '0' is out of range"),
    ("client,speed,download_mbps,upload_mbps\n0,1,2,3\n0,1,2,3\n", "line 3: client 0 has a second row"),
    ("client,speed,download_mbps,upload_mbps\n9,1,2,3\n", "line 2: client 9 does not exist"),
    ("client,speed,download_mbps,upload_mbps\n0,1,2,3\n", "has no row for client 1, 2, 3, 4, 5"),
]


@pytest.mark.parametrize(("text", "fragment"), TRACE_ERRORS)
def test_bad_profile_traces_are_refused_naming_the_field(tmp_path, text, fragment):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    assert_config_error_names("system.trace", fragment,
                              lambda: scenario_config(digits(system=f'[system]\ntrace = "{path}"'), tmp_path))


AVAILABILITY_ERRORS = [
    ("client,start_s,end_s\n0,5,5\n", "line 2: end_s 5 is not after start_s 5"),
    ("client,start_s,end_s\n0,0,10\n0,5,20\n", "lines 2 and 3: client 0's intervals [0, 10) and [5, ...) overlap"),
    ("client,start\n0,1\n", "has no column start_s, end_s"),
    ("client,start_s,end_s\n-1,0,1\n", "line 2: client '-1' is out of range"),
]


@pytest.mark.parametrize(("text", "fragment"), AVAILABILITY_ERRORS)
def test_bad_availability_traces_are_refused_naming_the_field(tmp_path, text, fragment):
    path = tmp_path / "avail.csv"
    path.write_text(text)
    system = f'[system]\navailability = "trace"\navailability_trace = "{path}"'
    assert_config_error_names("system.availability_trace", fragment,
                              lambda: scenario_config(digits(system=system), tmp_path))


def test_availability_trace_is_read(tmp_path):
    path = tmp_path / "avail.csv"
    path.write_text("client,start_s,end_s\n0,0,10\n0,20,30\n3,5,6\n")
    config = scenario_config(digits(system=f'[system]\navailability = "trace"\navailability_trace = "{path}"'),
                             tmp_path)
    avail = build_fleet(config.system, CLIENTS, config.seed).availability
    assert [avail.next_online(0, t) for t in (0, 10, 25, 30)] == [0, 20, 25, math.inf]
    assert avail.online_until(3, 5.5) == 6 and not avail.is_online(1, 0)


@pytest.mark.parametrize(("system", "field", "fragment"), [
    ("over_selection = 0.5", "system.over_selection", "must be a finite number >= 1"),
    ('availability = "sometimes"', "system.availability", "always"),
    ('availability = "trace"', "system.availability_trace", "goes with availability = \"trace\""),
    ("targets = [0.5, 2.0]", "system.targets[1]", "must lie in [0, 1]"),
    ("deadline_s = 0", "system.deadline_s", "> 0"),
    ("trace = \"/nonexistent/devices.csv\"", "system.trace", "is not a file"),
    ("speeds = 3", "system.speeds", "unknown setting"),
])
def test_bad_system_settings_are_named(tmp_path, system, field, fragment):
    assert_config_error_names(field, fragment,
                              lambda: scenario_config(digits(system=f"[system]\n{system}"), tmp_path))


def test_grouped_nodes_are_refused(tmp_path):
    text = digits("fednova", "[system]").replace('backend = "inline"', 'backend = "inline"\nclients_per_node = 2')
    assert_config_error_names("system", "simulation.clients_per_node = 2",
                              lambda: scenario_config(text, tmp_path))
