"""Rewards: the verifier / judge interfaces and the reward step (base.py), the math verifier
(verify.py), the rubric judge (judge.py) and its backends (judge_backends.py)."""

from papo_fast.rewards.base import (
    TIERS,
    AnswerLineVerifier,
    Judge,
    JudgeConfigError,
    JudgeError,
    JudgePartialFailure,
    Outcome,
    RewardResult,
    Verifier,
    collect_metrics,
    compute_rewards,
    load_judge,
    load_verifier,
    parse_answer_line,
    register_judge,
    register_verifier,
)

__all__ = [
    "TIERS",
    "AnswerLineVerifier",
    "Judge",
    "JudgeConfigError",
    "JudgeError",
    "JudgePartialFailure",
    "Outcome",
    "RewardResult",
    "Verifier",
    "collect_metrics",
    "compute_rewards",
    "load_judge",
    "load_verifier",
    "parse_answer_line",
    "register_judge",
    "register_verifier",
]
