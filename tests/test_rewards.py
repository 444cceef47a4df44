"""Verifier + judge: the judge sees correct responses only; invalid scores follow the policy."""

import pytest

from papo_fast.rewards import (
    AnswerLineVerifier,
    Judge,
    JudgeConfigError,
    JudgeError,
    JudgePartialFailure,
    Verifier,
    collect_metrics,
    compute_rewards,
    load_judge,
    load_verifier,
)


class RecordingJudge(Judge):
    """Returns fixed scores and remembers what it was shown."""

    def __init__(self, scores):
        self.scores, self.seen = scores, []

    def score(self, problems, responses, answers):
        self.seen.append(list(responses))
        return self.scores[: len(responses)]


PROBLEMS = ["1+1"] * 4
RESPONSES = ["Answer: 2", "Answer: 3", "x\nAnswer: 2", "nothing"]
ANSWERS = ["2"] * 4


def test_judge_called_on_correct_only():
    judge = RecordingJudge([1.0, 0.5])
    rw = compute_rewards(AnswerLineVerifier(), judge, PROBLEMS, RESPONSES, ANSWERS)
    assert judge.seen == [["Answer: 2", "x\nAnswer: 2"]]
    assert rw.correct == [True, False, True, False]
    assert rw.outcome == [1.0, 0.0, 1.0, 0.0]
    assert rw.process == [1.0, 0.0, 0.5, 0.0]  # wrong responses get 0
    assert (rw.judge_calls, rw.judge_invalid) == (2, 0)


def test_no_correct_response_means_no_judge_call():
    judge = RecordingJudge([1.0])
    rw = compute_rewards(AnswerLineVerifier(), judge, ["q"], ["Answer: 9"], ["2"])
    assert judge.seen == [] and rw.judge_calls == 0


@pytest.mark.parametrize("bad", [0.7, -1.0, 2, float("nan"), None, "1"])
def test_invalid_judge_output_counted_and_zeroed(bad):
    judge = RecordingJudge([bad, 1.0])
    rw = compute_rewards(AnswerLineVerifier(), judge, PROBLEMS, RESPONSES, ANSWERS)
    assert rw.process == [0.0, 0.0, 1.0, 0.0]
    assert rw.judge_invalid == 1


def test_invalid_judge_output_raises_under_error_policy():
    judge = RecordingJudge([0.7, 1.0])
    with pytest.raises(JudgeError, match="0.7"):
        compute_rewards(AnswerLineVerifier(), judge, PROBLEMS, RESPONSES, ANSWERS, "error")


def test_judge_exception_counts_every_score_invalid():
    class Broken(Judge):
        def score(self, problems, responses, answers):
            raise RuntimeError("server down")

    rw = compute_rewards(AnswerLineVerifier(), Broken(), PROBLEMS, RESPONSES, ANSWERS)
    assert rw.process == [0.0] * 4 and rw.judge_invalid == 2
    with pytest.raises(JudgeError, match="server down"):
        compute_rewards(AnswerLineVerifier(), Broken(), PROBLEMS, RESPONSES, ANSWERS, "error")


@pytest.mark.parametrize("on_invalid", ["zero", "error"])
def test_judge_config_error_is_never_swallowed(on_invalid):
    class Misconfigured(Judge):
        def score(self, problems, responses, answers):
            raise JudgeConfigError("judge server answered HTTP 401: check the key")

    with pytest.raises(JudgeConfigError, match="HTTP 401"):
        compute_rewards(
            AnswerLineVerifier(), Misconfigured(), PROBLEMS, RESPONSES, ANSWERS, on_invalid
        )


class HalfFailed(Judge):
    """Scores the second correct response (0.5) and fails on the first."""

    def __init__(self, scores=(None, 0.5)):
        self.scores = list(scores)

    def score(self, problems, responses, answers):
        raise JudgePartialFailure("1 of 2 failed", self.scores, {0: "HTTP 400 (too long)"})


def test_partial_judge_failure_invalidates_only_the_failed_responses():
    rw = compute_rewards(AnswerLineVerifier(), HalfFailed(), PROBLEMS, RESPONSES, ANSWERS)
    assert rw.process == [0.0, 0.0, 0.5, 0.0]  # response 2 keeps its score
    assert (rw.judge_calls, rw.judge_invalid) == (2, 1)
    # the error names the response (0: the first correct one) and why it has no score
    with pytest.raises(JudgeError, match=r"response 0: HTTP 400 \(too long\)"):
        compute_rewards(AnswerLineVerifier(), HalfFailed(), PROBLEMS, RESPONSES, ANSWERS, "error")
    with pytest.raises(JudgeError, match="1 scores for 2"):
        compute_rewards(AnswerLineVerifier(), HalfFailed([0.5]), PROBLEMS, RESPONSES, ANSWERS)


def test_wrong_number_of_scores_is_an_error():
    with pytest.raises(JudgeError, match="1 scores for 2"):
        compute_rewards(AnswerLineVerifier(), RecordingJudge([1.0]), PROBLEMS, RESPONSES, ANSWERS)


def test_registry_and_import_paths():
    assert isinstance(load_verifier("answer_line"), AnswerLineVerifier)
    assert load_judge("none") is None
    assert load_judge("papo_fast.tasks.arith:ArithRubricJudge").score(
        ["1+1"], ["1+1=2\nAnswer: 2"], ["2"]
    )
    with pytest.raises(ValueError, match="unknown judge"):
        load_judge("gpt")
    with pytest.raises(ValueError, match="cannot load verifier"):
        load_verifier("papo_fast.tasks.arith:Nope")


def test_collect_metrics_from_whoever_reports_them():
    from papo_fast.rewards.judge import RubricJudge
    from papo_fast.rewards.verify import MathVerifier

    class Duck:  # a duck-typed verifier without take_metrics
        def verify(self, problems, responses, answers):
            return []

    verifier, judge = MathVerifier(use_math_verify=False), RubricJudge(lambda m: "no score")
    verifier.verify(["q", "q"], [r"\boxed{1}", "none"], ["1", "1"])
    judge.score(["q"], ["r"], ["a"])
    got = collect_metrics(verifier, judge, Duck(), AnswerLineVerifier(), None)
    assert got["verify_no_answer"] == 1 and got["verify_timeouts"] == 0
    assert got["judge_scored"] == 1 and got["judge_parse_fail"] == 1
    assert collect_metrics(verifier, judge)["judge_parse_fail"] == 0  # taken: reset

    class PlainVerifier(Verifier):  # the interfaces' default: nothing to report
        def verify(self, problems, responses, answers):
            return []

    class PlainJudge(Judge):
        def score(self, problems, responses, answers):
            return []

    assert PlainVerifier().take_metrics() == {} and PlainJudge().take_metrics() == {}
    with pytest.raises(TypeError):
        Verifier()  # an interface: verify must be implemented


class SolutionJudge(Judge):
    """Takes reference solutions and remembers them."""

    def __init__(self):
        self.seen = []

    def score(self, problems, responses, answers, solutions=None):
        self.seen.append(solutions)
        return [1.0] * len(responses)


class KwargsJudge(Judge):
    def __init__(self):
        self.seen = []

    def score(self, problems, responses, answers, **kwargs):
        self.seen.append(kwargs)
        return [1.0] * len(responses)


def test_solutions_reach_a_judge_that_takes_them():
    solutions = ["s0", "s1", None, "s3"]
    judge = SolutionJudge()
    compute_rewards(AnswerLineVerifier(), judge, PROBLEMS, RESPONSES, ANSWERS, solutions=solutions)
    compute_rewards(AnswerLineVerifier(), judge, PROBLEMS, RESPONSES, ANSWERS)
    assert judge.seen == [["s0", None], None]  # the correct responses' (0 and 2); none given
    kw = KwargsJudge()
    compute_rewards(AnswerLineVerifier(), kw, PROBLEMS, RESPONSES, ANSWERS, solutions=solutions)
    assert kw.seen == [{"solutions": ["s0", None]}]
    plain = RecordingJudge([1.0, 1.0])  # score(problems, responses, answers): not passed
    rw = compute_rewards(
        AnswerLineVerifier(), plain, PROBLEMS, RESPONSES, ANSWERS, "zero", solutions
    )
    assert rw.process == [1.0, 0.0, 1.0, 0.0] and rw.judge_invalid == 0


@pytest.mark.parametrize(
    "spec, match",
    [
        (".relative:Thing", "unknown verifier"),  # a relative module: import_module's TypeError
        ("math:pi", "is a float, not a class or a factory"),
        ("os:getcwd", "built a str, which has no verify"),
        ("no_such_module_xyz:Verifier", "cannot load verifier"),
        (":attr", "unknown verifier"),
        ("module:", "unknown verifier"),
    ],
)
def test_a_bad_verifier_name_is_a_clear_error(spec, match):
    with pytest.raises(ValueError, match=match):
        load_verifier(spec)


def test_a_judge_without_score_is_refused():
    with pytest.raises(ValueError, match="has no score"):
        load_judge("papo_fast.rewards.base:AnswerLineVerifier")


def test_tasks_register_their_reward_names():
    import papo_fast.tasks  # noqa: F401  (registers "arith_rubric")
    from papo_fast.tasks.arith import ArithRubricJudge

    assert isinstance(load_judge("arith_rubric"), ArithRubricJudge)
