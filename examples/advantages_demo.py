"""PAPO advantages for one simulated batch, next to plain GRPO (ORM) on the same rewards.

Four prompts, eight sampled responses each. The verifier says which answers are right; the rubric
judge scores only the right ones (0 / 0.5 / 1). Watch the all-correct prompt: ORM gives every
response 0 advantage there (no learning signal); PAPO still separates clean solutions from
sloppy ones.
"""

import torch

from papo_fast import papo_advantages

# fmt: off
PROMPTS = ["17+25-8", "3*(4+5)", "100-37+12", "2**10-24"]
OUTCOME = [  # 1 = verified correct
    [1, 0, 1, 1, 0, 1, 0, 1],
    [1, 1, 1, 1, 1, 1, 1, 1],  # every response correct
    [0, 0, 0, 0, 0, 0, 0, 0],  # every response wrong
    [0, 1, 0, 0, 0, 0, 0, 0],  # a single correct response
]
PROCESS = [  # rubric score of each correct response (wrong ones are never judged)
    [1.0, 0, 0.5, 1.0, 0, 0.5, 0, 1.0],
    [1.0, 0.5, 1.0, 0.0, 1.0, 0.5, 1.0, 1.0],
    [0, 0, 0, 0, 0, 0, 0, 0],
    [0, 1.0, 0, 0, 0, 0, 0, 0],
]
# fmt: on


def main() -> None:
    outcome = torch.tensor(OUTCOME, dtype=torch.float32).flatten()
    process = torch.tensor(PROCESS, dtype=torch.float32).flatten()
    group_ids = torch.arange(len(PROMPTS)).repeat_interleave(8)
    results = {
        mode: papo_advantages(outcome, process, group_ids=group_ids, mode=mode)
        for mode in ("orm", "papo")
    }
    for g, prompt in enumerate(PROMPTS):
        print(f"prompt {g}: {prompt}")
        rows = slice(8 * g, 8 * g + 8)
        print("  outcome ", " ".join(f"{x:6.0f}" for x in outcome[rows].tolist()))
        print("  rubric  ", " ".join(f"{x:6.1f}" for x in process[rows].tolist()))
        for mode, res in results.items():
            print(f"  A {mode:5s} ", " ".join(f"{x:+6.2f}" for x in res.advantages[rows].tolist()))
    print()
    for mode, res in results.items():
        stats = ", ".join(f"{k}={v.item():.3f}" for k, v in res.stats.items())
        print(f"{mode}: {stats}")


if __name__ == "__main__":
    main()
