"""What the controller makes of the ranks' and the root's reports: the per-step rows,
each recovery's wasted time and the run's summary, from hand-built records.

Every figure below is a binary fraction, so means are exact and each output is
asserted whole.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from gemini.cluster import keys
from gemini.cluster.store import Store
from gemini.config import GeminiConfig, ModelConfig
from gemini.experiment import add_wasted, collect, merge_reports, summarize


def rec(step: int, t: float, stall: float = 0.0, **more: Any) -> dict[str, Any]:
    """One rank's record of one step, as the trainer sends it."""
    return {
        "step": step,
        "gen": more.pop("gen", 0),
        "t": t,
        "loss": more.pop("loss", 4.0),
        "iter_time_s": more.pop("iter_time_s", 0.5),
        "throughput_samples_s": more.pop("throughput_samples_s", 16.0),
        "ckpt_stall_s": stall,
        **more,
    }


# -- add_wasted ----------------------------------------------------------------------


def test_wasted_time_is_recovery_plus_the_mean_rank_stall_since_the_previous_failure() -> None:
    per_rank = {
        0: [rec(1, 1.0, 0.25), rec(2, 2.0, 0.5), rec(3, 5.0, 1.0), rec(3, 9.0, 2.0)],
        1: [rec(1, 1.0, 0.75), rec(2, 2.0, 0.5), rec(3, 5.0, 1.0), rec(3, 9.0, 2.0)],
    }
    # Out of time order on purpose: windows follow the injection times.
    recoveries = [
        {"t_inject": 8.0, "recovery_s": 3.0},
        {"t_inject": 4.0, "recovery_s": 1.5},
        {"t_inject": 10.0},  # never completed: no recovery_s, so no wasted_s
    ]
    before = copy.deepcopy(recoveries)
    out = add_wasted(recoveries, per_rank)
    assert recoveries == before, "the input is left as it was"
    assert out == [
        # Window [4, 8): step 3 at t=5 on both ranks, mean 1.0.
        {"t_inject": 8.0, "recovery_s": 3.0, "ckpt_stall_since_last_s": 1.0, "wasted_s": 4.0},
        # Window [0, 4): steps 1-2, (0.25 + 0.5 + 0.75 + 0.5) / 2 ranks.
        {"t_inject": 4.0, "recovery_s": 1.5, "ckpt_stall_since_last_s": 1.0, "wasted_s": 2.5},
        # Window [8, 10): the replayed step 3 at t=9 counts too.
        {"t_inject": 10.0, "ckpt_stall_since_last_s": 2.0},
    ]


def test_no_recoveries_no_wasted_time() -> None:
    assert add_wasted([], {0: [rec(1, 1.0, 0.5)]}) == []


# -- merge_reports -------------------------------------------------------------------


def test_one_row_per_step_from_the_last_report_of_each_rank() -> None:
    ckpt = {"ckpt_local_s": 0.25, "ckpt_replicate_s": 0.5, "ckpt_persist_s": 0.0}
    per_rank = {
        0: [
            rec(1, 1.0, 0.0, loss=6.0),
            rec(2, 2.0, 0.5, loss=5.0, ckpt_step=1, ckpt_bytes=100, **ckpt),
            # A failure; step 2 is replayed (gen 1): only this report counts.
            rec(2, 7.0, 0.25, loss=5.0, gen=1, iter_time_s=1.0, ckpt_time_s=0.75),
            {"step": 2, "gen": 1, "t": 8.0, "ckpt_stall_s": 0.125, "final_wait": True},
        ],
        1: [
            rec(1, 1.5, 0.0, loss=6.5),
            rec(2, 2.5, 0.5, loss=5.5, ckpt_step=1, ckpt_bytes=100, **ckpt),
            rec(2, 7.5, 0.75, loss=5.5, gen=1, iter_time_s=0.5, ckpt_time_s=0.25),
        ],
    }
    finals = {0: {"digest": "a", "step": 2}, 1: {"digest": "b", "step": 2}}
    readies = {0: {"start_step": 1}, 1: {"start_step": 1}}
    recoveries = [{"t_inject": 5.0, "recovery_s": 1.0}]
    root = {"status": "completed", "gen": 1}
    out = merge_reports(
        per_rank=per_rank, finals=finals, readies=readies, recoveries=recoveries, gen=1, root=root
    )
    assert out["steps"] == [
        {
            "step": 1,
            "t": 1.5,
            "iter_time_s": 0.5,
            "ckpt_stall_s": 0.0,
            "loss": 6.25,
            "throughput_samples_s": 16.0,
        },
        {
            "step": 2,
            "t": 7.5,
            "iter_time_s": 0.75,
            "ckpt_stall_s": 0.5,
            "loss": 5.25,
            "ckpt_time_s": 0.5,
            "throughput_samples_s": 16.0,
        },
    ]
    assert out["final_waits"] == [per_rank[0][3]]
    assert (out["finals"], out["readies"], out["gen"], out["root"]) == (finals, readies, 1, root)
    # Stalls before the failure at t=5: (0.5 + 0.5) / 2 ranks.
    assert out["recoveries"] == [
        {"t_inject": 5.0, "recovery_s": 1.0, "ckpt_stall_since_last_s": 0.5, "wasted_s": 1.5}
    ]


def test_checkpoint_bytes_are_summed_over_ranks_and_timings_averaged() -> None:
    ckpt = {"ckpt_step": 1, "ckpt_local_s": 0.25, "ckpt_replicate_s": 0.5, "ckpt_persist_s": 1.0}
    per_rank = {
        0: [rec(2, 2.0, ckpt_bytes=100, **ckpt)],
        1: [rec(2, 2.0, ckpt_bytes=300, **{**ckpt, "ckpt_local_s": 0.75})],
    }
    (row,) = merge_reports(per_rank=per_rank, finals={}, readies={}, recoveries=[], gen=0, root={})[
        "steps"
    ]
    assert row["ckpt_bytes"] == 400
    assert (row["ckpt_local_s"], row["ckpt_replicate_s"], row["ckpt_persist_s"]) == (
        0.5,
        0.5,
        1.0,
    )


def test_collect_reads_what_the_ranks_and_the_root_wrote_to_the_store() -> None:
    # A real store, written with the same key table the trainers and the root use.
    store = Store("127.0.0.1", 0, b"k" * 32, master=True)
    per_rank = {0: [rec(1, 1.0), rec(2, 2.0)], 1: [rec(1, 1.0), rec(2, 2.0)]}
    for r, recs in per_rank.items():
        store.append(keys.metrics(r), "".join(json.dumps(x) + "\n" for x in recs))
        store.set_json(keys.final(1, r), {"digest": f"d{r}", "step": 2})
        store.set_json(keys.ready(1, r), {"start_step": 1})
    store.set_json(keys.GEN, 1)
    store.push(keys.RECOVERY, {"t_inject": 1.5, "recovery_s": 0.5})
    store.set_json(keys.ROOT_RESULT, {"status": "completed", "gen": 1})
    assert collect(store, 2) == merge_reports(
        per_rank=per_rank,
        finals={0: {"digest": "d0", "step": 2}, 1: {"digest": "d1", "step": 2}},
        readies={0: {"start_step": 1}, 1: {"start_step": 1}},
        recoveries=[{"t_inject": 1.5, "recovery_s": 0.5}],
        gen=1,
        root={"status": "completed", "gen": 1},
    )


# -- summarize -----------------------------------------------------------------------


def config(bandwidth_gbps: float = 0.0) -> GeminiConfig:
    cfg = GeminiConfig(model=ModelConfig(name="gpt_tiny"))
    cfg.cluster.nodes, cfg.cluster.ranks_per_node = 2, 2
    cfg.backend.name, cfg.backend.bandwidth_gbps = "replicated", bandwidth_gbps
    return cfg


def row(step: int, iter_s: float, **more: Any) -> dict[str, Any]:
    return {
        "step": step,
        "t": float(step),
        "iter_time_s": iter_s,
        "ckpt_stall_s": 0.0,
        "loss": 8.0 - step,
        "throughput_samples_s": 4.0 / iter_s,
        **more,
    }


def test_the_summary_averages_steady_steps_and_counts_checkpoints() -> None:
    ck = {"ckpt_local_s": 0.25, "ckpt_replicate_s": 0.5, "ckpt_persist_s": 0.0, "ckpt_bytes": 64}
    steps = [
        row(1, 4.0),  # warm-up steps (1-3) stay out of the run means
        row(2, 2.0, **ck),
        row(3, 2.0, **ck),
        row(4, 0.5, **ck, ckpt_time_s=0.75),
        row(5, 1.0, **{**ck, "ckpt_local_s": 0.75, "ckpt_bytes": 128}, ckpt_time_s=1.25),
    ]
    recoveries = [
        {"recovery_s": 2.0, "wasted_s": 3.0, "lost_steps": 1, "detect_s": 1.0},
        {"recovery_s": 4.0, "wasted_s": 5.0, "lost_steps": 0, "detect_s": None},
    ]
    reports = {
        "steps": steps,
        "finals": {0: {"digest": "x"}, 1: {"digest": "y"}, 2: {"digest": "z"}, 3: {"digest": "w"}},
        "recoveries": recoveries,
        "gen": 2,
        "final_waits": [{"final_wait": True}],
        "root": {"status": "completed"},
        "t_first_step": 1.0,
    }
    fired = [{"kind": "hardware", "node": 1}]
    # The cluster started 3 s before every rank was done with step 1.
    s = summarize(config(), reports, 32.0, "completed", "run1", fired, [], t_start=-2.0)
    assert s == {
        "outcome": "completed",
        "reason": "",
        "run_id": "run1",
        "startup_s": 3.0,
        "steps": 5,
        "wall_s": 32.0,
        "iter_time_s": 0.75,
        "iter_times_s": [4.0, 2.0, 2.0, 0.5, 1.0],  # every step's, warm-up included
        "throughput_samples_s": 6.0,
        "final_loss": 3.0,
        "state_digest": hashlib.sha256(b"xyzw").hexdigest(),
        "world_size": 4,
        "nodes": 2,
        "backend": "replicated",
        "model": "gpt_tiny",
        "ckpt_stall_s": 0.0,
        "ckpt_local_s": 0.375,
        "ckpt_replicate_s": 0.5,
        "ckpt_persist_s": 0.0,
        "ckpt_time_s": 1.0,
        "ckpt_bytes": 80,
        "checkpoints": 5,  # four waited for in the loop, one after it
        "checkpoints_per_hour": 450.0,
        "failures_injected": fired,
        "recoveries": recoveries,
        "generations": 2,
        "mean_detect_s": 1.0,  # a phase a recovery did not report is left out
        "mean_recovery_s": 3.0,
        "mean_wasted_s": 4.0,
        "mean_lost_steps": 0.5,
    }


def test_a_job_without_every_final_state_has_no_digest_and_says_why() -> None:
    reports = {
        "steps": [row(1, 1.0)],
        "finals": {0: {"digest": "x"}, 1: None},
        "recoveries": [],
        "gen": 0,
        "final_waits": [],
        "root": {"status": "failed", "reason": "node 1 lost twice"},
    }
    s = summarize(config(bandwidth_gbps=2.0), reports, 0.0, "failed", "run2", [], [])
    assert (s["outcome"], s["reason"], s["state_digest"]) == ("failed", "node 1 lost twice", None)
    # One step only: it is its own steady state.
    assert (s["steps"], s["iter_time_s"], s["final_loss"]) == (1, 1.0, 7.0)
    assert (s["checkpoints"], s["checkpoints_per_hour"], s["ckpt_local_s"]) == (0, 0.0, None)
    assert s["storage_bandwidth"] == "emulated 2.0 Gbit/s per node"
    assert not any(k.startswith("mean_") for k in s)


def test_a_job_that_reported_nothing_summarizes_to_zero_steps() -> None:
    reports = {
        "steps": [],
        "finals": {},
        "recoveries": [],
        "gen": 0,
        "final_waits": [],
        "root": {},
    }
    s = summarize(config(), reports, 1.0, "error", "run3", [], [])
    assert (s["steps"], s["iter_time_s"], s["final_loss"], s["state_digest"]) == (
        0,
        None,
        None,
        None,
    )
